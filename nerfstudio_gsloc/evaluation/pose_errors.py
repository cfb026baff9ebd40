"""Pose error metrics for camera localization.

Errors compare estimated and ground-truth camera-to-world poses (any convention, as long as both use the
same one; rotation error is the same for OpenGL and OpenCV c2w because the axis flip cancels):

* rotation error: geodesic angle of ``R_est^T R_gt`` in degrees,
* translation error: distance between the two camera centres (the c2w translation columns), in the units
  of the poses passed in.

Success rates count a query as localized at a threshold pair ``(deg, dist)`` when
``rot_err <= deg`` **and** ``trans_err <= dist`` (both bounds inclusive). Non-finite errors (NaN/inf, e.g. a
failed localization reported as NaN) never count as successes.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

#: (rotation degrees, translation distance) pairs; distances are in the units of the translations given to
#: :func:`success_rates` (original dataset units in :func:`summarize_errors`).
SUCCESS_THRESHOLDS: Tuple[Tuple[float, float], ...] = ((1.0, 0.01), (2.0, 0.02), (5.0, 0.05))


def _check_pose_shapes(c2w_est: Tensor, c2w_gt: Tensor) -> None:
    for name, pose in (("c2w_est", c2w_est), ("c2w_gt", c2w_gt)):
        if pose.ndim < 2 or pose.shape[-2:] not in ((3, 4), (4, 4)):
            raise ValueError(f"{name} must have shape [..., 3|4, 4], got {tuple(pose.shape)}")
    if c2w_est.shape[:-2] != c2w_gt.shape[:-2]:
        raise ValueError(f"batch shapes differ: {tuple(c2w_est.shape)} vs {tuple(c2w_gt.shape)}")


def rotation_error_deg(c2w_est: Tensor, c2w_gt: Tensor) -> Tensor:
    """Geodesic rotation error in degrees.

    Computed in float64 with ``atan2(|sin|, cos)`` of the relative rotation, which stays accurate for tiny
    angles (``acos`` of a trace near 1 would lose ~0.02 deg to rounding in float32).

    Args:
        c2w_est: estimated poses ``[B, 3|4, 4]``.
        c2w_gt: ground-truth poses ``[B, 3|4, 4]``.

    Returns:
        ``[B]`` angles in degrees in ``[0, 180]``, dtype of ``c2w_est``.
    """
    _check_pose_shapes(c2w_est, c2w_gt)
    rel = c2w_est[..., :3, :3].double().transpose(-1, -2) @ c2w_gt[..., :3, :3].double()
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    # The skew-symmetric part of a rotation matrix is sin(angle) * [axis]_x.
    skew = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]], dim=-1
    )
    sin = 0.5 * torch.linalg.norm(skew, dim=-1)
    return torch.rad2deg(torch.atan2(sin, cos)).to(c2w_est.dtype)


def translation_error(c2w_est: Tensor, c2w_gt: Tensor) -> Tensor:
    """Distance between estimated and ground-truth camera centres.

    Args:
        c2w_est: estimated poses ``[B, 3|4, 4]``.
        c2w_gt: ground-truth poses ``[B, 3|4, 4]``.

    Returns:
        ``[B]`` Euclidean distances in the poses' units.
    """
    _check_pose_shapes(c2w_est, c2w_gt)
    return torch.linalg.norm(c2w_est[..., :3, 3] - c2w_gt[..., :3, 3], dim=-1)


def threshold_key(rot_deg: float, trans: float) -> str:
    """Dictionary key of one threshold pair, e.g. ``(1.0, 0.01) -> "1deg_0.01"``."""
    return f"{rot_deg:g}deg_{trans:g}"


def success_rates(
    rot_deg: Tensor, trans: Tensor, thresholds: Sequence[Tuple[float, float]] = SUCCESS_THRESHOLDS
) -> Dict[str, float]:
    """Fraction of queries within each (rotation, translation) threshold pair.

    A query succeeds at ``(deg, dist)`` when ``rot_deg <= deg and trans <= dist`` (inclusive); NaN errors fail.

    Args:
        rot_deg: ``[B]`` rotation errors in degrees.
        trans: ``[B]`` translation errors, same units as the thresholds' distances.
        thresholds: ``(deg, dist)`` pairs.

    Returns:
        ``{threshold_key(deg, dist): rate in [0, 1]}``; rates are NaN when ``B == 0``.
    """
    rot_deg = torch.as_tensor(rot_deg).reshape(-1)
    trans = torch.as_tensor(trans).reshape(-1)
    if rot_deg.shape != trans.shape:
        raise ValueError(f"rot_deg and trans must have the same length, got {rot_deg.numel()} and {trans.numel()}")
    rates: Dict[str, float] = {}
    for deg, dist in thresholds:
        if rot_deg.numel() == 0:
            rates[threshold_key(deg, dist)] = math.nan
            continue
        # Comparisons with NaN are False, so failed localizations count as failures.
        ok = (rot_deg <= deg) & (trans <= dist)
        rates[threshold_key(deg, dist)] = ok.double().mean().item()
    return rates


def summarize_errors(rot_deg: Tensor, trans: Tensor, trans_scale_to_original: float) -> Dict[str, object]:
    """Summary statistics of a localization run.

    Args:
        rot_deg: ``[B]`` rotation errors in degrees.
        trans: ``[B]`` translation errors in scene (dataparser) units.
        trans_scale_to_original: factor turning scene units into original dataset units (``1 / scale`` of
            ``dataparser_transforms.json``).

    Returns:
        dict with ``num_queries``, ``rot_deg_mean``, ``rot_deg_median``, ``trans_scene_mean``,
        ``trans_scene_median``, ``trans_original_mean``, ``trans_original_median`` (NaN-aware: failed queries
        with NaN errors are left out of means/medians; all NaN when nothing is finite) and ``success_rates``
        (a dict from :func:`success_rates` on the *scene-unit* translation errors, as the thresholds of issue #3 are stated, NaN counted as failure).
    """
    rot_deg = torch.as_tensor(rot_deg, dtype=torch.float64).reshape(-1)
    trans = torch.as_tensor(trans, dtype=torch.float64).reshape(-1)
    if rot_deg.shape != trans.shape:
        raise ValueError(f"rot_deg and trans must have the same length, got {rot_deg.numel()} and {trans.numel()}")
    trans_orig = trans * float(trans_scale_to_original)

    def stats(values: Tensor) -> Tuple[float, float]:
        finite = values[torch.isfinite(values)]
        if finite.numel() == 0:
            return math.nan, math.nan
        # quantile(0.5) averages the two middle values (torch.median would return the lower one).
        return finite.mean().item(), torch.quantile(finite, 0.5).item()

    rot_mean, rot_median = stats(rot_deg)
    ts_mean, ts_median = stats(trans)
    to_mean, to_median = stats(trans_orig)
    return {
        "num_queries": int(rot_deg.numel()),
        "rot_deg_mean": rot_mean,
        "rot_deg_median": rot_median,
        "trans_scene_mean": ts_mean,
        "trans_scene_median": ts_median,
        "trans_original_mean": to_mean,
        "trans_original_median": to_median,
        "success_rates": success_rates(rot_deg, trans),
    }
