"""Tests that the localization losses measure the right thing and that their gradients point the right way."""

import math

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.localize.losses import apply_color_affine, depth_loss, photometric_loss, reprojection_loss
from nerfstudio_gsloc.localize.pose import PoseCorrection, perturb_pose
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error

H, W = 40, 48


def _smooth_image(shift_x: torch.Tensor) -> torch.Tensor:
    """A smooth RGB pattern ``f(x - shift_x, y)`` of shape [1, H, W, 3], differentiable in ``shift_x``."""
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    x = xs - shift_x
    channels = []
    for c in range(3):
        value = (
            0.5
            + 0.2 * torch.sin(2 * math.pi * x / 17.0 + 0.7 * c) * torch.cos(2 * math.pi * ys / 23.0)
            + 0.15 * torch.sin(2 * math.pi * (x + ys) / 11.0 + c)
        )
        channels.append(value)
    return torch.stack(channels, dim=-1)[None]


def _ones(shape):
    return torch.ones(*shape)


@pytest.mark.parametrize("start, true", [(0.0, 0.4), (0.8, 0.4)])
def test_photometric_gradient_reduces_subpixel_misalignment(start, true):
    query = _smooth_image(torch.tensor(true))
    alpha = _ones((1, H, W, 1))
    shift = torch.tensor(start, requires_grad=True)
    loss0 = photometric_loss(_smooth_image(shift), query, alpha)
    assert loss0.shape == (1,) and loss0.item() > 1e-3
    loss0.sum().backward()
    # The gradient points away from the true shift, so a descent step moves toward it.
    assert shift.grad.item() * (start - true) > 0
    with torch.no_grad():
        stepped = shift - 0.1 * torch.sign(shift.grad)
    assert abs(stepped.item() - true) < abs(start - true)
    assert photometric_loss(_smooth_image(stepped), query, alpha).item() < loss0.item()
    # Zero at perfect alignment.
    assert photometric_loss(query, query, alpha).item() == pytest.approx(0.0, abs=1e-6)


def test_photometric_masking_ignores_low_alpha_and_query_mask():
    query = _smooth_image(torch.tensor(0.0))
    render = _smooth_image(torch.tensor(0.3))
    alpha = _ones((1, H, W, 1))
    alpha[:, :, : W // 3] = 0.2  # left third not rendered
    base = photometric_loss(render, query, alpha)
    garbage = render.clone()
    garbage[:, :, : W // 3] = torch.rand(1, H, W // 3, 3)
    # Garbage where alpha is low changes nothing, for L1 and SSIM alike.
    torch.testing.assert_close(photometric_loss(garbage, query, alpha), base)
    # Without masking, the garbage would matter.
    assert not torch.allclose(photometric_loss(garbage, query, torch.ones_like(alpha)), base)
    # Query mask (L1 only, exact): garbage in masked-out query pixels is ignored.
    qmask = _ones((1, H, W, 1))
    qmask[:, : H // 2] = 0.0
    l1_base = photometric_loss(render, query, torch.ones_like(alpha), qmask, ssim_weight=0.0)
    bad_query = query.clone()
    bad_query[:, : H // 2] = 1.0
    masked_bad = photometric_loss(render, bad_query, torch.ones_like(alpha), qmask, ssim_weight=0.0)
    torch.testing.assert_close(masked_bad, l1_base)
    expected = (render - query).abs().mean(-1)[:, H // 2 :].mean()
    torch.testing.assert_close(l1_base, expected[None])
    # Empty mask -> 0 and still differentiable.
    empty = photometric_loss(render.requires_grad_(), query, torch.zeros_like(alpha))
    assert empty.item() == 0.0
    empty.sum().backward()


def test_photometric_per_query_independent():
    q0, q1 = _smooth_image(torch.tensor(0.0)), _smooth_image(torch.tensor(1.0))
    render = torch.cat([q0, q0])
    query = torch.cat([q0, q1])
    losses = photometric_loss(render, query, _ones((2, H, W, 1)))
    assert losses.shape == (2,)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6) and losses[1].item() > 1e-2


def test_color_affine_absorbs_exposure_change():
    render = _smooth_image(torch.tensor(0.0))
    # Exposure/white-balance change with a little channel cross-talk: query = A @ rgb + b.
    gain = torch.tensor([[0.7, 0.1, 0.0], [0.0, 0.8, 0.0], [0.05, 0.0, 0.6]])
    bias = torch.tensor([0.1, 0.05, 0.15])
    query = render @ gain.T + bias
    alpha = _ones((1, H, W, 1))
    uncorrected = photometric_loss(render, query, alpha)
    exact = torch.cat([gain, bias[:, None]], dim=1)[None]
    assert uncorrected.item() > 0.03
    assert photometric_loss(render, query, alpha, color_affine=exact).item() < 1e-5
    torch.testing.assert_close(apply_color_affine(render, exact), query)
    # Learning the affine from identity reduces the loss a lot.
    affine = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)[None].clone().requires_grad_()
    opt = torch.optim.Adam([affine], lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        photometric_loss(render, query, alpha, color_affine=affine).sum().backward()
        opt.step()
    assert photometric_loss(render, query, alpha, color_affine=affine.detach()).item() < 0.2 * uncorrected.item()


def _depth_map() -> torch.Tensor:
    """[1, H, W, 1] depth: a tilted plane with a raised box (a depth edge)."""
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    depth = 3.0 + 0.02 * xs + 0.01 * ys
    depth[10:25, 15:30] -= 1.0
    return depth[None, :, :, None]


def test_depth_loss_zero_at_identity_and_grows_with_shift():
    depth = _depth_map()
    alpha = _ones((1, H, W, 1))
    assert depth_loss(depth, depth, alpha).item() == pytest.approx(0.0, abs=1e-7)
    shifted = torch.roll(depth, shifts=2, dims=2)
    assert depth_loss(shifted, depth, alpha).item() > 0.05
    # The contour term sees the moved edge.
    assert depth_loss(shifted, depth, alpha).item() > depth_loss(shifted, depth, alpha, edge_weight=0.0).item() + 0.01
    # A constant offset has identical edges: the loss is exactly the offset.
    assert depth_loss(depth + 0.25, depth, alpha).item() == pytest.approx(0.25, abs=1e-5)


def test_depth_loss_ignores_masked_pixels():
    depth = _depth_map()
    alpha = _ones((1, H, W, 1))
    alpha[:, :, :10] = 0.0
    query = depth.clone()
    query[:, 30:, :] = 0.0  # missing query depth
    render = depth + 0.1
    base = depth_loss(render, query, alpha)
    garbage = render.clone()
    garbage[:, :, :10] = 100.0 * torch.rand(1, H, 10, 1)
    garbage[:, 30:, :] = -5.0
    torch.testing.assert_close(depth_loss(garbage, query, alpha), base)
    assert base.item() == pytest.approx(0.1, abs=1e-5)
    # NaN renders in masked regions do not leak into loss or gradient.
    nan_render = render.clone()
    nan_render[:, :, :10] = float("nan")
    nan_render.requires_grad_()
    out = depth_loss(nan_render, query, alpha)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(nan_render.grad).all()
    # All masked -> 0.
    assert depth_loss(render, query, torch.zeros_like(alpha)).item() == 0.0


def _synthetic_correspondences(c2w_gl: torch.Tensor, K: torch.Tensor, num: int, seed: int):
    """World points in front of an OpenGL c2w and their pixel projections, computed independently."""
    gen = torch.Generator().manual_seed(seed)
    z = 2.0 + 3.0 * torch.rand(num, generator=gen, dtype=torch.float64)
    x = (torch.rand(num, generator=gen, dtype=torch.float64) - 0.5) * z
    y = (torch.rand(num, generator=gen, dtype=torch.float64) - 0.5) * z
    cam_cv = torch.stack([x, y, z], dim=-1)
    u = K[0, 0] * x / z + K[0, 2]
    v = K[1, 1] * y / z + K[1, 2]
    # OpenCV camera axes are the OpenGL ones with y and z flipped.
    rot_cv = c2w_gl[:, :3] * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    world = cam_cv @ rot_cv.T + c2w_gl[:, 3]
    return world, torch.stack([u, v], dim=-1)


def test_reprojection_loss_gradient_moves_pose_to_ground_truth():
    K = torch.tensor([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    gt = torch.cat(
        [axis_angle_to_rotation_matrix(torch.tensor([[0.2, 0.5, -0.1], [-0.3, 0.1, 0.4]], dtype=torch.float64)),
         torch.tensor([[[0.5], [0.2], [1.0]], [[-1.0], [0.3], [0.0]]], dtype=torch.float64)],
        dim=-1,
    )
    pts0, kp0 = _synthetic_correspondences(gt[0], K, 60, seed=0)
    pts1, kp1 = _synthetic_correspondences(gt[1], K, 60, seed=1)
    points = torch.cat([pts0, pts1]).float()
    kpts = torch.cat([kp0, kp1]).float()
    index = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(60, dtype=torch.long)])
    Ks = K.float()[None].repeat(3, 1, 1)
    gt3 = torch.cat([gt, gt[:1]]).float()  # query 2 has no points
    at_gt = reprojection_loss(points, kpts, index, gt3, Ks, num_queries=3)
    assert at_gt.shape == (3,)
    assert at_gt.abs().max().item() < 1e-4

    init = perturb_pose(gt3, 4.0, 0.15, torch.Generator().manual_seed(3))
    corr = PoseCorrection(3)
    opt = torch.optim.Adam([{"params": [corr.rotation], "lr": 3e-3}, {"params": [corr.translation], "lr": 5e-3}])
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = reprojection_loss(points, kpts, index, corr(init), Ks, num_queries=3)
        first = loss.detach() if first is None else first
        loss.sum().backward()
        opt.step()
    assert first[:2].min().item() > 1.0 and first[2].item() == 0.0
    final = corr(init).detach()
    rot_before, rot_after = rotation_error_deg(init[:2], gt3[:2]), rotation_error_deg(final[:2], gt3[:2])
    trans_before, trans_after = translation_error(init[:2], gt3[:2]), translation_error(final[:2], gt3[:2])
    assert (rot_after < 0.1 * rot_before).all(), (rot_before, rot_after)
    assert (trans_after < 0.1 * trans_before).all(), (trans_before, trans_after)
    # The query without points got no gradient and did not move.
    torch.testing.assert_close(final[2], init[2])


def test_reprojection_loss_huber_and_points_behind_camera():
    K = torch.tensor([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])
    c2w = torch.eye(4)[None, :3]  # OpenGL: camera looks along world -z
    points = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, 2.0]])  # in front, behind
    index = torch.zeros(2, dtype=torch.long)
    # Projection of the front point is the principal point (50, 40); residual 10 px along x.
    kpts = torch.tensor([[60.0, 40.0], [0.0, 0.0]])
    loss = reprojection_loss(points, kpts, index, c2w, K[None], huber_delta_px=2.0)
    assert loss.item() == pytest.approx(2.0 * (10.0 - 1.0), rel=1e-5)  # linear Huber branch, behind point ignored
    small = reprojection_loss(points, torch.tensor([[51.0, 40.0], [0.0, 0.0]]), index, c2w, K[None])
    assert small.item() == pytest.approx(0.5, rel=1e-4)  # quadratic branch: 0.5 * 1^2
    # y is down in the image: a point above the camera (+y world) projects above the principal point.
    up = reprojection_loss(torch.tensor([[0.0, 0.2, -2.0]]), torch.tensor([[50.0, 30.0]]), index[:1], c2w, K[None])
    assert up.item() == pytest.approx(0.0, abs=1e-6)
    # No points at all: zeros, still backpropagates.
    pose = c2w.clone().requires_grad_()
    empty = reprojection_loss(torch.zeros(0, 3), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), pose, K[None])
    assert empty.shape == (1,) and empty.item() == 0.0
    empty.sum().backward()
