"""Tests of the pose-inversion loop: pyramid helpers, batching, failure handling, and end-to-end recovery."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.objective import LossConfig
from nerfstudio_gsloc.localize.optimizer import group_queries
from nerfstudio_gsloc.localize.result import STATUS_FAILED
from nerfstudio_gsloc.localize.schedule import (
    OptimConfig,
    ScheduleConfig,
    build_stages,
    downsample,
    downsample_depth,
    scale_intrinsics,
)
from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig, load_preset
from nerfstudio_gsloc.localize.queries import FrameTransform, Query, load_transforms_queries
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


def _project(K: torch.Tensor, point_cam: torch.Tensor) -> torch.Tensor:
    return (K @ point_cam)[:2] / point_cam[2]


def test_scale_intrinsics_keeps_continuous_pixel_coordinates():
    K = torch.tensor([[[50.0, 0.0, 32.0], [0.0, 52.0, 24.0], [0.0, 0.0, 1.0]]])
    point = torch.tensor([0.3, -0.2, 2.0])
    for scale, (w, h) in [(1, (64, 48)), (2, (32, 24)), (4, (16, 12)), (3, (21, 16))]:
        K_level, width, height = scale_intrinsics(K, 64, 48, scale)
        assert (width, height) == (w, h)
        # A point's continuous image position scales exactly with the image size (pixel centres at +0.5).
        expected = _project(K[0], point) * torch.tensor([w / 64, h / 48])
        torch.testing.assert_close(_project(K_level[0], point), expected)


def test_downsample_averages_and_depth_ignores_holes():
    images = torch.arange(16.0).reshape(1, 4, 4, 1)
    torch.testing.assert_close(downsample(images, 2, 2)[0, :, :, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    depth = torch.tensor([[2.0, 0.0], [4.0, 0.0]]).reshape(1, 2, 2, 1)
    # One cell: two valid pixels (mean 3) and two holes -> the valid mean, not diluted by zeros.
    assert downsample_depth(depth, 1, 1).item() == pytest.approx(3.0)
    mostly_holes = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)
    assert downsample_depth(mostly_holes, 1, 1).item() == 0.0


def _query(index: int, width: int, height: int, background=None) -> Query:
    return Query(name=f"q{index}", image_path=Path(f"q{index}.png"), image=torch.zeros(height, width, 3),
                 K=torch.eye(3), width=width, height=height, background=background, index=index)


def test_group_queries_by_size_and_background_in_batches():
    white = torch.ones(3)
    queries = [_query(0, 8, 6), _query(1, 10, 6), _query(2, 8, 6), _query(3, 8, 6), _query(4, 8, 6, white), _query(5, 8, 6)]
    batches = group_queries(queries, batch_size=2)
    assert batches == [[0, 2], [3, 5], [1], [4]]
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_build_stages_follows_the_schedule():
    stages = build_stages(LossConfig(), ScheduleConfig(), OptimConfig())
    assert [s.name for s in stages] == ["matching", "refine@1/4", "refine@1/2", "refine@1/1"]
    assert [s.final for s in stages] == [False, False, False, True]
    assert stages[0].scale is None and stages[0].photometric_weight == 0.0 and stages[0].pnp_jump
    # Matching early, photometric/depth late.
    assert stages[0].matching_weight > stages[-1].matching_weight
    assert stages[-1].photometric_weight > 0 and stages[-1].depth_weight > 0
    no_match = build_stages(LossConfig(matching=False), ScheduleConfig(), OptimConfig())
    assert [s.name for s in no_match] == ["refine@1/4", "refine@1/2", "refine@1/1"]
    with pytest.raises(ValueError):
        build_stages(LossConfig(), ScheduleConfig(pyramid_scales=(2, 1), pyramid_iterations=(5,)), OptimConfig())


def test_presets_load_and_override(tmp_path):
    for name in ("default", "fast", "rgbd"):
        config = load_preset(name)
        assert isinstance(config, PoseInversionConfig)
        build_stages(config.losses, config.schedule, config.optim)
    # default.yaml spells out the built-in defaults; it must not drift from them.
    assert load_preset("default") == PoseInversionConfig()
    assert load_preset("fast").optim.batch_size >= PoseInversionConfig().optim.batch_size
    custom = tmp_path / "mine.yaml"
    custom.write_text("schedule:\n  pyramid_scales: [1]\n  pyramid_iterations: [7]\n  refine_matching_weight: []\n")
    config = load_preset(custom)
    assert config.schedule.pyramid_scales == (1,) and config.schedule.pyramid_iterations == (7,)
    custom.write_text("schedule:\n  no_such_thing: 1\n")
    with pytest.raises(GslocError, match="no_such_thing"):
        load_preset(custom)
    with pytest.raises(GslocError, match="unknown preset"):
        load_preset("does-not-exist")


# ----------------------------------------------------------------------------------------------------------
# the loop on a Gaussian model fitted directly to the embedded scene (see conftest.point_splat)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def novel_queries(embedded_scene):
    return load_transforms_queries(embedded_scene.queries, FrameTransform.identity())


@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_failures_are_per_query_and_the_batch_goes_on(point_splat, novel_queries, refine_only, solver):
    """A NaN start and a camera looking out of the room fail with reasons; the third query is refined."""
    queries = novel_queries[:3]
    starts = initial_poses(queries, "perturb", angle_deg=1.0, translation=0.02, seed=0)
    starts[0] = torch.full((3, 4), float("nan"))
    # Step 1 km back and turn around: the room is behind the camera.
    away = starts[1].clone()
    away[:, 3] = away[:, 3] + 1000.0 * away[:, 2]
    away[:, :3] = away[:, :3] * torch.tensor([-1.0, 1.0, -1.0])
    starts[1] = away
    inverter = refine_only(4, batch_size=3, final_solver=solver).setup(model=point_splat)
    results = inverter.localize(queries, starts)
    assert [r.status for r in results[:2]] == [STATUS_FAILED, STATUS_FAILED]
    assert "non-finite initial pose" in results[0].reason
    assert "lost sight" in results[1].reason
    assert results[2].status != STATUS_FAILED and results[2].iterations == 4
    assert math.isfinite(results[2].loss) and torch.isfinite(results[2].c2w).all()
    trace = results[2].trace
    assert len(trace) == 5 and trace[0]["event"] == "init" and trace[0]["rot_err_deg"] == pytest.approx(1.0, abs=1e-3)
    assert trace[-1]["iteration"] == 4 and trace[-1]["stage"] == "refine@1/1" and math.isfinite(trace[-1]["loss"])


@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_batching_does_not_change_results(point_splat, novel_queries, refine_only, solver):
    queries = novel_queries[:2]
    starts = initial_poses(queries, "perturb", angle_deg=2.0, translation=0.05, seed=1)
    together = refine_only(5, batch_size=2, final_solver=solver).setup(model=point_splat).localize(queries, starts)
    alone = refine_only(5, batch_size=1, final_solver=solver).setup(model=point_splat).localize(queries, starts)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.c2w, b.c2w, atol=1e-5, rtol=0)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
    # The returned pose is the best final-stage pose: its loss is the smallest one in the trace.
    for result in together:
        assert result.loss == pytest.approx(min(row["loss"] for row in result.trace[1:]))


@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_model_parameters_are_left_untouched(point_splat, novel_queries, refine_only, solver):
    before = {name: p.detach().clone() for name, p in point_splat.named_parameters()}
    flags = {name: p.requires_grad for name, p in point_splat.named_parameters()}
    starts = initial_poses(novel_queries[:1], "perturb", angle_deg=1.0, translation=0.01, seed=2)
    refine_only(2, final_solver=solver).setup(model=point_splat).localize(novel_queries[:1], starts)
    for name, p in point_splat.named_parameters():
        assert torch.equal(p.detach(), before[name]) and p.grad is None and p.requires_grad == flags[name]


# ----------------------------------------------------------------------------------------------------------
# end to end: a gsloc model trained on the embedded scene, its held-out views from perturbed poses
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run_localized(small_gsloc_run):
    """The held-out views of the small trained run, localized from 5 deg / 0.05 units:
    (results, rot, trans, steps, queries)."""
    from nerfstudio_gsloc.localize.queries import load_eval_queries
    from nerfstudio_gsloc.runs import load_run

    _, pipeline = load_run(small_gsloc_run)
    queries = load_eval_queries(pipeline)
    assert len(queries) == 3 and all(q.depth is not None for q in queries)
    starts = initial_poses(queries, "perturb", angle_deg=5.0, translation=0.05, seed=0)
    config = PoseInversionConfig()
    config.schedule.matching_iterations = 30
    config.schedule.pyramid_iterations = (10, 10, 20)
    trace_steps = []
    results = config.setup(model=pipeline.model).localize(queries, starts, on_step=trace_steps.append)
    gt = torch.stack([q.gt_c2w for q in queries])
    refined = torch.stack([r.c2w for r in results])
    return results, rotation_error_deg(refined, gt), translation_error(refined, gt), trace_steps, queries


def test_recovers_perturbed_eval_views_of_a_trained_model(trained_run_localized):
    results, rot, trans, trace_steps, _ = trained_run_localized
    print("end-to-end errors (deg, scene units):", rot.tolist(), trans.tolist())
    # From 5 deg / 0.05 scene units to a fraction of that (a 250-step model of 64 x 48 images; median 0.50 deg
    # on an AMD EPYC, under 0.5 on the earlier CI machine: the brief model's optimum moves with the vector code).
    assert rot.median() < 0.8 and trans.median() < 0.01, (rot, trans)
    assert (rot < 2.5).all() and (trans < 0.025).all(), (rot, trans)
    for result in results:
        assert result.status in ("converged", "max_iterations") and result.inliers >= 12
        assert result.trace[1]["event"] == "pnp_jump"  # the matching stage starts with a PnP jump
    torch.testing.assert_close(torch.tensor([r.rot_err_deg for r in results]), rot, atol=1e-4, rtol=0)
    assert len(trace_steps) >= max(r.iterations for r in results)


# Whether the brief model's views keep their first PnP pose exactly depends on the float rounding of the kernels
# (built with -march=native -ffast-math): on the AVX2 EPYC of 2026-12-06 every view ended within 0.05 deg of it,
# on the same machine with the inlined exp of 2026-12-07 LM drifts the second view from 0.195 to 0.312 deg, and on
# the Zen 4 EPYC of 2026-12-03 a view went from 0.30 to 1.05 deg. Drifts under about a pixel are below what the
# verifier's map matches can tell apart at this size (README, "Hypotheses"); the refinement must never lose more
# than that to its first PnP pose.
def test_no_view_ends_a_pixel_worse_than_its_first_pnp_pose(trained_run_localized):
    results, rot, _, _, queries = trained_run_localized
    first_jump = torch.tensor([float(r.trace[1]["rot_err_deg"]) for r in results])
    pixel_deg = torch.tensor([math.degrees(math.atan(1.0 / float(q.K[0, 0]))) for q in queries])
    assert (rot <= first_jump + pixel_deg).all(), (rot, first_jump, pixel_deg)


def test_nan_loss_mid_run_fails_only_that_query(point_splat, novel_queries, monkeypatch, refine_only):
    """A loss that turns NaN at the third iteration fails its query with the reason; the other one goes on."""
    from nerfstudio_gsloc.localize import objective as objective_module

    real_loss = objective_module.photometric_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss.clone()
            loss[0] = float("nan")
        return loss

    monkeypatch.setattr(objective_module, "photometric_loss", poisoned)
    queries = novel_queries[:2]
    starts = initial_poses(queries, "perturb", angle_deg=1.0, translation=0.02, seed=3)
    results = refine_only(5, batch_size=2, final_solver="adam").setup(model=point_splat).localize(queries, starts)
    assert results[0].status == STATUS_FAILED and "non-finite loss" in results[0].reason and "iteration 2" in results[0].reason
    assert results[0].iterations == 2 and torch.isfinite(results[0].c2w).all()
    assert results[1].status != STATUS_FAILED and results[1].iterations == 5


def test_colour_correction_absorbs_an_exposure_change(point_splat, novel_queries, refine_only):
    """A darker query (x0.6) with a mask: with the affine colour correction the photometric loss gets lower."""
    import dataclasses

    query = novel_queries[0]
    mask = torch.ones(query.height, query.width, dtype=torch.bool)
    mask[:, : query.width // 4] = False
    dark = dataclasses.replace(query, image=query.image * 0.6, mask=mask)
    start = initial_poses([dark], "perturb", angle_deg=0.5, translation=0.01, seed=4)
    # Both on Adam: the colour transform is optimised by Adam (LM hands the final level back to it), and the two
    # losses compared must be the same objective
    plain = refine_only(12, final_solver="adam").setup(model=point_splat).localize([dark], start)[0]
    config = refine_only(12, final_solver="adam")
    config.losses.color_correction = True
    corrected = config.setup(model=point_splat).localize([dark], start)[0]
    print("colour correction:", corrected.loss, plain.loss)
    assert corrected.loss < 0.9 * plain.loss, (corrected.loss, plain.loss)


def test_look_around_search_widens_the_basin(point_splat, novel_queries):
    """Turned 35 deg away, the first render shares too little with the query for PnP; the pitch/yaw search
    finds a view that does, and the query is localized from there."""
    query = novel_queries[2]
    yaw = axis_angle_to_rotation_matrix(torch.tensor([0.0, math.radians(35.0), 0.0]))
    start = [torch.cat([query.gt_c2w[:, :3] @ yaw, query.gt_c2w[:, 3:]], dim=1)]

    def run(search_deg: float):
        config = PoseInversionConfig()
        config.schedule.pyramid_iterations = (0, 0, 2)
        config.schedule.search_deg = search_deg
        config.schedule.search_rings = 2
        return config.setup(model=point_splat).localize([query], start)[0]

    found = run(15.0)
    assert found.trace[1]["event"] == "search_jump"
    assert found.rot_err_deg < 5.0 and found.trans_err < 0.2, (found.rot_err_deg, found.trans_err)
    without = run(0.0)
    assert without.trace[1]["event"] == "rematch"  # same first round, no search
    assert all(row["event"] != "search_jump" for row in without.trace)
