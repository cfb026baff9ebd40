"""Tests of pose error metrics and success rates."""

import math

import pytest
import torch

from nerfstudio_gsloc.evaluation.pose_errors import (
    SUCCESS_THRESHOLDS,
    rotation_error_deg,
    success_rates,
    summarize_errors,
    threshold_key,
    translation_error,
)
from nerfstudio_gsloc.localize.pose import axis_angle_to_matrix


def _pose(rot: torch.Tensor, centre) -> torch.Tensor:
    return torch.cat([rot, torch.tensor(centre, dtype=rot.dtype)[:, None]], dim=-1)


@pytest.mark.parametrize("angle_deg", [0.0, 0.01, 1.0, 37.5, 179.0])
def test_rotation_error_exact_angle(angle_deg):
    base = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64))
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    delta = axis_angle_to_matrix(axis / axis.norm() * math.radians(angle_deg))
    est = _pose(base @ delta, [1.0, 2.0, 3.0])[None]
    gt = _pose(base, [1.0, 2.0, 3.0])[None]
    err = rotation_error_deg(est, gt)
    assert err.shape == (1,)
    assert err.item() == pytest.approx(angle_deg, abs=1e-9)
    # Symmetric, and unaffected by the translation.
    assert rotation_error_deg(gt, est).item() == pytest.approx(angle_deg, abs=1e-9)


def test_rotation_error_small_angle_float32_is_accurate():
    base = torch.eye(3)
    delta = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.radians(0.005)]))
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
    rot = torch.tensor([1.0, 1.0, 0.5, 2.0, 5.0, float("nan")])
    trans = torch.tensor([0.01, 0.0100001, 0.001, 0.02, 0.05, 0.0])
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


def test_summarize_errors_converts_units_and_ignores_nan_in_stats():
    rot = torch.tensor([0.5, 1.5, 3.0, float("nan")])
    trans_scene = torch.tensor([0.01, 0.02, 0.04, float("nan")])
    summary = summarize_errors(rot, trans_scene, trans_scale_to_original=10.0)
    assert summary["num_queries"] == 4
    assert summary["rot_deg_mean"] == pytest.approx(5.0 / 3.0)
    assert summary["rot_deg_median"] == pytest.approx(1.5)
    assert summary["trans_scene_median"] == pytest.approx(0.02)
    assert summary["trans_original_mean"] == pytest.approx(0.7 / 3.0)
    assert summary["trans_original_median"] == pytest.approx(0.2)
    # Rates use the scene-unit translations (original units 0.1-0.4 would all fail) and count NaN as a failure.
    assert summary["success_rates"] == pytest.approx({"1deg_0.01": 0.25, "2deg_0.02": 0.5, "5deg_0.05": 0.75})
