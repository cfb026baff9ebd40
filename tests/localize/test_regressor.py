"""The scene regressor: differentiable weighted rigid alignment, training from a Gaussian scene, weights beside the
run (reuse / retrain), and its use by ns-localize (--method regression, --init regression)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_ns_localize
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.regression import RegressionLocalizer, RegressionLocalizerConfig, regression_initial_poses
from nerfstudio_gsloc.camera_conventions import opencv_c2w_to_opengl_c2w
from nerfstudio_gsloc.localize.regressor import (RegressorNetConfig, SceneRegressor, SceneRegressorNet, grid_rays,
                                                 grid_size, resize_image)
from nerfstudio_gsloc.localize.regressor_files import load_regressor, save_regressor
from nerfstudio_gsloc.localize.retrieval import checkpoint_fingerprint
from nerfstudio_gsloc.localize.regressor_settings import RegressorTrainConfig, cpu_has_native_bfloat16
from nerfstudio_gsloc.localize.rigid_alignment import robust_rigid_alignment, weighted_rigid_alignment
from nerfstudio_gsloc.localize.scene_map import TrainingView, between_poses
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.localize.regressor_training import DEPTH_SCALES, calibrate_depth_scale
from nerfstudio_gsloc.scripts.train_regressor import train_or_reuse

#: A network and data small enough to train in seconds: 64x48 input, 8x6 grid.
TINY = RegressorTrainConfig(input_size=64, channels=(16, 32, 48), steps=300, batch_size=8, rendered_views=96,
                            max_minutes=2.0, pose_warmup=0.3, members=1)


def _known_pose(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    R = axis_angle_to_rotation_matrix(torch.tensor([[0.4, -1.1, 0.7]], dtype=dtype))
    t = torch.tensor([[0.5, -2.0, 1.5]], dtype=dtype)
    src = torch.randn(1, 80, 3, generator=gen, dtype=dtype) * torch.tensor([2.0, 1.0, 0.5], dtype=dtype) + 3.0
    dst = torch.einsum("bij,bnj->bni", R, src) + t[:, None]
    return R, t, src, dst, gen


def _angle_deg(Ra, Rb):
    cos = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    return float(torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0))).max())


def test_alignment_recovers_a_known_pose_with_noise_and_outlier_weights():
    R, t, src, dst, gen = _known_pose()
    noisy = dst + 0.01 * torch.randn(dst.shape, generator=gen, dtype=dst.dtype)
    outliers = noisy.clone()
    outliers[:, :20] = 10.0 * torch.randn(1, 20, 3, generator=gen, dtype=dst.dtype)  # 25% garbage pairs
    weights = torch.ones(1, 80, dtype=dst.dtype)
    R0, t0 = weighted_rigid_alignment(src, dst, weights)  # exact pairs: exact pose, a proper rotation
    assert _angle_deg(R0, R) < 1e-6 and float((t0 - t).norm()) < 1e-6
    assert float(torch.det(R0)) == pytest.approx(1.0, abs=1e-9)
    R1, t1 = weighted_rigid_alignment(src, outliers, weights)
    assert _angle_deg(R1, R) > 5.0  # garbage pairs with full weight ruin a plain alignment ...
    zero = weights.clone()
    zero[:, :20] = 0.0
    R2, t2 = weighted_rigid_alignment(src, outliers, zero)  # ... their weight set to 0 removes them
    assert _angle_deg(R2, R) < 0.5 and float((t2 - t).norm()) < 0.05
    R3, t3, effective = robust_rigid_alignment(src, outliers, weights, rounds=5)  # reweighting finds them itself
    assert _angle_deg(R3, R) < 1.0 and float((t3 - t).norm()) < 0.1
    assert float(effective[0, :20].mean()) < 0.1 * float(effective[0, 20:].mean())
    with pytest.raises(ValueError, match="weights must be"):
        weighted_rigid_alignment(src, dst, weights[:, :5])


def test_alignment_gradient_matches_finite_differences():
    _, _, src, dst, gen = _known_pose()
    src, dst = src[:, :10], dst[:, :10] + 0.05 * torch.randn(1, 10, 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(1, 10, generator=gen, dtype=torch.float64) + 0.2
    inputs = tuple(x.clone().requires_grad_(True) for x in (src, dst, weights))
    assert torch.autograd.gradcheck(weighted_rigid_alignment, inputs, eps=1e-6, atol=1e-5)


def _orbit_camera(azimuth_deg: float, radius: float = 4.0) -> torch.Tensor:
    """OpenGL ``[3, 4]`` camera on the horizontal circle of ``radius``, looking at the origin, no roll."""
    a = math.radians(azimuth_deg)
    centre = torch.tensor([radius * math.cos(a), radius * math.sin(a), 0.0])
    back = centre / radius  # OpenGL z points away from what the camera looks at
    up = torch.tensor([0.0, 0.0, 1.0])
    right = torch.linalg.cross(up, back)
    return torch.cat([torch.stack([right, up, back], dim=1), centre[:, None]], dim=1)


def test_between_poses_stay_on_the_orbit_of_the_cameras_they_join():
    c2w = torch.stack([_orbit_camera(a) for a in (0.0, 20.0, 40.0, 180.0)])
    depth = torch.tensor([4.0, 4.0, 4.0, -1.0])  # camera 3 renders nothing: never used
    poses, parents = between_poses(c2w, depth, 200, neighbours=1, overshoot=0.25,
                                   generator=torch.Generator().manual_seed(0))
    assert poses.shape == (200, 3, 4) and set(parents.tolist()) == {0, 1, 2}
    centre = poses[:, :, 3]
    assert torch.allclose(centre.norm(dim=-1), torch.full((200,), 4.0), atol=1e-4)  # same distance, same circle
    assert torch.allclose(-poses[:, :, 2], -centre / 4.0, atol=1e-5)  # still looking at the origin
    assert torch.allclose(poses[:, :, 1], torch.tensor([0.0, 0.0, 1.0]).expand(200, 3), atol=1e-5)  # no roll
    azimuth = torch.rad2deg(torch.atan2(centre[:, 1], centre[:, 0]))
    # neighbours=1: 0 <-> 20 and 40 <-> 20 only, a quarter of the gap past either end at most
    assert float(azimuth.min()) >= -5.0 - 1e-3 and float(azimuth.max()) <= 45.0 + 1e-3
    assert float(azimuth.min()) < 0.0 and float(azimuth.max()) > 40.0  # the overshoot is used
    assert ((azimuth - 20.0).abs() > 1.0).float().mean() > 0.9  # mostly new poses, not copies of the cameras
    empty, _ = between_poses(c2w[:1], depth[:1], 5, 4, 0.25, torch.Generator())
    assert empty.shape == (0, 3, 4)  # one camera: nothing to interpolate


def _views(point_splat_views):
    rgb, _, K, c2w = point_splat_views
    return [TrainingView(f"view{i}", rgb[i], K[i], c2w[i]) for i in range(rgb.shape[0])]


@pytest.fixture(scope="module")
def tiny_regressor(tmp_path_factory, point_splat, point_splat_views):
    folder = tmp_path_factory.mktemp("regressor")
    checkpoint = folder / "step-000000001.ckpt"
    checkpoint.write_bytes(b"weights")
    meta = train_or_reuse(point_splat, _views(point_splat_views), checkpoint, folder / "gsloc_regressor", TINY,
                          show_progress=False)
    return folder / "gsloc_regressor", checkpoint, meta


def test_a_tiny_regressor_localizes_its_training_views_better_than_chance(tiny_regressor, point_splat_views):
    folder, checkpoint, meta = tiny_regressor
    assert not meta["reused"] and meta["steps"] == TINY.steps and meta["skipped_steps"] < TINY.steps // 10
    regressor = load_regressor(folder, checkpoint)
    rgb, _, K, c2w = point_splat_views
    queries = [Query(f"view{i}", Path(f"view{i}.png"), rgb[i], K[i], rgb.shape[2], rgb.shape[1], gt_c2w=c2w[i], index=i)
               for i in range(rgb.shape[0])]
    inits = regression_initial_poses(queries, regressor)
    est = torch.stack([init.c2w for init in inits]).double()
    gt = c2w.double()
    rot, trans = rotation_error_deg(est, gt), translation_error(est, gt)
    # Chance: answering with another training view's pose (every pairing of distinct views).
    pairs = [(i, j) for i in range(len(gt)) for j in range(len(gt)) if i != j]
    chance_rot = rotation_error_deg(gt[[j for _, j in pairs]], gt[[i for i, _ in pairs]]).median()
    chance_trans = translation_error(gt[[j for _, j in pairs]], gt[[i for i, _ in pairs]]).median()
    assert float(rot.median()) < 0.5 * float(chance_rot), (rot, chance_rot)
    assert float(trans.median()) < 0.5 * float(chance_trans), (trans, chance_trans)
    # The localizer gives the same poses, unrefined, with the alignment's confidence and its forward-pass time.
    localizer = RegressionLocalizer(RegressionLocalizerConfig(), None, regressor=regressor)
    results = localizer.localize(queries[:2], [torch.full((3, 4), math.nan)] * 2)
    assert localizer.coarse and localizer.verifier is None
    for result, init in zip(results, inits):
        assert result.status == "converged" and torch.allclose(result.c2w, init.c2w)
        assert 0.0 <= result.confidence <= 1.0 and result.seconds > 0 and result.rot_err_deg is not None


def test_the_depth_scale_calibrated_on_the_training_photos_undoes_a_depth_bias(tiny_regressor, point_splat_views):
    """A network whose depths all come out 4% short places every camera too close; the calibration on the training
    photos finds the factor that undoes it (within a grid step of the unbiased network's own factor times 1/0.96),
    the biased regressor with that factor localizes as well as the unbiased one, and predict() applies the factor
    saved in regressor.json."""
    folder, checkpoint, meta = tiny_regressor
    calibration = meta["depth_scale_calibration"]
    assert meta["depth_scale"] == calibration["depth_scale"] and calibration["views"] == len(point_splat_views[0])
    assert calibration["median_error"] <= calibration["median_error_unscaled"]
    views = _views(point_splat_views)
    regressor = load_regressor(folder, checkpoint)
    assert regressor.depth_scale == meta["depth_scale"]
    own = calibrate_depth_scale(regressor, views)
    assert own["depth_scale"] == meta["depth_scale"]  # deterministic
    biased = load_regressor(folder, checkpoint)
    for net in biased.nets:  # depth = depth_ref * exp(head channel 0): a constant factor of 0.96
        net.head[-1].bias.data[0] += math.log(0.96)
    found = calibrate_depth_scale(biased, views)
    assert abs(found["depth_scale"] - own["depth_scale"] / 0.96) <= 0.0026, (found, own)
    assert found["median_error_unscaled"] > own["median_error"] + 0.5 * (found["median_error_unscaled"] - own["median_error_unscaled"])

    def centre_errors(reg):
        return torch.stack([(reg.predict(v.image, v.K).c2w[:, 3] - v.c2w[:, 3]).norm() for v in views])

    biased.depth_scale = 1.0
    before = centre_errors(biased).median()
    biased.depth_scale = found["depth_scale"]
    after = centre_errors(biased).median()
    assert after < before and abs(float(after) - found["median_error"]) < 1e-4
    assert abs(float(after) - float(centre_errors(regressor).median())) < 0.25 * float(before - after)


def test_weights_are_reused_and_retrained_when_the_checkpoint_changes(tmp_path, point_splat, point_splat_views):
    views = _views(point_splat_views)[:4]
    checkpoint = tmp_path / "step-000000001.ckpt"
    checkpoint.write_bytes(b"weights")
    folder = tmp_path / "gsloc_regressor"
    quick = RegressorTrainConfig(input_size=32, channels=(8, 8, 8), steps=3, batch_size=2, rendered_views=2, members=1,
                                 precision="float32")  # the float32 path (the other tests take this CPU's "auto")

    def run(config=quick):
        return train_or_reuse(point_splat, views, checkpoint, folder, config, show_progress=False)

    assert not run()["reused"]
    assert sorted(p.name for p in folder.iterdir()) == ["regressor.json", "regressor.pt"]
    assert run()["reused"]
    # Weights saved before the depth-scale calibration existed are calibrated when reused, not retrained.
    meta = json.loads((folder / "regressor.json").read_text())
    weights = (folder / "regressor.pt").read_bytes()
    for key in ("depth_scale", "depth_scale_calibration"):
        meta.pop(key)
    (folder / "regressor.json").write_text(json.dumps(meta))
    reused = run()
    assert reused["reused"] and reused["depth_scale"] in DEPTH_SCALES
    assert json.loads((folder / "regressor.json").read_text())["depth_scale"] == reused["depth_scale"]
    assert torch.equal(torch.load(folder / "regressor.pt", weights_only=True)["members"][0]["state"]["head.2.bias"],
                       torch.load(io.BytesIO(weights), weights_only=True)["members"][0]["state"]["head.2.bias"])
    assert run()["reused"]
    load_regressor(folder, checkpoint)
    # Weights not recorded as trained on undistorted photos serve a pinhole capture, but are retrained for a capture
    # with a lens (the map's views were its raw photos before 2026-12-07) and refused until then.
    meta = json.loads((folder / "regressor.json").read_text())
    assert meta.pop("training_views") == "undistorted"
    (folder / "regressor.json").write_text(json.dumps(meta))
    assert run()["reused"]
    with pytest.raises(GslocError, match="distorted photos.*retrain it with `gsloc-train-regressor"):
        load_regressor(folder, checkpoint, lens_distortion=True)
    assert not train_or_reuse(point_splat, views, checkpoint, folder, quick, show_progress=False, lens_distortion=True)["reused"]
    load_regressor(folder, checkpoint, lens_distortion=True)
    checkpoint.write_bytes(b"new weights")  # retrained scene: size and modification time change
    with pytest.raises(GslocError, match="trained for another checkpoint.*gsloc-train-regressor"):
        load_regressor(folder, checkpoint)
    assert not run()["reused"]
    assert run()["reused"]
    os.utime(checkpoint, ns=(0, 0))  # same size, other modification time
    assert not run()["reused"]
    assert not run(RegressorTrainConfig(**{**quick.__dict__, "steps": 4}))["reused"]  # other settings


def test_an_ensemble_trains_its_members_side_by_side_and_aligns_all_their_points(tmp_path, point_splat,
                                                                                   point_splat_views):
    views = _views(point_splat_views)[:4]
    checkpoint = tmp_path / "step-000000001.ckpt"
    checkpoint.write_bytes(b"weights")
    single = RegressorTrainConfig(input_size=32, channels=(8, 8, 8), steps=3, batch_size=2, rendered_views=2, members=1)
    pair = RegressorTrainConfig(**{**single.__dict__, "members": 2})
    # one float32 plain network keeps the settings key it had before the options existed; two networks or the
    # compact architecture are other settings
    legacy = {k: v for k, v in single.__dict__.items() if k not in ("max_minutes", "members", "precision", "architecture")}
    legacy_key = hashlib.sha1(json.dumps(legacy, sort_keys=True, default=str).encode()).hexdigest()[:12]
    plain = RegressorTrainConfig(**{**single.__dict__, "precision": "float32", "architecture": "plain"})
    assert plain.key() == legacy_key
    assert RegressorTrainConfig(**{**plain.__dict__, "architecture": "compact"}).key() != legacy_key
    assert pair.key() != single.key()

    folders = [tmp_path / "a", tmp_path / "b"]
    metas = [train_or_reuse(point_splat, views, checkpoint, folder, pair, show_progress=False) for folder in folders]
    assert all(len(meta["members"]) == 2 and meta["steps"] == 3 for meta in metas)
    first, second = (load_regressor(folder, checkpoint) for folder in folders)
    assert len(first.nets) == 2
    # members differ (their own seeds) and a seed gives the same members whatever the threads' interleaving
    for net_a, net_b in zip(first.nets, second.nets):
        for p_a, p_b in zip(net_a.state_dict().values(), net_b.state_dict().values()):
            assert torch.equal(p_a, p_b)
    assert not torch.equal(*(next(iter(net.state_dict().values())) for net in first.nets))

    # the pose is one weighted alignment of both members' point pairs (depths times the calibrated depth scale)
    rgb, _, K, _ = point_splat_views
    prediction = first.predict(rgb[0], K[0])
    cfg, (height, width) = first.config, rgb.shape[1:3]
    _, rays = grid_rays(K[0], width, height, grid_size(cfg))
    src, dst, weights = [], [], []
    for net in first.nets:  # each member's camera-frame points (on the cells' rays), scene points and weights
        depth, points, logits = net(resize_image(rgb[0], cfg.input_height, cfg.input_width))
        focal_ratio = float(K[0, 0, 0]) * cfg.input_width / width / cfg.focal_input * first.meta["depth_scale"]
        src.append(((depth[0] * focal_ratio)[..., None] * rays).reshape(-1, 3))
        dst.append(points.reshape(-1, 3))
        weights.append(torch.sigmoid(logits).reshape(-1))
    src, dst = torch.cat(src)[None].double().detach(), torch.cat(dst)[None].double().detach()
    weights = torch.cat(weights)[None].double().detach()
    assert prediction.weights.shape[0] == weights.shape[1] == 2 * grid_size(cfg)[0] * grid_size(cfg)[1]
    R, t, _ = robust_rigid_alignment(src, dst, weights, rounds=0)
    expected = opencv_c2w_to_opengl_c2w(torch.cat([R[0], t[0, :, None]], dim=1)).float()
    torch.testing.assert_close(prediction.c2w, expected, atol=1e-5, rtol=0)

    with pytest.raises(GslocError, match="members must be at least 1"):
        train_or_reuse(point_splat, views, checkpoint, tmp_path / "c", RegressorTrainConfig(
            **{**single.__dict__, "members": 0}), show_progress=False)


def test_both_architectures_predict_the_same_grid_and_weights_saved_before_the_option_load_as_plain(tmp_path,
                                                                                                     point_splat_views):
    rgb, _, K, _ = point_splat_views
    config = RegressorNetConfig(input_height=48, input_width=64, channels=(8, 16, 16), focal_input=float(K[0, 0, 0]))
    nets = {name: SceneRegressorNet(replace(config, architecture=name)) for name in ("plain", "compact")}
    images = torch.rand(2, 3, 48, 64)
    for net in nets.values():
        depth, points, logits = net.eval()(images)
        assert depth.shape == logits.shape == (2, 6, 8) and points.shape == (2, 6, 8, 3)
    # compact: fewer weights (and multiply-adds) than plain for the same channels
    assert sum(p.numel() for p in nets["compact"].parameters()) < 0.7 * sum(p.numel() for p in nets["plain"].parameters())
    with pytest.raises(ValueError, match="unknown regressor architecture"):
        SceneRegressorNet(replace(config, architecture="huge"))

    # a format-2 file (written before the option existed: no "architecture" in the network config) is a plain net
    checkpoint = tmp_path / "step-000000001.ckpt"
    checkpoint.write_bytes(b"weights")
    old_config = {k: v for k, v in asdict(nets["plain"].config).items() if k != "architecture"}
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"format": 2, "members": [{"net": old_config, "state": nets["plain"].state_dict()}]}, folder / "regressor.pt")
    (folder / "regressor.json").write_text(json.dumps({"format": 2, "checkpoint": checkpoint_fingerprint(checkpoint)}))
    loaded = load_regressor(folder, checkpoint)
    assert loaded.config.architecture == "plain"
    torch.testing.assert_close(loaded.predict(rgb[0], K[0]).c2w,
                               SceneRegressor(nets["plain"]).predict(rgb[0], K[0]).c2w)
    # what is saved now names its architecture and loads back as the same network
    save_regressor(tmp_path / "new", nets["compact"], {"checkpoint": checkpoint_fingerprint(checkpoint)})
    reloaded = load_regressor(tmp_path / "new", checkpoint)
    assert reloaded.config.architecture == "compact"
    torch.testing.assert_close(reloaded.predict(rgb[0], K[0]).c2w, SceneRegressor(nets["compact"]).predict(rgb[0], K[0]).c2w)


def test_bfloat16_training_keeps_the_heads_in_float32_and_is_its_own_setting(tmp_path, point_splat, point_splat_views,
                                                                           monkeypatch):
    base = RegressorTrainConfig(input_size=32, channels=(8, 8, 8), steps=4, batch_size=2, rendered_views=2, members=1)
    f32, bf16 = (RegressorTrainConfig(**{**base.__dict__, "precision": p}) for p in ("float32", "bfloat16"))
    assert f32.body_dtype() == torch.float32 and bf16.body_dtype() == torch.bfloat16
    assert f32.key() != bf16.key()  # other arithmetic, other weights
    assert base.key() == (bf16 if cpu_has_native_bfloat16() else f32).key()  # "auto" is what this CPU does well
    # the default ensemble: three networks where bfloat16 makes room for them in the budget, else two; with the
    # plain architecture two in float32 on AVX-512 and one on narrower CPUs (where two would each get about half
    # their steps)
    assert RegressorTrainConfig(precision="bfloat16").member_count() == 3
    for capability, plain_count in (("AVX512", 2), ("AVX2", 1), ("DEFAULT", 1)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert RegressorTrainConfig(precision="float32", architecture="plain").member_count() == plain_count
        assert RegressorTrainConfig(precision="float32").member_count() == 2
    monkeypatch.undo()
    assert RegressorTrainConfig(precision="bfloat16", members=2).member_count() == 2
    assert RegressorTrainConfig(precision="float32", members=3).member_count() == 3

    views = _views(point_splat_views)[:4]
    checkpoint = tmp_path / "step-000000001.ckpt"
    checkpoint.write_bytes(b"weights")
    meta = train_or_reuse(point_splat, views, checkpoint, tmp_path / "bf16", bf16, show_progress=False)
    assert meta["precision"] == "bfloat16" and meta["skipped_steps"] < bf16.steps
    regressor = load_regressor(tmp_path / "bf16", checkpoint)
    net = regressor.nets[0]
    images = torch.rand(2, 3, net.config.input_height, net.config.input_width)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: the body in bfloat16, the heads not
        assert net.body(images).dtype == torch.bfloat16
        outputs = net(images)
    assert all(x.dtype == torch.float32 and bool(torch.isfinite(x).all()) for x in outputs)
    # inference is float32, and close to what the same weights give under the training's autocast
    depth, points, _ = net(images)
    assert depth.dtype == torch.float32
    torch.testing.assert_close(points, outputs[1], atol=0.05 * net.config.scale, rtol=0)
    rgb, _, K, _ = point_splat_views
    assert torch.isfinite(regressor.predict(rgb[0], K[0]).c2w).all()


@pytest.mark.parametrize("command", [["ns-localize", "--init", "regression"], ["ns-localize", "--method", "regression"],
                                     ["gsloc-bench", "--methods", "regression"],
                                     ["gsloc-bench", "--methods", "gsloc", "--protocol", "global", "--global-init", "regression"]])
def test_regression_without_weights_is_one_clear_error(command, tmp_path_factory, embedded_scene, write_fake_run,
                                                         capsys, tmp_path):
    from nerfstudio_gsloc.errors import run_cli
    from nerfstudio_gsloc.scripts import bench

    config = write_fake_run(tmp_path_factory.mktemp("fake_run"), Path(embedded_scene.dataset).parent,
                            {"transform": np.eye(4)[:3].tolist(), "scale": 1.0})
    argv = ["--load-config", config, "--output-dir", tmp_path / "out", *command[1:]]
    if command[0] == "ns-localize":
        code, _, err = run_ns_localize(argv, capsys)
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: bench.main([str(a) for a in argv]))
        code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 1, err
    assert "no regressor weights in" in err and f"gsloc-train-regressor --load-config {config}" in err
    assert not (tmp_path / "out").exists()  # stopped before writing anything
