"""Pose parametrisation for localization: a decoupled SO(3) x R^3 correction of camera-to-world poses.

The correction of query ``i`` is a pair ``(w_i, d_i)`` of an axis-angle vector and a translation:

    R_i' = R_i @ exp(w_i)        (rotation about the camera centre, axis expressed in camera axes)
    t_i' = t_i + d_i             (camera centre moved by d_i, in scene units, world axes)

where ``[R_i | t_i]`` is the initial OpenGL camera-to-world pose. Decoupling rotation and translation (instead
of an SE(3) twist) keeps the camera centre fixed under a pure rotation update, so the two parameter groups can
use separate learning rates with a clear meaning (radians vs. scene units).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle
from nerfstudio.cameras.lie_groups import exp_map_SO3xR3
from torch import Tensor, nn


def _check_c2w(c2w: Tensor) -> None:
    if c2w.ndim != 3 or c2w.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"expected c2w of shape [B, 3|4, 4], got {tuple(c2w.shape)}")


class PoseCorrection(nn.Module):
    """Learnable per-query correction of OpenGL camera-to-world poses (zero parameters = identity).

    Attributes:
        rotation: ``[B, 3]`` so(3) axis-angle vectors (radians), in the camera's own (OpenGL) axes.
        translation: ``[B, 3]`` camera-centre offsets in scene units, world axes.

    Use ``module.rotation`` / ``module.translation`` to build optimiser parameter groups with separate
    learning rates.
    """

    def __init__(self, num_poses: int) -> None:
        """Args:
        num_poses: number of poses ``B`` corrected together.
        """
        super().__init__()
        if num_poses < 1:
            raise ValueError(f"num_poses must be >= 1, got {num_poses}")
        self.num_poses = int(num_poses)
        self.rotation = nn.Parameter(torch.zeros(self.num_poses, 3))
        self.translation = nn.Parameter(torch.zeros(self.num_poses, 3))

    def delta(self) -> Tensor:
        """The correction as ``[B, 3, 4]`` matrices ``[exp(rotation) | translation]``."""
        # exp_map_SO3xR3 takes (translation, so3) stacked as [B, 6].
        return exp_map_SO3xR3(torch.cat([self.translation, self.rotation], dim=-1))

    def forward(self, c2w_init: Tensor) -> Tensor:
        """Apply the correction.

        Args:
            c2w_init: ``[B, 3|4, 4]`` initial OpenGL camera-to-world poses (scene frame).

        Returns:
            ``[B, 3, 4]`` corrected poses, differentiable w.r.t. ``rotation`` and ``translation``.
        """
        if c2w_init.shape[0] != self.num_poses:
            raise ValueError(f"expected {self.num_poses} poses, got {c2w_init.shape[0]}")
        return apply_correction(c2w_init, self.rotation, self.translation)


def apply_correction(c2w_init: Tensor, rotation: Tensor, translation: Tensor) -> Tensor:
    """The functional form of :class:`PoseCorrection`: ``R' = R exp(rotation)``, ``c' = c + translation``.

    Args:
        c2w_init: ``[B, 3|4, 4]`` OpenGL camera-to-world poses (scene frame).
        rotation: ``[B, 3]`` axis-angle vectors (radians) in the camera's own axes.
        translation: ``[B, 3]`` camera-centre offsets in world axes (scene units).

    Returns:
        ``[B, 3, 4]`` corrected poses, differentiable w.r.t. ``rotation`` and ``translation``.
    """
    _check_c2w(c2w_init)
    # exp_map_SO3xR3 takes (translation, so3) stacked as [B, 6].
    delta = exp_map_SO3xR3(torch.cat([translation, rotation], dim=-1)).to(dtype=c2w_init.dtype, device=c2w_init.device)
    rot = c2w_init[:, :3, :3] @ delta[:, :, :3]
    centre = c2w_init[:, :3, 3:4] + delta[:, :, 3:4]
    return torch.cat([rot, centre], dim=-1)


def apply_pivoted_correction(base: Tensor, rotation: Tensor, translation: Tensor, pivot: Optional[Tensor]) -> Tensor:
    """:func:`apply_correction` with the rotation turning the camera about ``pivot`` instead of its centre.

    The centre moves by ``(dR - I)(c - p)`` with ``dR`` the world-frame rotation of the correction: with the pivot
    at the scene in front of the camera, rotation and translation move the image in different ways, which
    conditions the refinement.

    Args:
        base: ``[B, 3, 4]`` OpenGL camera-to-world poses.
        rotation, translation: ``[B, 3]`` the correction (see :func:`apply_correction`).
        pivot: ``[B, 3]`` world points, or ``None`` (rotate about the camera centres).

    Returns:
        ``[B, 3, 4]`` corrected poses, differentiable w.r.t. ``rotation`` and ``translation``.
    """
    c2w = apply_correction(base, rotation, translation)
    if pivot is None:
        return c2w
    d_rot = c2w[:, :, :3] @ base[:, :3, :3].transpose(1, 2)
    eye = torch.eye(3, device=c2w.device, dtype=c2w.dtype)
    offset = (d_rot - eye) @ (base[:, :3, 3:4] - pivot[:, :, None])
    return torch.cat([c2w[:, :, :3], c2w[:, :, 3:4] + offset], dim=-1)


def _random_unit_vectors(num: int, generator: Optional[torch.Generator]) -> Tensor:
    """``[num, 3]`` float64 directions uniform on the sphere (normalised Gaussians), drawn on the CPU."""
    while True:
        vec = torch.randn(num, 3, generator=generator, dtype=torch.float64)
        norm = torch.linalg.norm(vec, dim=-1, keepdim=True)
        if bool((norm > 1e-9).all()):
            return vec / norm


def perturb_pose(
    c2w: Tensor, angle_deg: float, translation: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Perturb poses by an exact rotation angle and translation length in random directions.

    Each pose is rotated by ``angle_deg`` about a random axis through its camera centre (same composition as
    :class:`PoseCorrection`: ``R' = R @ exp(angle * axis)``) and its centre is moved by ``translation`` scene
    units along an independent random direction. The rotation error of the result is therefore exactly
    ``angle_deg`` and the centre distance exactly ``translation``.

    Args:
        c2w: ``[B, 3|4, 4]`` camera-to-world poses.
        angle_deg: rotation angle in degrees (``>= 0``).
        translation: translation length in scene units (``>= 0``).
        generator: CPU ``torch.Generator`` for reproducible draws (global RNG when ``None``).

    Returns:
        ``[B, 3, 4]`` perturbed poses (same dtype/device as ``c2w``).
    """
    _check_c2w(c2w)
    if angle_deg < 0 or translation < 0:
        raise ValueError(f"angle_deg and translation must be >= 0, got {angle_deg} and {translation}")
    num = c2w.shape[0]
    axes = _random_unit_vectors(num, generator)
    directions = _random_unit_vectors(num, generator)
    delta_rot = axis_angle_to_rotation_matrix(axes * math.radians(angle_deg))
    c2w64 = c2w[:, :3, :].double().cpu()
    rot = c2w64[:, :, :3] @ delta_rot
    centre = c2w64[:, :, 3] + directions * float(translation)
    return torch.cat([rot, centre[:, :, None]], dim=-1).to(dtype=c2w.dtype, device=c2w.device)


def interpolate_pose(start: Tensor, end: Tensor, fraction: float) -> Tensor:
    """The pose ``fraction`` of the way from ``start`` to ``end``, in the same decoupled SO(3) x R^3 as
    :class:`PoseCorrection`: the rotation along the geodesic ``R_s exp(f log(R_s^T R_e))``, the camera centre on
    the straight line between the two. ``fraction`` 0 gives ``start``, 1 gives ``end``.

    Args:
        start, end: ``[3|4, 4]`` OpenGL camera-to-world poses (scene frame).
        fraction: usually in ``[0, 1]``.

    Returns:
        ``[3, 4]`` pose, dtype and device of ``start``.
    """
    a, b = start[:3, :4].double().cpu(), end[:3, :4].double().cpu()
    relative = rotation_matrix_to_axis_angle((a[:, :3].T @ b[:, :3])[None])[0]
    rot = a[:, :3] @ axis_angle_to_rotation_matrix((relative * float(fraction))[None])[0]
    centre = a[:, 3] + float(fraction) * (b[:, 3] - a[:, 3])
    return torch.cat([rot, centre[:, None]], dim=-1).to(dtype=start.dtype, device=start.device)
