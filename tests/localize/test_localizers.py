"""Every registered method through the one localizer interface, on a gsloc model trained on the embedded scene.

Each method gets the same queries and the same perturbed starts through the same call
(``settings.config(name).setup(model=..., ...).localize(queries, starts)``) and must bring the poses closer to the
truth and return :class:`LocalizationResult` s.
"""

from __future__ import annotations

import time

import pytest
import torch

from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.localizer import Localizer, LocalizerConfig
from nerfstudio_gsloc.localize.registry import DEFAULT_METHODS, LocalizerSettings, check_methods, make_localizer
from nerfstudio_gsloc.localize.result import STATUS_FAILED, STATUS_SKIPPED, LocalizationResult
from nerfstudio_gsloc.errors import GslocError

START_DEG, START_TRANS = 3.0, 0.03


def fast_settings() -> LocalizerSettings:
    """Short schedules: the test checks the interface and that each method descends, not final accuracy."""
    settings = LocalizerSettings()
    settings.gsloc.schedule.matching_iterations = 20
    settings.gsloc.schedule.pyramid_scales = (2, 1)
    settings.gsloc.schedule.pyramid_iterations = (5, 10)
    settings.gsloc.schedule.refine_matching_weight = ()
    settings.single_loss.pyramid_iterations = (15, 15)
    settings.icomma.max_iterations = 30
    settings.pnp.num_views = 4
    return settings


@pytest.fixture(scope="module")
def scene(small_gsloc_run):
    """The run's pipeline, one of its eval views (with depth; one keeps the test fast) and its perturbed start."""
    from nerfstudio_gsloc.localize.queries import load_eval_queries
    from nerfstudio_gsloc.runs import load_run

    _, pipeline = load_run(small_gsloc_run)
    queries = load_eval_queries(pipeline)[2:]
    starts = initial_poses(queries, "perturb", angle_deg=START_DEG, translation=START_TRANS, seed=5)
    return pipeline, queries, starts


def _errors(poses, queries):
    gt = torch.stack([q.gt_c2w for q in queries]).double()
    est = torch.stack([p[:3, :4] for p in poses]).double()
    return rotation_error_deg(est, gt), translation_error(est, gt)


@pytest.mark.parametrize("method", list(DEFAULT_METHODS))  # regression: tests/localize/test_regressor.py
def test_each_method_through_the_one_interface_gets_closer_to_the_truth(method, scene):
    pipeline, queries, starts = scene
    config = fast_settings().config(method)
    assert isinstance(config, LocalizerConfig)
    localizer = config.setup(model=pipeline.model, pipeline=pipeline, seed=0)
    assert isinstance(localizer, Localizer)
    seen = []
    started = time.perf_counter()
    results = localizer.localize(queries, starts, on_result=lambda position, result: seen.append(position))
    seconds = time.perf_counter() - started
    assert seen == [0] and all(isinstance(r, LocalizationResult) for r in results)
    assert [r.name for r in results] == [q.name for q in queries]
    rot0, trans0 = _errors(starts, queries)
    rot, trans = _errors([r.c2w for r in results], queries)
    print(f"{method}: {seconds:.1f} s, rot {rot0.tolist()} -> {rot.tolist()}, trans {trans0.tolist()} -> {trans.tolist()}")
    for result, r, t, r0, t0 in zip(results, rot, trans, rot0, trans0):
        assert result.status != STATUS_FAILED, result.reason
        assert result.confidence is None and result.seconds > 0
        torch.testing.assert_close(result.c2w_init, starts[results.index(result)][:3, :4])
        # Closer to the truth: the rotation error down by a quarter at least, the translation error lower.
        assert r < 0.75 * r0 and t < t0, (method, float(r), float(r0), float(t), float(t0))
        assert result.rot_err_deg == pytest.approx(float(r), abs=1e-3)
    if method == "pnp":
        assert all(r.iterations == 0 and r.inliers >= 12 for r in results) and localizer.notes["pnp_map_points"] > 0
    else:
        assert all(0 < r.iterations <= localizer.max_iterations and r.trace[0]["event"] == "init" for r in results)
    if method == "icomma":
        assert all("matching" in r.reason for r in results) and "SIFT" in localizer.notes["icomma_matcher"]


def test_depth_method_skips_queries_without_depth(scene):
    import dataclasses

    pipeline, queries, starts = scene
    without = [dataclasses.replace(queries[0], depth=None), queries[0]]
    settings = fast_settings()
    settings.single_loss.pyramid_iterations = (1, 1)
    results = make_localizer("depth", settings, pipeline.model, pipeline).localize(without, starts * 2)
    assert results[0].status == STATUS_SKIPPED and results[0].skipped and not results[0].failed
    assert results[1].status != STATUS_SKIPPED and results[1].iterations > 0


def test_unknown_methods_are_one_line_errors():
    with pytest.raises(GslocError, match="unknown method 'magic'"):
        check_methods(["gsloc", "magic"])
    with pytest.raises(GslocError, match="unknown method"):
        LocalizerSettings().config("nope")
