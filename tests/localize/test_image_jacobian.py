"""Tests of the render-gradient Jacobian (``--localization.optim.lm-jacobian render-gradient``)."""

from __future__ import annotations

import math

import torch

import nerfstudio_gsloc.localize.levenberg_marquardt as lm_module
from nerfstudio_gsloc.localize.image_jacobian import image_gradients, pixel_motion
from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.levenberg_marquardt import LevenbergMarquardt
from nerfstudio_gsloc.localize.objective import LossConfig
from nerfstudio_gsloc.localize.result import STATUS_CONVERGED
from nerfstudio_gsloc.localize.schedule import Stage
from nerfstudio_gsloc.localize.state import BatchState


def test_image_gradients_of_a_ramp_are_its_slopes():
    """Central differences inside, one-sided at the borders: exact on a linear image in x and y."""
    y, x = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    gx, gy = image_gradients((0.3 * x - 0.2 * y)[..., None])
    torch.testing.assert_close(gx, torch.full_like(gx, 0.3))
    torch.testing.assert_close(gy, torch.full_like(gy, -0.2))


def test_pixel_motion_of_sideways_and_forward_camera_steps():
    """A camera stepping right by t sees a point at depth z move left by f t / z pixels and keep its depth; a step
    forward (OpenGL -z) shortens every depth by t and pushes off-centre points away from the principal point."""
    f, cx, cy = 100.0, 32.0, 24.0
    K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    base = torch.eye(4)[:3]
    step = 1e-5
    right, forward = base.clone(), base.clone()
    right[0, 3] += step
    forward[2, 3] -= step
    moved = torch.stack([right, forward, base, base, base, base])
    steps = torch.tensor([step, step, 1.0, 1.0, 1.0, 1.0])
    pixels = torch.tensor([[31, 23], [50, 10]])  # pixel centres at +0.5: (31.5, 23.5) and (50.5, 10.5)
    depth = torch.tensor([2.0, 4.0])
    depth_map = torch.ones(48, 64)
    depth_map[pixels[:, 1], pixels[:, 0]] = depth
    flow, dz = pixel_motion(base, moved, steps, K, depth_map, pixels)
    torch.testing.assert_close(flow[0, :, 0], -f / depth.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flow[0, :, 1], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(dz[0], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(dz[1], -torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # forward: u - cx grows as 1 / z, so du = (u - cx) / z per unit step
    u_off = torch.tensor([31.5 - cx, 50.5 - cx], dtype=torch.float64)
    torch.testing.assert_close(flow[1, :, 0], u_off / depth.double(), rtol=1e-4, atol=1e-6)


def _solver(jacobian: str, point_splat):
    losses = LossConfig(anchor_weight=0.0)
    render = lambda c2w, Ks, w, h: lm_module.render_splat_model(point_splat, c2w, Ks, w, h)  # noqa: E731
    return LevenbergMarquardt(losses, step_px=0.5, render=render, jacobian=jacobian)


def test_render_gradient_jacobian_agrees_with_finite_differences(point_splat, rendered_queries):
    """At a pose near the optimum the Jacobian taken from one render's gradients points the same way as the one
    measured with 6 moved renders: each parameter's column (colour rows, then depth rows) has a cosine similarity
    above 0.7 with its finite-difference counterpart (0.73-0.86 measured on this scene of half-pixel splats, where
    a warp is the roughest approximation of a moved render), and the Gauss-Newton steps agree in direction (0.91).
    A wrong sign, axis or pixel order makes them unrelated or opposite."""
    query = rendered_queries[1]
    start = initial_poses([query], "perturb", angle_deg=0.5, translation=0.01, seed=4)
    batch = BatchState([query], start, torch.device("cpu"))
    stage = Stage("refine", 1, 1, 0.0, 1.0, 1.0, 0.0, 0.0, False, True)
    K, w, h = batch.Ks, query.width, query.height
    lins = {}
    for mode in ("finite-difference", "render-gradient"):
        solver = _solver(mode, point_splat)
        (lins[mode],) = solver.linearise(batch, stage, [0], K, w, h, min_coverage=0.0)
    fd, rg = lins["finite-difference"], lins["render-gradient"]
    assert fd.J.shape == rg.J.shape and torch.equal(fd.r, rg.r)
    cos = torch.nn.functional.cosine_similarity(fd.J, rg.J, dim=0)
    print("column cosines:", cos.tolist())
    step_fd = solver.solve(fd, 1e-3)[0]
    step_rg = solver.solve(rg, 1e-3)[0]
    step_cos = float(torch.nn.functional.cosine_similarity(step_fd, step_rg, dim=0))
    print("step cosine:", step_cos, step_fd.tolist(), step_rg.tolist())
    assert bool((cos > 0.7).all()), cos
    assert step_cos > 0.85


def test_lm_with_the_render_gradient_jacobian_recovers_an_offset_with_fewer_renders(
    point_splat, rendered_queries, refine_only, monkeypatch
):
    """From 1 deg / 0.02 units off, LM with the render-gradient Jacobian reaches the same accuracy bound as with
    finite differences, converged, while rendering fewer cameras (one per step instead of 7 per Jacobian)."""
    query = rendered_queries[0]
    start = initial_poses([query], "perturb", angle_deg=1.0, translation=0.02, seed=3)
    counts = {}
    original = lm_module.render_splat_model

    def counting(model, c2w, *args, **kwargs):
        counts[mode] = counts.get(mode, 0) + c2w.shape[0]
        return original(model, c2w, *args, **kwargs)

    monkeypatch.setattr(lm_module, "render_splat_model", counting)
    results = {}
    for mode in ("finite-difference", "render-gradient"):
        config = refine_only(40, final_solver="lm", lm_jacobian=mode)
        results[mode] = config.setup(model=point_splat).localize([query], start)[0]
    fast = results["render-gradient"]
    print("renders:", counts, "errors:", {m: (r.rot_err_deg, r.trans_err) for m, r in results.items()})
    assert fast.rot_err_deg < 0.1 and fast.trans_err < 0.002, (fast.rot_err_deg, fast.trans_err)
    assert fast.status == STATUS_CONVERGED
    assert counts["render-gradient"] < counts["finite-difference"] / 2
    assert not math.isnan(fast.rot_err_deg)
