"""Localization metrics: pose errors, success thresholds and the one summary every tool prints.

Errors compare estimated and ground-truth camera-to-world poses (any convention, as long as both use the
same one; rotation error is the same for OpenGL and OpenCV c2w because the axis flip cancels):

* rotation error: geodesic angle of ``R_est^T R_gt`` in degrees,
* translation error: distance between the two camera centres (the c2w translation columns), in the units
  of the poses passed in (scene units for every threshold and table of this project).

One convention for failures, everywhere (``metrics.json`` of ``ns-localize``, ``results.md``/``results.csv`` of
``gsloc-bench``, plots): a query whose localizer reports a failure status (:data:`FAILURE_STATUSES`: ``failed``,
``rejected``), or that has no finite error, has an **infinite** rotation and translation error. It therefore never
counts as a success, it pulls a median up (more than half failed: an infinite median), and any failure makes the
mean infinite. The number of failures is reported beside the statistics.

Success at a threshold pair ``(deg, dist)``: ``rot_err <= deg`` **and** ``trans_err <= dist`` (both inclusive).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import rigid_inverse, to_homogeneous

#: Statuses a localizer reports for one query. ``converged``: stopped because the update became small;
#: ``max_iterations``: ran out of iterations (the pose is still its answer); ``failed``: no usable pose (diverged,
#: too few matches, ...); ``rejected``: a pose was found but a check (e.g. confidence) refused it.
STATUS_CONVERGED = "converged"
STATUS_MAX_ITERATIONS = "max_iterations"
STATUS_FAILED = "failed"
STATUS_REJECTED = "rejected"
#: Statuses that count as a failure with infinite error in every summary.
FAILURE_STATUSES: Tuple[str, ...] = (STATUS_FAILED, STATUS_REJECTED)

#: (rotation degrees, translation distance) pairs; distances in scene units.
SUCCESS_THRESHOLDS: Tuple[Tuple[float, float], ...] = ((1.0, 0.01), (2.0, 0.02), (5.0, 0.05))


def is_failure(status: str) -> bool:
    """Whether a localizer status counts as a failure (infinite error) in the summaries."""
    return status in FAILURE_STATUSES


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


def _as_array(values: Any) -> np.ndarray:
    """``[B]`` float64 copy of a tensor, array or list (``None`` entries become NaN)."""
    if isinstance(values, Tensor):
        return values.detach().cpu().double().reshape(-1).numpy().copy()
    return np.array([math.nan if v is None else float(v) for v in np.asarray(values, dtype=object).reshape(-1)],
                    dtype=np.float64)


def failure_errors(rot_deg: Any, trans: Any, failed: Optional[Any] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Errors under the failure convention: ``inf`` where ``failed`` or where an error is not finite (NaN/inf).

    Args:
        rot_deg: ``[B]`` rotation errors in degrees (``None``/NaN allowed for a query without a pose).
        trans: ``[B]`` translation errors.
        failed: optional ``[B]`` bools (e.g. ``is_failure(status)``).

    Returns:
        ``([B], [B])`` float64 arrays; a query is infinite in both when it failed in either.
    """
    rot, tr = _as_array(rot_deg), _as_array(trans)
    if rot.shape != tr.shape:
        raise ValueError(f"rot_deg and trans must have the same length, got {rot.size} and {tr.size}")
    bad = ~(np.isfinite(rot) & np.isfinite(tr))
    if failed is not None:
        failed_arr = np.asarray(failed, dtype=bool).reshape(-1)
        if failed_arr.shape != rot.shape:
            raise ValueError(f"failed must have {rot.size} entries, got {failed_arr.size}")
        bad |= failed_arr
    rot[bad] = math.inf
    tr[bad] = math.inf
    return rot, tr


def success_rates(
    rot_deg: Any, trans: Any, thresholds: Sequence[Tuple[float, float]] = SUCCESS_THRESHOLDS
) -> Dict[str, float]:
    """Fraction of queries within each (rotation, translation) threshold pair.

    A query succeeds at ``(deg, dist)`` when ``rot_deg <= deg and trans <= dist`` (inclusive, compared in float64);
    non-finite errors fail.

    Args:
        rot_deg: ``[B]`` rotation errors in degrees.
        trans: ``[B]`` translation errors, same units as the thresholds' distances.
        thresholds: ``(deg, dist)`` pairs.

    Returns:
        ``{threshold_key(deg, dist): rate in [0, 1]}``; rates are NaN when ``B == 0``.
    """
    rot, tr = failure_errors(rot_deg, trans)
    return {
        threshold_key(deg, dist): float(np.mean((rot <= deg) & (tr <= dist))) if rot.size else math.nan
        for deg, dist in thresholds
    }


def summarize(
    rot_deg: Any,
    trans: Any,
    failed: Optional[Any] = None,
    seconds: Optional[Sequence[float]] = None,
    iterations: Optional[Sequence[float]] = None,
    thresholds: Sequence[Tuple[float, float]] = SUCCESS_THRESHOLDS,
) -> Dict[str, Any]:
    """The summary of a set of localized queries (or benchmark trials), under the failure convention above.

    Args:
        rot_deg: ``[B]`` rotation errors in degrees (``None``/NaN: no pose).
        trans: ``[B]`` translation errors in scene units (``None``/NaN: no pose).
        failed: optional ``[B]`` bools: the localizer reported a failure (see :func:`is_failure`).
        seconds: optional ``[B]`` wall-clock seconds per query.
        iterations: optional ``[B]`` iterations per query.
        thresholds: success thresholds ``(deg, dist)``.

    Returns:
        ``num_queries``, ``num_failed`` (failed or without finite error), ``rot_deg_mean``, ``rot_deg_median``,
        ``trans_mean``, ``trans_median`` (``inf`` once failures weigh in, NaN when ``B == 0``), ``success_rates``
        (``{threshold_key: rate}``), and ``seconds_mean``, ``seconds_median``, ``iterations_median`` (NaN when
        not given or empty). Medians average the two middle values.
    """
    rot, tr = failure_errors(rot_deg, trans, failed)

    def stat(values: np.ndarray, fn) -> float:
        return float(fn(values)) if values.size else math.nan

    def optional(values: Optional[Sequence[float]], fn) -> float:
        if values is None:
            return math.nan
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        return stat(array, fn)

    return {
        "num_queries": int(rot.size),
        "num_failed": int(np.sum(~np.isfinite(rot))),
        "rot_deg_mean": stat(rot, np.mean),
        "rot_deg_median": stat(rot, np.median),
        "trans_mean": stat(tr, np.mean),
        "trans_median": stat(tr, np.median),
        "success_rates": success_rates(rot, tr, thresholds),
        "seconds_mean": optional(seconds, np.mean),
        "seconds_median": optional(seconds, np.median),
        "iterations_median": optional(iterations, np.median),
    }


#: The success threshold the confidence is judged against (precision and recall of accepted poses).
CONFIDENCE_THRESHOLD_KEY: Tuple[float, float] = (5.0, 0.05)


def precision_recall(rot_deg: Any, trans: Any, accepted: Any, success: Tuple[float, float] = CONFIDENCE_THRESHOLD_KEY
                     ) -> Tuple[float, float]:
    """Precision and recall of the accepted poses against a success threshold.

    Args:
        rot_deg, trans: ``[B]`` errors of each result's pose whatever its status (``None``/NaN: no pose).
        accepted: ``[B]`` bools, the result was accepted (a pose, and neither failed nor rejected).
        success: ``(deg, dist)`` threshold of a correct pose.

    Returns:
        ``(precision, recall)``: of the accepted poses, the share that is correct; of the correct poses, the share
        accepted (NaN when the denominator is empty).
    """
    rot, tr = _as_array(rot_deg), _as_array(trans)
    acc = np.asarray(accepted, dtype=bool).reshape(-1)
    with np.errstate(invalid="ignore"):
        correct = np.isfinite(rot) & np.isfinite(tr) & (rot <= success[0]) & (tr <= success[1])
    precision = float(np.mean(correct[acc])) if acc.any() else math.nan
    recall = float(np.mean(acc[correct])) if correct.any() else math.nan
    return precision, recall


# -- strict JSON for summaries with infinite errors ---------------------------------------------------------------

#: How non-finite numbers are written in summary files (strict JSON has no Infinity or NaN).
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def to_strict_json(value: Any, indent: Optional[int] = None) -> str:
    """JSON text of a summary in which infinite / NaN floats (failures) become the strings ``"inf"``, ``"-inf"``,
    ``"nan"``, so any strict JSON parser (browsers, jq) reads it. :func:`from_strict_json` reverses it."""
    return json.dumps(_strict(value), indent=indent, allow_nan=False)


def from_strict_json(text: str) -> Any:
    """Parse :func:`to_strict_json` output: ``"inf"``, ``"-inf"``, ``"nan"`` strings become floats again (the bare
    ``Infinity`` / ``NaN`` of files written before are accepted too)."""

    def restore(value: Any) -> Any:
        if isinstance(value, str) and value in _NONFINITE:
            return _NONFINITE[value]
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json.loads(text))


# -- trajectories (sequences of frames) ---------------------------------------------------------------------------


def relative_pose_errors(c2w_est: Tensor, c2w_gt: Tensor) -> Tuple[Tensor, Tensor]:
    """Relative pose error between consecutive frames (RPE with a step of one frame, as the TUM tools compute it).

    For frames ``i`` and ``i + 1`` the error is ``E = (Q_i^-1 Q_{i+1})^-1 (P_i^-1 P_{i+1})`` with ``Q`` the ground
    truth and ``P`` the estimate (camera-to-world): the estimated motion between the two frames compared with the
    true motion, in the first camera's axes. Frame-to-frame jitter shows here even when the absolute error is small.

    Args:
        c2w_est: ``[N, 3|4, 4]`` estimated camera-to-world poses (any convention, the same as ``c2w_gt``).
        c2w_gt: ``[N, 3|4, 4]`` ground truth.

    Returns:
        ``(rotation [N-1] degrees, translation [N-1] in the poses' units)``, float64; NaN where either frame of a
        pair has no finite pose.
    """
    _check_pose_shapes(c2w_est, c2w_gt)
    est, gt = to_homogeneous(c2w_est.double()), to_homogeneous(c2w_gt.double())
    if est.shape[0] < 2:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    finite = torch.isfinite(est).flatten(1).all(dim=1) & torch.isfinite(gt).flatten(1).all(dim=1)
    pair_ok = finite[:-1] & finite[1:]
    est = torch.where(finite[:, None, None], est, torch.eye(4, dtype=torch.float64))
    motion_est = rigid_inverse(est[:-1]) @ est[1:]
    motion_gt = rigid_inverse(gt[:-1]) @ gt[1:]
    error = rigid_inverse(motion_gt) @ motion_est
    rot = rotation_error_deg(error, torch.eye(4, dtype=torch.float64).expand_as(error).contiguous())
    trans = torch.linalg.norm(error[:, :3, 3], dim=-1)
    nan = torch.full_like(rot, math.nan)
    return torch.where(pair_ok, rot, nan), torch.where(pair_ok, trans, nan)


def _rmse(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values ** 2))) if values.size else math.nan


def summarize_trajectory(c2w_est: Tensor, c2w_gt: Tensor, lost: Optional[Sequence[bool]] = None,
                         relocalized: Optional[Sequence[bool]] = None,
                         seconds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The trajectory metrics of one tracked sequence.

    * ``ate_rmse``: absolute trajectory error, RMSE of the distances between estimated and true camera centres,
      **without alignment**: the poses are estimated in the scene's own frame (the frame of the trained model and
      of the ground truth), so no similarity or rigid fit is applied (which would hide a global offset);
    * ``rot_rmse_deg``: RMSE of the per-frame geodesic rotation errors;
    * ``rpe_trans_rmse`` / ``rpe_rot_rmse_deg``: RMSE of :func:`relative_pose_errors` (consecutive frames);
    * ``num_lost``: frames whose final pose the tracker could not confirm (see
      :mod:`nerfstudio_gsloc.localize.sequence`), ``num_relocalized``: frames it re-localized;
    * ``seconds_per_frame_mean`` / ``_median`` / ``_max``.

    Frames without a finite pose are left out of the RMSEs and counted in ``num_without_pose``.

    Args:
        c2w_est, c2w_gt: ``[N, 3|4, 4]`` camera-to-world poses in the same frame and units (scene units here).
        lost, relocalized: optional ``[N]`` bools per frame.
        seconds: optional ``[N]`` wall-clock seconds per frame.
    """
    _check_pose_shapes(c2w_est, c2w_gt)
    est, gt = c2w_est.double(), c2w_gt.double()
    finite = (torch.isfinite(est).flatten(1).all(dim=1) & torch.isfinite(gt).flatten(1).all(dim=1)).numpy()
    rot = np.full(est.shape[0], math.nan)
    trans = np.full(est.shape[0], math.nan)
    if finite.any():
        rot[finite] = rotation_error_deg(est[finite], gt[finite]).numpy()
        trans[finite] = translation_error(est[finite], gt[finite]).numpy()
    rpe_rot, rpe_trans = (t.numpy() for t in relative_pose_errors(est, gt))
    secs = np.asarray(seconds if seconds is not None else [], dtype=np.float64)
    return {
        "num_frames": int(est.shape[0]),
        "num_without_pose": int((~finite).sum()),
        "ate_rmse": _rmse(trans),
        "ate_max": float(np.nanmax(trans)) if finite.any() else math.nan,
        "ate_aligned": False,
        "rot_rmse_deg": _rmse(rot),
        "rot_max_deg": float(np.nanmax(rot)) if finite.any() else math.nan,
        "rpe_trans_rmse": _rmse(rpe_trans),
        "rpe_rot_rmse_deg": _rmse(rpe_rot),
        "num_lost": int(np.sum(np.asarray(lost, dtype=bool))) if lost is not None else 0,
        "num_relocalized": int(np.sum(np.asarray(relocalized, dtype=bool))) if relocalized is not None else 0,
        "seconds_per_frame_mean": float(secs.mean()) if secs.size else math.nan,
        "seconds_per_frame_median": float(np.median(secs)) if secs.size else math.nan,
        "seconds_per_frame_max": float(secs.max()) if secs.size else math.nan,
        "rot_err_deg": rot.tolist(),
        "trans_err": trans.tolist(),
    }
