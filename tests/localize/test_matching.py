"""Tests of 2D matching, keypoint lifting and PnP + RANSAC."""

import cv2
import numpy as np
import pytest
import torch
import kornia.feature as KF

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.absolute_pose import lift_keypoints, pnp_ransac
from nerfstudio_gsloc.localize.matching import Matcher, MatcherConfig, make_matcher
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


def _textured_image(size: int, seed: int = 0) -> np.ndarray:
    """[size, size, 3] float32 texture: smooth random colour blobs on a checkerboard."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(size // 3):
        cx, cy = rng.uniform(0, size, 2)
        sigma = rng.uniform(3, 12)
        img += rng.uniform(-0.5, 0.5, 3) * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))[..., None]
    checker = ((np.floor(xs / 8) + np.floor(ys / 8)) % 2)[..., None] * 0.2
    return np.clip(0.4 + img + checker, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("upsample", [1.0, 2.0])
def test_sift_recovers_known_shift(upsample):
    image0 = _textured_image(128)
    shift = np.array([5.3, -3.6])
    warp = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]], np.float32)
    image1 = cv2.warpAffine(image0, warp, (128, 128), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    matcher = make_matcher(MatcherConfig(kind="sift", upsample=upsample))
    assert isinstance(matcher, Matcher)
    matches = matcher.match(torch.from_numpy(image0), torch.from_numpy(image1))
    assert matches.kpts0.shape == matches.kpts1.shape == (len(matches), 2)
    assert matches.scores.shape == (len(matches),)
    assert ((matches.scores >= 0) & (matches.scores <= 1)).all()
    assert len(matches) >= 50
    err = (matches.kpts1 - matches.kpts0 - torch.tensor(shift, dtype=torch.float32)).norm(dim=-1)
    assert (err < 1.0).float().mean().item() > 0.9
    assert err.median().item() < 0.3
    # Keypoints are in original-image pixels, not upsampled ones.
    assert matches.kpts0.max().item() <= 128.0


@pytest.mark.parametrize("upsample", [1.0, 2.0])
def test_sift_keypoints_use_pixel_centre_convention(upsample):
    size = 96
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel (col, row) has its centre at (col + 0.5, row + 0.5)
    centres = [(20.3, 25.7), (70.1, 30.2), (45.6, 70.4)]
    img = np.full((size, size), 0.2, np.float32)
    for cx, cy in centres:
        img += 0.7 * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0**2))
    image = torch.from_numpy(np.repeat(img[..., None], 3, axis=-1))
    matches = make_matcher(MatcherConfig(upsample=upsample)).match(image, image)
    for cx, cy in centres:
        # Symmetric blobs are located to a small fraction of a pixel; a half-pixel convention slip would show.
        assert (matches.kpts0 - torch.tensor([cx, cy])).norm(dim=-1).min().item() < 0.1


@pytest.mark.parametrize("kind, field", [("disk_lightglue", "weights_path"), ("loftr", "weights_path")])
def test_learned_matchers_require_local_weights(kind, field, tmp_path):
    with pytest.raises(GslocError, match=field):
        make_matcher(MatcherConfig(kind=kind))
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(GslocError, match=str(missing)):
        make_matcher(MatcherConfig(kind=kind, weights_path=missing, lightglue_weights_path=missing))


def test_disk_lightglue_needs_lightglue_file(tmp_path):
    disk_path = tmp_path / "disk.pth"
    torch.save({"extractor": KF.DISK().state_dict()}, disk_path)
    with pytest.raises(GslocError, match="lightglue_weights_path"):
        make_matcher(MatcherConfig(kind="disk_lightglue", weights_path=disk_path))
    missing = tmp_path / "disk_lightglue.pth"
    with pytest.raises(GslocError, match=str(missing)):
        make_matcher(MatcherConfig(kind="disk_lightglue", weights_path=disk_path, lightglue_weights_path=missing))


def _same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> bool:
    loaded_state = loaded.state_dict()
    return all(torch.equal(loaded_state[name], value) for name, value in reference.state_dict().items())


def test_disk_lightglue_loads_local_checkpoints_and_matches(tmp_path):
    torch.manual_seed(0)
    disk = KF.DISK()
    torch.save({"extractor": disk.state_dict()}, tmp_path / "disk.pth")
    lightglue = KF.LightGlue(None, input_dim=128)
    # Released LightGlue checkpoints name attention blocks "self_attn.<i>" / "cross_attn.<i>".
    released = {}
    for key, value in lightglue.state_dict().items():
        if key == "confidence_thresholds":
            continue  # derived buffer, absent from released files
        for i in range(lightglue.conf.n_layers):
            key = key.replace(f"transformers.{i}.self_attn.", f"self_attn.{i}.")
            key = key.replace(f"transformers.{i}.cross_attn.", f"cross_attn.{i}.")
        released[key] = value
    torch.save(released, tmp_path / "lightglue.pth")
    matcher = make_matcher(
        MatcherConfig(
            kind="disk_lightglue",
            weights_path=tmp_path / "disk.pth",
            lightglue_weights_path=tmp_path / "lightglue.pth",
            upsample=1.0,
            min_confidence=0.0,
        )
    )
    assert _same_weights(matcher.lightglue, lightglue) and _same_weights(matcher.disk, disk)
    assert not matcher.lightglue.training and not matcher.disk.training
    matches = matcher.match(torch.rand(48, 64, 3), torch.rand(48, 64, 3))
    assert matches.kpts0.shape == matches.kpts1.shape == (len(matches), 2) and matches.scores.shape == (len(matches),)
    assert len(matches) > 0  # a zero threshold keeps LightGlue's mutual assignments even with random weights
    assert (matches.kpts0 > 0).all() and (matches.kpts0[:, 0] < 64).all() and (matches.kpts0[:, 1] < 48).all()
    # A checkpoint of the wrong network is a clear user error.
    with pytest.raises(GslocError, match="does not match"):
        make_matcher(
            MatcherConfig(
                kind="disk_lightglue",
                weights_path=tmp_path / "lightglue.pth",
                lightglue_weights_path=tmp_path / "lightglue.pth",
            )
        )


def test_loftr_loads_local_checkpoint_and_runs(tmp_path):
    torch.manual_seed(0)
    loftr = KF.LoFTR(pretrained=None)
    torch.save({"state_dict": loftr.state_dict()}, tmp_path / "loftr.ckpt")
    matcher = make_matcher(MatcherConfig(kind="loftr", weights_path=tmp_path / "loftr.ckpt", upsample=1.0))
    assert _same_weights(matcher.loftr, loftr) and not matcher.loftr.training
    matches = matcher.match(torch.rand(48, 64, 3), torch.rand(40, 56, 3))
    assert matches.kpts0.shape == matches.kpts1.shape == (len(matches), 2) and matches.scores.shape == (len(matches),)


def _look_at_c2w(centre, target) -> torch.Tensor:
    """OpenGL c2w looking from ``centre`` to ``target`` (camera -z towards the target), float64 [3, 4]."""
    centre = torch.tensor(centre, dtype=torch.float64)
    forward = torch.tensor(target, dtype=torch.float64) - centre
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    return torch.stack([right, up, -forward, centre], dim=-1)


def _project(points: torch.Tensor, c2w_gl: torch.Tensor, K: torch.Tensor):
    """Independent pinhole projection: OpenCV camera axes are OpenGL's with y and z flipped."""
    rot_cv = c2w_gl[:, :3] * torch.tensor([1.0, -1.0, -1.0], dtype=c2w_gl.dtype)
    cam = (points - c2w_gl[:, 3]) @ rot_cv
    uv = cam[:, :2] / cam[:, 2:3] * torch.stack([K[0, 0], K[1, 1]]) + K[:2, 2]
    return uv, cam[:, 2]


K_REF = torch.tensor([[90.0, 0.0, 40.0], [0.0, 90.0, 30.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def test_lift_keypoints_backprojects_onto_depth():
    H, W = 60, 80
    c2w = _look_at_c2w([0.5, -4.0, 1.0], [0.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    depth = 3.0 + torch.rand(H, W, generator=gen, dtype=torch.float64)
    # Nearest lookup at pixel centres is exact for any depth map.
    rows = torch.randint(0, H, (50,), generator=gen)
    cols = torch.randint(0, W, (50,), generator=gen)
    kpts = torch.stack([cols + 0.5, rows + 0.5], dim=-1).double()
    points, valid = lift_keypoints(kpts, depth, K_REF, c2w, interpolation="nearest")
    assert valid.all()
    uv, z = _project(points, c2w, K_REF)
    torch.testing.assert_close(uv, kpts)
    torch.testing.assert_close(z, depth[rows, cols])
    # Bilinear lookup is exact for depth linear in the pixel coordinates (checks the +0.5 convention).
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    linear = (2.0 + 0.01 * xs + 0.02 * ys).double()
    sub = torch.tensor([[10.3, 20.8], [55.0, 40.25], [1.0, 1.0]], dtype=torch.float64)
    points, valid = lift_keypoints(sub, linear[..., None], K_REF, c2w)
    assert valid.all()
    _, z = _project(points, c2w, K_REF)
    torch.testing.assert_close(z, 2.0 + 0.01 * sub[:, 0] + 0.02 * sub[:, 1])


def test_lift_keypoints_invalid_cases():
    H, W = 20, 30
    depth = torch.full((H, W), 2.0)
    depth[5, 5] = 0.0
    alpha = torch.ones(H, W, 1)
    alpha[10, 20] = 0.1
    kpts = torch.tensor(
        [
            [5.5, 5.5],  # zero depth
            [4.8, 5.5],  # its bilinear footprint includes the zero-depth pixel (not as top-left)
            [20.5, 10.5],  # low alpha
            [-0.5, 3.0],  # outside
            [30.0, 3.0],  # outside (right edge)
            [15.5, 15.5],  # fine
            [0.2, 0.2],  # inside, border half-pixel: clamped lookup
        ]
    )
    c2w = torch.eye(4)[:3]
    points, valid = lift_keypoints(kpts, depth, K_REF.float(), c2w, alpha=alpha)
    assert valid.tolist() == [False, False, False, False, False, True, True]
    assert (points[~valid] == 0).all()
    _, nearest_valid = lift_keypoints(kpts, depth, K_REF.float(), c2w, alpha=alpha, interpolation="nearest")
    assert nearest_valid.tolist() == [False, True, False, False, False, True, True]


def test_lift_then_pnp_recovers_pose_with_outliers():
    H, W = 60, 80
    gen = torch.Generator().manual_seed(1)
    ref_c2w = _look_at_c2w([0.0, -4.0, 0.5], [0.0, 0.0, 0.0])
    query_c2w = _look_at_c2w([0.8, -3.6, 0.9], [0.1, 0.0, 0.2])
    # A non-planar scene seen from the reference view: smooth bumps on a slanted surface.
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    depth = (3.5 + 0.01 * xs + 0.3 * torch.sin(xs / 7.0) * torch.cos(ys / 5.0)).double()
    num = 150
    kpts_ref = torch.rand(num, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    points, valid = lift_keypoints(kpts_ref, depth, K_REF, ref_c2w)
    assert valid.all()
    kpts_query, z = _project(points, query_c2w, K_REF)
    assert (z > 0).all()
    kpts_query = kpts_query + 0.2 * torch.randn(num, 2, generator=gen, dtype=torch.float64)
    outliers = torch.zeros(num, dtype=torch.bool)
    outliers[::4] = True  # 25% gross outliers
    kpts_query[outliers] = torch.rand(int(outliers.sum()), 2, generator=gen, dtype=torch.float64) * torch.tensor(
        [W, H], dtype=torch.float64
    )
    result = pnp_ransac(points.float(), kpts_query.float(), K_REF.float())
    assert result.c2w is not None and result.c2w.shape == (3, 4) and result.c2w.dtype == torch.float32
    assert rotation_error_deg(result.c2w[None].double(), query_c2w[None]).item() < 0.3
    assert translation_error(result.c2w[None].double(), query_c2w[None]).item() < 0.02
    assert not result.inliers[outliers].float().mean().item() > 0.1
    assert result.inliers[~outliers].float().mean().item() > 0.9
    assert result.num_inliers == int(result.inliers.sum())


def test_pnp_fails_cleanly_with_too_few_or_random_points():
    gen = torch.Generator().manual_seed(2)
    few = pnp_ransac(torch.randn(5, 3), torch.rand(5, 2) * 50, K_REF.float())
    assert few.c2w is None and few.inliers.shape == (5,) and not few.inliers.any()
    points = torch.randn(40, 3, generator=gen) + torch.tensor([0.0, 0.0, 5.0])
    noise = pnp_ransac(points, torch.rand(40, 2, generator=gen) * 80, K_REF.float(), min_inliers=30)
    assert noise.c2w is None and not noise.inliers.any()
