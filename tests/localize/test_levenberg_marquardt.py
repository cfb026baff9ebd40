"""Tests of the Levenberg-Marquardt final level (``--localization.optim.final-solver lm``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.lm_residuals import LMResiduals
from nerfstudio_gsloc.localize.objective import LossConfig
from nerfstudio_gsloc.localize.result import STATUS_CONVERGED
from nerfstudio_gsloc.rendering.splat_render import frustum_subset, render_splat_model


def _noisy(query, seed: int):
    """``query`` with pixel noise (sigma 0.05), as an imperfect model leaves: the loss has a floor no step gets under."""
    noise = torch.randn(query.image.shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    return dataclasses.replace(query, image=(query.image + noise).clamp(0, 1))


def test_irls_weights_reproduce_the_loss_gradient():
    """``W r`` is the gradient of ``sum(scale * rho(r))``: the quadratic model LM solves has the loss's slope, on
    both sides of the smooth-L1 floor and of the anchor's Huber threshold."""
    losses = LossConfig(anchor_weight=0.3, huber_delta_px=2.0)
    terms = LMResiduals(losses, l1_floor=0.03)
    r = torch.tensor([0.5, -0.2, 0.01, -0.004, 0.0, 1.5, -4.0, 0.7], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05], dtype=torch.float64)
    anchor_count = 3
    loss = (scale * terms.rho(r, anchor_count)).sum()
    (grad,) = torch.autograd.grad(loss, r)
    W = terms.irls_weights(r.detach(), scale, anchor_count)
    torch.testing.assert_close(W * r.detach(), grad)


def test_lm_recovers_a_small_offset_and_is_deterministic(point_splat, rendered_queries, refine_only):
    """From 1 deg / 0.02 units off, LM's final level brings a query well within a tenth of that, converges on
    its own (before the iteration limit), logs its steps, and gives the same pose twice."""
    query = rendered_queries[0]
    start = initial_poses([query], "perturb", angle_deg=1.0, translation=0.02, seed=3)
    first = refine_only(40, final_solver="lm").setup(model=point_splat).localize([query], start)[0]
    again = refine_only(40, final_solver="lm").setup(model=point_splat).localize([query], start)[0]
    print("lm:", first.rot_err_deg, first.trans_err, first.iterations, first.status)
    assert first.rot_err_deg < 0.1 and first.trans_err < 0.002, (first.rot_err_deg, first.trans_err)
    assert first.status == STATUS_CONVERGED and first.iterations < 40
    assert {row["event"] for row in first.trace} & {"lm_step"}
    assert torch.equal(first.c2w, again.c2w)


def test_lm_uses_depth_and_never_ends_worse_than_its_start(point_splat, rendered_queries, refine_only):
    """With RGB-D residuals LM still recovers the pose; from the true pose it stays there (the best pose kept
    includes the start, so no step can make it worse)."""
    query = rendered_queries[1]
    start = initial_poses([query], "perturb", angle_deg=1.0, translation=0.02, seed=5)
    rgbd = refine_only(40, depth=True, final_solver="lm").setup(model=point_splat).localize([query], start)[0]
    assert rgbd.rot_err_deg < 0.1 and rgbd.trans_err < 0.002, (rgbd.rot_err_deg, rgbd.trans_err)
    at_truth = refine_only(40, final_solver="lm").setup(model=point_splat).localize([query], [query.gt_c2w])[0]
    assert at_truth.rot_err_deg < 0.02 and at_truth.trans_err < 0.0005, (at_truth.rot_err_deg, at_truth.trans_err)


def test_frustum_subset_renders_like_the_whole_model_near_its_views(point_splat, rendered_queries):
    """The Gaussians kept for a query's view (and poses a degree away) render the same images as the whole model,
    and the subset leaves some of the room out (what makes LM's renders cheaper)."""
    query = rendered_queries[0]
    subset = frustum_subset(point_splat, query.gt_c2w[None, :3], query.K[None], query.width, query.height)
    assert 0 < subset.means.shape[0] < point_splat.means.shape[0]
    near = initial_poses([query], "perturb", angle_deg=1.0, translation=0.02, seed=2)[0]
    poses = torch.stack([query.gt_c2w[:3], near[:3]])
    Ks = query.K[None].expand(2, 3, 3)
    with torch.no_grad():
        whole = render_splat_model(point_splat, poses, Ks, query.width, query.height)
        part = render_splat_model(subset, poses, Ks, query.width, query.height)
    torch.testing.assert_close(part.rgb, whole.rgb, atol=1e-4, rtol=0)
    torch.testing.assert_close(part.depth, whole.depth, atol=1e-4, rtol=0)


def test_lm_stops_when_its_model_promises_almost_nothing(point_splat, rendered_queries, refine_only):
    """From a pose a hair off the optimum, the steps the model proposes are rejected (they promise under
    ``lm_ftol`` of the loss): LM ends converged after a few renders instead of growing its damping render after
    render, and ends as close to the truth (the noise sets the floor at ~0.07 deg on this 64x48 scene)."""
    query = _noisy(rendered_queries[1], seed=0)
    start = initial_poses([query], "perturb", angle_deg=0.05, translation=0.001, seed=7)
    quick = refine_only(40, final_solver="lm").setup(model=point_splat).localize([query], start)[0]
    patient = refine_only(40, final_solver="lm", lm_ftol=0.0).setup(model=point_splat).localize([query], start)[0]
    print("ftol:", quick.iterations, quick.rot_err_deg, "| none:", patient.iterations, patient.rot_err_deg)
    assert quick.status == STATUS_CONVERGED
    assert quick.iterations < patient.iterations
    assert quick.rot_err_deg < patient.rot_err_deg + 0.01 and quick.trans_err < patient.trans_err + 0.0005


def test_lm_does_not_measure_a_new_jacobian_at_its_noise_floor(point_splat, rendered_queries, refine_only):
    """A step of a kept (chord) Jacobian that is rejected while promising under ``lm_ftol`` of the loss ends the
    query: at the noise floor a fresh Jacobian (6 more renders) promises as little. Without ``lm_ftol`` LM measures
    one again (``lm_refresh``) and renders more for a pose no closer to the truth. (Only finite-difference
    Jacobians are kept across steps; a render-gradient one is taken from every accepted trial's render.)"""
    query = _noisy(rendered_queries[1], seed=2)
    start = initial_poses([query], "perturb", angle_deg=0.5, translation=0.005, seed=3)
    fd = dict(final_solver="lm", lm_jacobian="finite-difference")
    quick = refine_only(40, **fd).setup(model=point_splat).localize([query], start)[0]
    patient = refine_only(40, lm_ftol=0.0, **fd).setup(model=point_splat).localize([query], start)[0]
    events = lambda result: [row["event"] for row in result.trace]  # noqa: E731
    print("ftol:", events(quick), quick.rot_err_deg, "| none:", events(patient), patient.rot_err_deg)
    assert quick.status == STATUS_CONVERGED
    assert "lm_refresh" in events(patient) and "lm_refresh" not in events(quick)
    assert events(quick).count("lm_step") >= 2  # it ended on a kept Jacobian, not on its first one
    assert quick.rot_err_deg < patient.rot_err_deg + 0.01 and quick.trans_err < patient.trans_err + 0.0005


def test_lm_gain_tolerance_ends_a_query_whose_steps_gain_almost_nothing(point_splat, rendered_queries, refine_only):
    """With ``lm_gain_tol`` an accepted step that lowered the loss by less than that fraction ends the query (the
    tracking preset's stop: a frame predicted within a hair of its optimum takes one or two steps, not a crawl of
    steps gaining 0.2% each); the pose is as good as the one the crawl reaches."""
    query = _noisy(rendered_queries[1], seed=1)
    start = initial_poses([query], "perturb", angle_deg=0.1, translation=0.002, seed=11)
    crawl = refine_only(40, final_solver="lm", lm_ftol=0.0).setup(model=point_splat).localize([query], start)[0]
    quick = refine_only(40, final_solver="lm", lm_ftol=0.0, lm_gain_tol=0.05).setup(model=point_splat).localize([query], start)[0]
    steps = lambda result: sum(row["event"] == "lm_step" for row in result.trace)  # noqa: E731
    print("gain tol:", quick.iterations, steps(quick), quick.rot_err_deg, "| none:", crawl.iterations, steps(crawl), crawl.rot_err_deg)
    assert quick.status == STATUS_CONVERGED
    assert quick.iterations < crawl.iterations
    assert quick.rot_err_deg < crawl.rot_err_deg + 0.02 and quick.trans_err < crawl.trans_err + 0.0005
