"""Tests of the SO(3) x R^3 pose correction and of pose perturbation."""

import math

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.localize.pose import PoseCorrection, perturb_pose
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


def _random_c2w(num: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rot = axis_angle_to_rotation_matrix(torch.randn(num, 3, generator=gen, dtype=torch.float64))
    centre = torch.randn(num, 3, 1, generator=gen, dtype=torch.float64) * 2.0
    return torch.cat([rot, centre], dim=-1).to(dtype)


def test_zero_correction_is_identity():
    c2w = _random_c2w(3)
    out = PoseCorrection(3)(c2w)
    assert out.shape == (3, 3, 4)
    torch.testing.assert_close(out, c2w)
    # [B, 4, 4] input is accepted and gives [B, 3, 4].
    c2w44 = torch.cat([c2w, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(3, 1, 4)], dim=1)
    torch.testing.assert_close(PoseCorrection(3)(c2w44), c2w)


def test_rotation_acts_about_camera_centre():
    c2w = _random_c2w(2, seed=1)
    corr = PoseCorrection(2)
    with torch.no_grad():
        corr.rotation.copy_(torch.tensor([[0.2, -0.1, 0.3], [0.0, 0.5, 0.0]]))
    out = corr(c2w)
    torch.testing.assert_close(out[:, :, 3], c2w[:, :, 3])
    expected_deg = torch.rad2deg(corr.rotation.detach().norm(dim=-1))
    torch.testing.assert_close(rotation_error_deg(out.detach(), c2w), expected_deg, atol=1e-4, rtol=1e-4)
    # The rotation is in camera axes: R' = R exp(w).
    torch.testing.assert_close(out[:, :, :3].detach(), c2w[:, :, :3] @ axis_angle_to_rotation_matrix(corr.rotation.detach()))


def test_translation_moves_centre_by_exactly_the_vector():
    c2w = _random_c2w(2, seed=2)
    corr = PoseCorrection(2)
    delta = torch.tensor([[0.1, -0.2, 0.3], [1.0, 0.0, -2.0]])
    with torch.no_grad():
        corr.translation.copy_(delta)
    out = corr(c2w).detach()
    torch.testing.assert_close(out[:, :, 3] - c2w[:, :, 3], delta)
    torch.testing.assert_close(out[:, :, :3], c2w[:, :, :3])


def test_wrong_batch_size_is_rejected():
    with pytest.raises(ValueError):
        PoseCorrection(2)(_random_c2w(3))


def test_gradients_flow_to_both_parameter_groups_at_zero():
    c2w = _random_c2w(2, seed=3)
    corr = PoseCorrection(2)
    target = torch.tensor([0.3, -0.4, 0.5])
    out = corr(c2w)
    # A loss depending on rotation (direction of the camera's x axis) and translation.
    loss = ((out[:, :, 0] - target) ** 2).sum() + ((out[:, :, 3] - target) ** 2).sum()
    loss.backward()
    assert corr.rotation.grad is not None and corr.translation.grad is not None
    assert torch.isfinite(corr.rotation.grad).all() and torch.isfinite(corr.translation.grad).all()
    assert corr.rotation.grad.abs().sum() > 1e-3
    torch.testing.assert_close(corr.translation.grad, 2 * (c2w[:, :, 3] - target))


@pytest.mark.parametrize("angle_deg, trans", [(10.0, 0.25), (0.3, 0.0), (0.0, 1.5), (90.0, 0.01)])
def test_perturb_pose_exact_magnitudes(angle_deg, trans):
    c2w = _random_c2w(8, seed=4, dtype=torch.float64)
    out = perturb_pose(c2w, angle_deg, trans, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 4) and out.dtype == torch.float64
    torch.testing.assert_close(rotation_error_deg(out, c2w), torch.full((8,), angle_deg, dtype=torch.float64))
    torch.testing.assert_close(translation_error(out, c2w), torch.full((8,), trans, dtype=torch.float64))
    # Still proper rotations.
    rot = out[:, :, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(8, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(8, dtype=torch.float64))


def test_perturb_pose_seeded_and_random_directions():
    c2w = _random_c2w(16, seed=5)
    a = perturb_pose(c2w, 5.0, 0.1, torch.Generator().manual_seed(7))
    b = perturb_pose(c2w, 5.0, 0.1, torch.Generator().manual_seed(7))
    c = perturb_pose(c2w, 5.0, 0.1, torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # Directions vary between poses (not one shared offset).
    offsets = a[:, :, 3] - c2w[:, :, 3]
    assert offsets.std(dim=0).min() > 0.01
    assert math.isclose(rotation_error_deg(a, c2w).mean().item(), 5.0, rel_tol=1e-4)
