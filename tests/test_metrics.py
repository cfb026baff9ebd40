"""Pose errors, success rates and the one summary convention (failures are infinite errors everywhere)."""

import math

import numpy as np
import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.metrics import (
    FAILURE_STATUSES,
    SUCCESS_THRESHOLDS,
    failure_errors,
    is_failure,
    rotation_error_deg,
    success_rates,
    summarize,
    threshold_key,
    translation_error,
)


def _pose(rot: torch.Tensor, centre) -> torch.Tensor:
    return torch.cat([rot, torch.tensor(centre, dtype=rot.dtype)[:, None]], dim=-1)


@pytest.mark.parametrize("angle_deg", [0.0, 0.01, 1.0, 37.5, 179.0])
def test_rotation_error_exact_angle(angle_deg):
    base = axis_angle_to_rotation_matrix(torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64))
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    delta = axis_angle_to_rotation_matrix(axis / axis.norm() * math.radians(angle_deg))
    est = _pose(base @ delta, [1.0, 2.0, 3.0])[None]
    gt = _pose(base, [1.0, 2.0, 3.0])[None]
    err = rotation_error_deg(est, gt)
    assert err.shape == (1,)
    assert err.item() == pytest.approx(angle_deg, abs=1e-9)
    # Symmetric, and unaffected by the translation.
    assert rotation_error_deg(gt, est).item() == pytest.approx(angle_deg, abs=1e-9)


def test_rotation_error_small_angle_float32_is_accurate():
    base = torch.eye(3)
    delta = axis_angle_to_rotation_matrix(torch.tensor([0.0, 0.0, math.radians(0.005)]))
    est = _pose(base @ delta, [0.0, 0.0, 0.0])[None]
    gt = _pose(base, [0.0, 0.0, 0.0])[None]
    # acos of the trace would give 0 or ~0.02 deg here in float32.
    assert rotation_error_deg(est, gt).item() == pytest.approx(0.005, rel=1e-3)


def test_translation_error_is_centre_distance_and_accepts_4x4():
    est = torch.eye(4)[None].repeat(2, 1, 1)
    est[0, :3, 3] = torch.tensor([3.0, 4.0, 0.0])
    est[1, :3, 3] = torch.tensor([1.0, 1.0, 1.0])
    gt = torch.eye(4)[None, :3, :].repeat(2, 1, 1)
    err = translation_error(est, gt)
    torch.testing.assert_close(err, torch.tensor([5.0, math.sqrt(3.0)]))
    torch.testing.assert_close(rotation_error_deg(est, gt), torch.zeros(2))


def test_shape_errors():
    with pytest.raises(ValueError):
        rotation_error_deg(torch.eye(3)[None], torch.eye(3)[None])
    with pytest.raises(ValueError):
        translation_error(torch.eye(4)[None], torch.eye(4)[None].repeat(2, 1, 1))


def test_success_rates_bounds_are_inclusive_and_nan_fails():
    assert threshold_key(1.0, 0.01) == "1deg_0.01"
    # Compared in float64 (a float32 0.05 is slightly above the float64 threshold 0.05).
    rot = torch.tensor([1.0, 1.0, 0.5, 2.0, 5.0, float("nan")], dtype=torch.float64)
    trans = torch.tensor([0.01, 0.0100001, 0.001, 0.02, 0.05, 0.0], dtype=torch.float64)
    rates = success_rates(rot, trans)
    assert set(rates) == {"1deg_0.01", "2deg_0.02", "5deg_0.05"}
    # Exactly on both bounds counts (index 0, 3, 4); just above the translation bound does not (index 1).
    assert rates["1deg_0.01"] == pytest.approx(2 / 6)
    assert rates["2deg_0.02"] == pytest.approx(4 / 6)
    assert rates["5deg_0.05"] == pytest.approx(5 / 6)
    # Custom thresholds: exclusive just below the value.
    assert success_rates(torch.tensor([1.0]), torch.tensor([0.0]), thresholds=((0.999, 1.0),)) == {"0.999deg_1": 0.0}


def test_success_rates_empty_is_nan():
    rates = success_rates(torch.zeros(0), torch.zeros(0))
    assert all(math.isnan(v) for v in rates.values())
    assert len(rates) == len(SUCCESS_THRESHOLDS)


def test_failures_are_infinite_errors_in_rates_means_and_medians():
    rot = [0.5, 1.5, 3.0, 0.1, None, float("nan")]
    trans = [0.01, 0.02, 0.04, 0.001, None, 0.0]
    # Query 3 reports a failure although its pose is close: it still counts as a failure.
    failed = [False, False, False, True, False, False]
    r, t = failure_errors(rot, trans, failed)
    assert list(r[:3]) == [0.5, 1.5, 3.0] and np.isinf(r[3:]).all() and np.isinf(t[3:]).all()
    summary = summarize(rot, trans, failed, seconds=[1, 2, 3, 4, 5, 6], iterations=[10, 20, 30, 40, 50, 60])
    assert summary["num_queries"] == 6 and summary["num_failed"] == 3
    assert math.isinf(summary["rot_deg_mean"]) and math.isinf(summary["trans_mean"])
    # Median of [0.5, 1.5, 3, inf, inf, inf]: the two middle values 3 and inf -> inf.
    assert math.isinf(summary["rot_deg_median"])
    assert summary["success_rates"] == pytest.approx({"1deg_0.01": 1 / 6, "2deg_0.02": 2 / 6, "5deg_0.05": 3 / 6})
    assert summary["seconds_mean"] == pytest.approx(3.5) and summary["iterations_median"] == pytest.approx(35.0)


def test_summary_without_failures_is_plain_statistics():
    summary = summarize(torch.tensor([0.5, 1.5, 3.0, 0.2]), torch.tensor([0.01, 0.02, 0.04, 0.002]))
    assert summary["num_failed"] == 0
    assert summary["rot_deg_mean"] == pytest.approx(5.2 / 4)
    assert summary["rot_deg_median"] == pytest.approx(1.0)  # average of the two middle values
    assert summary["trans_median"] == pytest.approx(0.015)
    assert math.isnan(summary["seconds_mean"])
    # One failure among the four: finite median (3 of 5 finite), infinite mean.
    with_failure = summarize([0.5, 1.5, 3.0, 0.2, 0.1], [0.01, 0.02, 0.04, 0.002, 0.0], [False] * 4 + [True])
    assert with_failure["rot_deg_median"] == pytest.approx(1.5) and math.isinf(with_failure["rot_deg_mean"])
    empty = summarize([], [])
    assert empty["num_queries"] == 0 and math.isnan(empty["rot_deg_median"])
    with pytest.raises(ValueError):
        summarize([1.0], [1.0, 2.0])


def test_failure_statuses():
    assert FAILURE_STATUSES == ("failed", "rejected")
    assert is_failure("failed") and is_failure("rejected")
    assert not is_failure("converged") and not is_failure("max_iterations")
