"""gsloc's calibration (issue 18): how far the final pose moves from the PnP start towards the refined pose,
chosen by a self-test on the run's training photos, each left out of the map.

The choice of the fraction on synthetic pose pairs, the cache beside the run, the map that never shows a photo
itself, and on the small trained run: the self-test runs once, and a query's pose is the calibrated fraction of the
way from its PnP pose to its refined pose.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch

from nerfstudio_gsloc.localize import pipeline as pipeline_module
from nerfstudio_gsloc.localize.calibration import (
    Calibration,
    CalibrationConfig,
    choose_fraction,
    load_or_calibrate,
)
from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.pnp import PnPBaseline
from nerfstudio_gsloc.localize.pose import interpolate_pose, perturb_pose
from nerfstudio_gsloc.localize.queries import load_eval_queries
from nerfstudio_gsloc.localize.registry import make_localizer, make_verifier
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error

from test_hypotheses import fast_settings  # noqa: E402  (tests/localize is on sys.path)


def _errors(a, b):
    a, b = a[None, :3, :4].double(), b[None, :3, :4].double()
    return float(rotation_error_deg(a, b)[0]), float(translation_error(a, b)[0])


def test_interpolate_pose_follows_the_rotation_geodesic_and_the_straight_line():
    generator = torch.Generator().manual_seed(0)
    start = perturb_pose(torch.eye(4)[None, :3], 40.0, 1.0, generator)[0].double()
    end = perturb_pose(start[None], 30.0, 0.5, generator)[0]
    torch.testing.assert_close(interpolate_pose(start, end, 0.0), start)
    torch.testing.assert_close(interpolate_pose(start, end, 1.0), end)
    middle = interpolate_pose(start, end, 0.3)
    assert _errors(middle, start)[0] == pytest.approx(9.0, abs=1e-6)
    assert _errors(middle, end)[0] == pytest.approx(21.0, abs=1e-6)
    torch.testing.assert_close(middle[:, 3], start[:, 3] + 0.3 * (end[:, 3] - start[:, 3]))


def _pairs(refined_bias_deg: float, refined_noise_deg: float, count: int = 24, seed: int = 0):
    """Synthetic self-test: PnP poses with unbiased noise (0.1 deg, 0.005), refined poses with a common bias (a
    roll of ``refined_bias_deg``) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    truths = perturb_pose(torch.eye(4)[None, :3].repeat(count, 1, 1), 60.0, 4.0, generator).double()
    pnp = perturb_pose(truths, 0.1, 0.005, generator)
    refined = perturb_pose(truths, refined_noise_deg, 0.1 * refined_noise_deg, generator)
    roll = perturb_pose(torch.eye(4)[None, :3].double(), refined_bias_deg, 0.0, torch.Generator().manual_seed(9))[0]
    refined[:, :, :3] = refined[:, :, :3] @ roll[:, :3]
    return list(zip(pnp, refined)), list(truths)


def test_the_fraction_leans_on_pnp_where_refinement_is_biased_and_keeps_refinement_where_it_is_better():
    config = CalibrationConfig()
    biased = choose_fraction(*_pairs(refined_bias_deg=0.5, refined_noise_deg=0.01), scale=4.0, config=config)
    assert biased.fraction <= 0.25, biased
    better = choose_fraction(*_pairs(refined_bias_deg=0.0, refined_noise_deg=0.01), scale=4.0, config=config)
    assert better.fraction == 1.0, better
    assert len(better.scores) == config.steps + 1 and better.views == 24
    # Two estimates of equal quality: anything in between beats both; the tolerance leans towards PnP.
    even = choose_fraction(*_pairs(refined_bias_deg=0.0, refined_noise_deg=0.1), scale=4.0, config=config)
    loose = choose_fraction(*_pairs(refined_bias_deg=0.0, refined_noise_deg=0.1), scale=4.0,
                            config=dataclasses.replace(config, standard_errors=0.0))
    assert 0.0 < even.fraction <= loose.fraction < 1.0, (even, loose)


def test_too_few_self_test_views_keep_the_refined_pose():
    pairs, truths = _pairs(refined_bias_deg=0.5, refined_noise_deg=0.01, count=5)
    calibration = choose_fraction(pairs, truths, scale=4.0, config=CalibrationConfig(min_views=8))
    assert calibration.fraction == 1.0 and "only 5 self-test views" in calibration.reason


def test_the_calibration_is_cached_per_checkpoint_and_settings(tmp_path):
    checkpoint = tmp_path / "step-1.ckpt"
    checkpoint.write_bytes(b"weights")
    run = SimpleNamespace(gsloc_run_dir=tmp_path, gsloc_checkpoint=checkpoint)
    calls = []

    def calibrate():
        calls.append(1)
        return Calibration(0.25 * len(calls), 12, [0.0, 1.0], [-1.0, -2.0], 3.0, "made")

    config = CalibrationConfig()
    first = load_or_calibrate(run, config, {"a": 1}, calibrate)
    assert first.fraction == 0.25 and len(calls) == 1
    assert load_or_calibrate(run, config, {"a": 1}, calibrate) == first and len(calls) == 1  # read back
    assert load_or_calibrate(run, config, {"a": 2}, calibrate).fraction == 0.5  # other settings: another file
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new checkpoint: calibrate again
    assert load_or_calibrate(run, config, {"a": 1}, calibrate).fraction == 0.75
    for path in (tmp_path / "gsloc_index").glob("calibration-*.json"):
        path.write_text("{truncated")
    assert load_or_calibrate(run, config, {"a": 1}, calibrate).fraction == 1.0 and len(calls) == 4
    assert load_or_calibrate(run, dataclasses.replace(config, cache=False), {"a": 1}, calibrate).fraction == 1.25
    saved = json.loads(next((tmp_path / "gsloc_index").glob("calibration-*.json")).read_text())
    assert saved["calibration"]["reason"] == "made"


@pytest.fixture(scope="module")
def run(small_gsloc_run):
    from nerfstudio_gsloc.runs import load_run

    _, pipeline = load_run(small_gsloc_run)
    return pipeline, load_eval_queries(pipeline)


def test_a_training_photo_never_matches_itself(run):
    pipeline, _ = run
    verifier = make_verifier(fast_settings(), pipeline.model, pipeline)
    photo = load_eval_queries(pipeline, split="train", indices=[5])[0]
    own = [i for i, view in enumerate(verifier.baseline.map) if view.name == photo.name]
    assert len(own) == 1
    assert own[0] in verifier.matches(photo).views  # its own photo is the best match of all
    with verifier.self_test():
        assert own[0] not in verifier.matches(photo).views and len(verifier.matches(photo)) > 0
    assert verifier.leave_own_photo_out is False and own[0] in verifier.matches(photo).views


@pytest.mark.calibration
def test_gsloc_self_tests_once_and_moves_each_pose_the_calibrated_fraction_from_pnp(run, monkeypatch, tmp_path):
    pipeline, queries = run
    settings = fast_settings()
    settings.gsloc.calibration = dataclasses.replace(settings.gsloc.calibration, views=8, min_views=4)
    settings.gsloc.depth_alignment.enabled = False  # the choice alone: ICP would move every pose afterwards
    monkeypatch.setattr(pipeline, "gsloc_run_dir", tmp_path)  # this test's own cache
    tests, excluded = [], []
    real_run, real_correspondences = pipeline_module.run_self_test, PnPBaseline.correspondences

    def counting(*args, **kwargs):
        tests.append(1)
        return real_run(*args, **kwargs)

    def recording(self, image, prior_c2w=None, scale=1.0, selection=None, exclude=None):
        excluded.append(exclude)
        return real_correspondences(self, image, prior_c2w, scale, selection, exclude)

    monkeypatch.setattr(pipeline_module, "run_self_test", counting)
    monkeypatch.setattr(PnPBaseline, "correspondences", recording)
    query = queries[0]
    start = initial_poses([query], "perturb", angle_deg=3.0, translation=0.03, seed=1)
    localizer = make_localizer("gsloc", settings, pipeline.model, pipeline)
    result = localizer.localize([query], start)[0]
    calibration = localizer.calibration
    assert len(tests) == 1 and calibration is not None and 4 <= calibration.views <= 8, calibration
    train_names = {str(name) for name in pipeline.datamanager.train_dataset._dataparser_outputs.image_filenames}
    self_test_exclusions = [name for name in excluded if name is not None]
    assert len(self_test_exclusions) == 8 and set(self_test_exclusions) <= train_names
    assert excluded[-1] is None  # the query itself sees the whole map
    assert list(tmp_path.glob("gsloc_index/calibration-*.json")) and "calibration" in localizer.notes

    # A second localizer with the same settings reads the calibration; the fraction decides the final pose.
    for fraction in (1.0, 0.5):
        again = make_localizer("gsloc", settings, pipeline.model, pipeline)
        again.calibration = dataclasses.replace(again.calibrated(), fraction=fraction)
        outcome = again.localize([query], start)[0]
        if fraction == 1.0:
            refined = outcome.c2w
        assert len(tests) == 1
    pnp = again.verifier.pnp(query, seed=again.seed + query.index).c2w[:3, :4]
    assert "refinement lost" not in outcome.reason, outcome.reason
    torch.testing.assert_close(outcome.c2w, interpolate_pose(pnp, refined, 0.5))
    assert "calibrated: final pose 0.5 of the way" in outcome.reason
    assert result.c2w.shape == (3, 4)


@pytest.mark.calibration
def test_rgbd_queries_end_with_the_depth_alignment_and_are_not_calibrated(run, monkeypatch, tmp_path):
    pipeline, queries = run
    settings = fast_settings()
    settings.gsloc.calibration = dataclasses.replace(settings.gsloc.calibration, views=8, min_views=4)
    monkeypatch.setattr(pipeline, "gsloc_run_dir", tmp_path)
    tests = []
    real_run = pipeline_module.run_self_test
    monkeypatch.setattr(pipeline_module, "run_self_test", lambda *args: tests.append(1) or real_run(*args))
    query = queries[0]
    assert query.depth is not None and settings.gsloc.depth_alignment.enabled
    start = initial_poses([query], "perturb", angle_deg=3.0, translation=0.03, seed=1)
    localizer = make_localizer("gsloc", settings, pipeline.model, pipeline)
    localizer.prepare([query])  # what a tracker or a Ray driver does first
    assert localizer.localize([query], start)[0].depth_aligned
    assert not tests and localizer.calibration is None
    # The single-loss baselines have no PnP start to calibrate: no self-test either.
    make_localizer("photometric", settings, pipeline.model, pipeline).prepare()
    assert not tests
    # The same photo without its depth is calibrated, by training photos localized without theirs.
    localizer.localize([dataclasses.replace(query, depth=None)], start)
    assert len(tests) == 1 and localizer.calibration.views >= 4, localizer.calibration


@pytest.mark.calibration
def test_prepare_calibrates_before_any_query_and_another_localizer_reads_it(run, monkeypatch, tmp_path):
    """What a Ray driver does (``Localizer.prepare`` before sending work): its workers, each with its own localizer
    of the same settings, read the calibration instead of running the self-test again."""
    pipeline, queries = run
    settings = fast_settings()
    settings.gsloc.calibration = dataclasses.replace(settings.gsloc.calibration, views=8, min_views=4)
    settings.gsloc.depth_alignment.enabled = False
    monkeypatch.setattr(pipeline, "gsloc_run_dir", tmp_path)
    driver = make_localizer("gsloc", settings, pipeline.model, pipeline)
    driver.prepare()
    assert driver.calibration is not None and list(tmp_path.glob("gsloc_index/calibration-*.json"))

    def no_second_self_test(*args, **kwargs):
        raise AssertionError("the worker ran the self-test again")

    monkeypatch.setattr(pipeline_module, "run_self_test", no_second_self_test)
    worker = make_localizer("gsloc", settings, pipeline.model, pipeline)
    start = initial_poses(queries[:1], "perturb", angle_deg=3.0, translation=0.03, seed=1)
    assert not worker.localize(queries[:1], start)[0].failed
    assert worker.calibration == driver.calibration
