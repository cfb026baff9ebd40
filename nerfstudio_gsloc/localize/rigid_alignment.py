"""Weighted rigid alignment of two 3D point sets (Kabsch/Umeyama without scale), differentiable end to end.

Given ``N`` point pairs ``src_i`` (e.g. points in a camera's frame) and ``dst_i`` (the same points in the scene
frame) with weights ``w_i >= 0``, :func:`weighted_rigid_alignment` returns the rotation ``R`` and translation
``t`` minimising ``sum_i w_i ||R src_i + t - dst_i||^2``. With ``src`` in the OpenCV camera frame and ``dst`` in
the scene frame, ``[R | t]`` is the OpenCV camera-to-world pose (convert with
:mod:`nerfstudio_gsloc.camera_conventions`).

The rotation is found with Horn's closed-form quaternion method (the unit quaternion is the eigenvector of the
largest eigenvalue of a symmetric ``4x4`` matrix built from the weighted cross-covariance) rather than an SVD:
the result is a proper rotation by construction (no reflection fix-up), and the gradient of a symmetric
eigenvector involves only the gaps between the largest eigenvalue and the others, which stay large for any
well-posed alignment; an SVD's backward pass divides by gaps between *all* singular values, which vanish for
planar point sets. Everything is batched, works in float32 or float64, and is differentiable with respect to
``src``, ``dst`` and ``weights`` (``torch.autograd.gradcheck`` holds it to finite differences in the tests).

:func:`robust_rigid_alignment` adds a few iteratively reweighted rounds (Cauchy weights of the residuals) for
inference, and :func:`alignment_confidence` turns weights and residuals into a number in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def _check(src: Tensor, dst: Tensor, weights: Tensor) -> None:
    if src.ndim != 3 or src.shape[-1] != 3 or src.shape != dst.shape:
        raise ValueError(f"src and dst must both be [B, N, 3], got {tuple(src.shape)} and {tuple(dst.shape)}")
    if weights.shape != src.shape[:2]:
        raise ValueError(f"weights must be [B, N] = {tuple(src.shape[:2])}, got {tuple(weights.shape)}")


def quaternion_to_rotation(q: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (``w, x, y, z``; need not be normalised) -> rotation matrices ``[..., 3, 3]``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def weighted_rigid_alignment(src: Tensor, dst: Tensor, weights: Tensor, eps: float = 1e-9) -> Tuple[Tensor, Tensor]:
    """The rigid transform that best maps ``src`` onto ``dst`` in the weighted least-squares sense.

    Args:
        src: ``[B, N, 3]`` points in the source frame (e.g. OpenCV camera frame).
        dst: ``[B, N, 3]`` the same points in the target frame (e.g. scene frame).
        weights: ``[B, N]`` non-negative weights (need not sum to 1; at least 3 non-collinear points with
            positive weight make the problem well posed).
        eps: guards the division by the total weight.

    Returns:
        ``R [B, 3, 3]`` (a proper rotation) and ``t [B, 3]`` with ``dst_i ~ R @ src_i + t``.
    """
    _check(src, dst, weights)
    w = weights.clamp_min(0.0)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(eps)
    src_mean = (w[..., None] * src).sum(dim=1)  # [B, 3]
    dst_mean = (w[..., None] * dst).sum(dim=1)
    a = src - src_mean[:, None]
    b = dst - dst_mean[:, None]
    # Cross-covariance S_jk = sum_i w_i a_ij b_ik (Horn 1987's M).
    S = torch.einsum("bn,bnj,bnk->bjk", w, a, b)
    sxx, sxy, sxz = S[:, 0, 0], S[:, 0, 1], S[:, 0, 2]
    syx, syy, syz = S[:, 1, 0], S[:, 1, 1], S[:, 1, 2]
    szx, szy, szz = S[:, 2, 0], S[:, 2, 1], S[:, 2, 2]
    rows = [
        sxx + syy + szz, syz - szy, szx - sxz, sxy - syx,
        syz - szy, sxx - syy - szz, sxy + syx, szx + sxz,
        szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy,
        sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz,
    ]
    N = torch.stack(rows, dim=-1).reshape(-1, 4, 4)
    _, vectors = torch.linalg.eigh(N)  # eigenvalues ascending: the last eigenvector maximises q^T N q
    R = quaternion_to_rotation(vectors[..., -1])
    t = dst_mean - (R @ src_mean[..., None])[..., 0]
    return R, t


def alignment_residuals(R: Tensor, t: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """``[B, N]`` distances ``||R src_i + t - dst_i||`` (``R [B,3,3]``, ``t [B,3]``, ``src``/``dst`` ``[B,N,3]``)."""
    return (torch.einsum("bij,bnj->bni", R, src) + t[:, None] - dst).norm(dim=-1)


def robust_rigid_alignment(src: Tensor, dst: Tensor, weights: Tensor, rounds: int = 3, min_scale: float = 0.0,
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`weighted_rigid_alignment`, then ``rounds`` reweighted rounds that shrink the weight of outliers.

    Each round multiplies the given weights by Cauchy weights ``1 / (1 + (r_i / c)^2)`` of the previous
    residuals, ``c = max(2 x weighted median residual, min_scale)``: pairs that disagree with the consensus stop
    pulling the pose (predicted points are wrong in patches, e.g. on thin structures).

    Args:
        src, dst, weights: as in :func:`weighted_rigid_alignment`.
        rounds: reweighting rounds after the first alignment (0: plain alignment).
        min_scale: lower bound of ``c`` (same units as the points), so a near-perfect fit does not end up
            trusting a handful of pairs.

    Returns:
        ``R [B, 3, 3]``, ``t [B, 3]`` and the final effective weights ``[B, N]``.
    """
    R, t = weighted_rigid_alignment(src, dst, weights)
    effective = weights
    for _ in range(max(0, rounds)):
        residuals = alignment_residuals(R, t, src, dst)
        scale = torch.stack([weighted_median(residuals[b], weights[b]) for b in range(residuals.shape[0])])
        scale = (2.0 * scale).clamp_min(max(min_scale, 1e-12))
        effective = weights / (1.0 + (residuals / scale[:, None]) ** 2)
        R, t = weighted_rigid_alignment(src, dst, effective)
    return R, t, effective


def weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted median of ``values [N]`` with ``weights [N]`` (0-dim tensor; 0 when every weight is 0)."""
    order = torch.argsort(values)
    cumulative = torch.cumsum(weights[order].clamp_min(0.0), dim=0)
    if cumulative.numel() == 0 or float(cumulative[-1]) <= 0:
        return values.new_zeros(())
    position = torch.searchsorted(cumulative, 0.5 * cumulative[-1])
    return values[order][position.clamp_max(values.numel() - 1)]


def alignment_confidence(residuals: Tensor, weights: Tensor, tolerance: float, full_support: float) -> Tensor:
    """Confidence in ``[0, 1]`` of alignments from their residuals and weights.

    ``share x coverage``: ``share`` is the fraction of the total weight on pairs whose residual is within
    ``tolerance`` (how much of what the network trusts agrees with the pose); ``coverage`` is the weight mass
    of those pairs divided by ``full_support`` (clamped to 1): a pose carried by two or three trusted points is
    not trusted either, whatever their residuals.

    Args:
        residuals: ``[B, N]`` alignment residuals (:func:`alignment_residuals`).
        weights: ``[B, N]`` the network's weights in ``[0, 1]``.
        tolerance: residual below which a pair agrees with the pose (same units as the residuals).
        full_support: total weight of agreeing pairs at which ``coverage`` reaches 1.

    Returns:
        ``[B]`` confidences.
    """
    w = weights.clamp(0.0, 1.0)
    agreeing = (w * (residuals <= tolerance)).sum(dim=1)
    share = agreeing / w.sum(dim=1).clamp_min(1e-12)
    coverage = (agreeing / max(full_support, 1e-12)).clamp(max=1.0)
    return share * coverage
