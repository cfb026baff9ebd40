"""Per-query localization losses: photometric (iNeRF), depth + depth contours (GSplatLoc), reprojection (iComMa).

All losses take a batch of ``B`` queries and return a ``[B]`` tensor (one loss per query), so that queries
optimised together stay independent. Masked means over an empty mask are 0 (the query then gets no gradient
from that term); callers should watch the rendered alpha coverage themselves.

Conventions: images are ``[B, H, W, C]`` (channels last, like nerfstudio/gsplat renders); depth is z-depth
along the OpenCV camera +z axis in scene units; ``K`` uses pixel centres at ``+0.5``; poses are OpenGL
camera-to-world and are converted through :mod:`nerfstudio_gsloc.camera_conventions`.
"""

from __future__ import annotations

from typing import Optional

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c

# Points closer than this (scene units, along +z) count as behind the camera for reprojection.
_MIN_POINT_DEPTH = 1e-6


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [B, ...]`` over ``mask [B, ...]`` (same shape, bool, or float weights) per batch item; 0 for
    empty masks."""
    mask_f = mask.to(values.dtype)
    dims = tuple(range(1, values.ndim))
    total = (values * mask_f).sum(dim=dims)
    count = mask_f.sum(dim=dims)
    return total / count.clamp_min(1.0)


def apply_color_affine(rgb: Tensor, color_affine: Tensor) -> Tensor:
    """Per-query affine colour transform ``rgb' = A rgb + b``.

    Args:
        rgb: ``[B, H, W, 3]`` colours.
        color_affine: ``[B, 3, 4]`` matrices ``[A | b]``.

    Returns:
        ``[B, H, W, 3]`` transformed colours (not clamped, to keep gradients).
    """
    if color_affine.shape != (rgb.shape[0], 3, 4):
        raise ValueError(f"color_affine must have shape [{rgb.shape[0]}, 3, 4], got {tuple(color_affine.shape)}")
    mat = color_affine[:, :, :3].to(device=rgb.device, dtype=rgb.dtype)
    bias = color_affine[:, :, 3].to(device=rgb.device, dtype=rgb.dtype)
    return torch.einsum("bij,bhwj->bhwi", mat, rgb) + bias[:, None, None, :]


def photometric_loss(
    render_rgb: Tensor,
    query_rgb: Tensor,
    render_alpha: Tensor,
    query_mask: Optional[Tensor] = None,
    ssim_weight: float = 0.2,
    alpha_threshold: float = 0.5,
    color_affine: Optional[Tensor] = None,
    robust_scale: float = 0.0,
) -> Tensor:
    """Masked ``(1 - w) * L1 + w * D-SSIM`` between render and query (3DGS-style photometric loss).

    With ``robust_scale > 0`` each pixel is weighted by the Cauchy weight ``1 / (1 + (r / c)^2)`` of its L1
    residual ``r``, ``c = robust_scale x`` the query's median residual (weights held constant within the step, as
    in iteratively reweighted least squares): pixels the model gets badly wrong (a floater, a reflection, a moved
    object) stop pulling the pose, while the bulk of the image keeps its full weight.

    D-SSIM is ``(1 - SSIM) / 2`` with an 11x11 Gaussian window, averaged over the mask. It is computed on the
    full image after replacing masked-out render pixels by the query's, so whatever the render shows outside
    the mask neither changes the loss nor receives gradient.

    Args:
        render_rgb: ``[B, H, W, 3]`` rendered colours in ``[0, 1]``.
        query_rgb: ``[B, H, W, 3]`` query images in ``[0, 1]``.
        render_alpha: ``[B, H, W, 1]`` rendered opacity; pixels with ``alpha < alpha_threshold`` are ignored.
        query_mask: optional ``[B, H, W, 1]`` query validity mask (bool or float, ``> 0.5`` = valid).
        ssim_weight: weight ``w`` of the D-SSIM term.
        alpha_threshold: minimum rendered alpha of a pixel that counts.
        color_affine: optional ``[B, 3, 4]`` per-query colour correction ``[A | b]`` applied to the render.
        robust_scale: scale of the Cauchy weighting in units of the median residual (0 = plain means).

    Returns:
        ``[B]`` per-query losses (0 where no pixel is valid).
    """
    if render_rgb.shape != query_rgb.shape or render_rgb.ndim != 4:
        raise ValueError(
            f"render_rgb {tuple(render_rgb.shape)} and query_rgb {tuple(query_rgb.shape)} must match [B,H,W,3]"
        )
    if color_affine is not None:
        render_rgb = apply_color_affine(render_rgb, color_affine)
    mask = render_alpha[..., 0] >= alpha_threshold
    if query_mask is not None:
        mask = mask & (query_mask[..., 0].to(device=mask.device, dtype=render_rgb.dtype) > 0.5)
    query_rgb = query_rgb.to(render_rgb.dtype)
    l1 = (render_rgb - query_rgb).abs().mean(dim=-1)
    weight = mask.to(l1.dtype)
    if robust_scale > 0:
        with torch.no_grad():
            median = torch.where(mask, l1, torch.full_like(l1, float("nan"))).flatten(1).nanmedian(dim=1).values
            scale = (robust_scale * torch.nan_to_num(median, nan=1.0)).clamp_min(1e-3)[:, None, None]
            weight = weight / (1.0 + (l1 / scale) ** 2)
    loss = (1.0 - ssim_weight) * _masked_mean(l1, weight)
    if ssim_weight > 0:
        # Outside the mask the render is replaced by the query, so SSIM windows that straddle the mask border
        # only see discrepancies of valid pixels (and masked-out render pixels get no gradient).
        render_for_ssim = torch.where(mask[..., None], render_rgb, query_rgb)
        ssim_map = kornia.metrics.ssim(
            render_for_ssim.permute(0, 3, 1, 2), query_rgb.permute(0, 3, 1, 2), window_size=11, max_val=1.0
        )
        dssim = ((1.0 - ssim_map) / 2.0).mean(dim=1)
        loss = loss + ssim_weight * _masked_mean(dssim, weight)
    return loss


def depth_loss(
    render_depth: Tensor,
    query_depth: Tensor,
    render_alpha: Tensor,
    edge_weight: float = 1.0,
    alpha_threshold: float = 0.5,
) -> Tensor:
    """Masked L1 on depth plus L1 between Sobel edge magnitudes of the depth maps (GSplatLoc-style contours).

    Valid pixels have ``query_depth > 0`` and ``render_alpha >= alpha_threshold``. The edge term only uses
    pixels whose whole 3x3 Sobel neighbourhood is valid, so holes in the query depth or empty render regions
    do not create spurious contours.

    Args:
        render_depth: ``[B, H, W, 1]`` rendered z-depth (scene units).
        query_depth: ``[B, H, W, 1]`` query z-depth; ``<= 0`` marks missing depth.
        render_alpha: ``[B, H, W, 1]`` rendered opacity.
        edge_weight: weight of the Sobel edge term.
        alpha_threshold: minimum rendered alpha of a pixel that counts.

    Returns:
        ``[B]`` per-query losses (0 where no pixel is valid).
    """
    if render_depth.shape != query_depth.shape or render_depth.ndim != 4 or render_depth.shape[-1] != 1:
        raise ValueError(
            f"render_depth {tuple(render_depth.shape)} and query_depth {tuple(query_depth.shape)} must match [B,H,W,1]"
        )
    query_depth = query_depth.to(device=render_depth.device, dtype=render_depth.dtype)
    valid = (query_depth > 0) & (render_alpha >= alpha_threshold)
    # Zero out invalid pixels so NaN/inf renders or missing depth cannot leak into the sums or gradients.
    render_d = torch.where(valid, render_depth, torch.zeros_like(render_depth))
    query_d = torch.where(valid, query_depth, torch.zeros_like(query_depth))
    loss = _masked_mean((render_d - query_d).abs()[..., 0], valid[..., 0])
    if edge_weight > 0:
        render_edges = kornia.filters.sobel(render_d.permute(0, 3, 1, 2))
        query_edges = kornia.filters.sobel(query_d.permute(0, 3, 1, 2))
        # Erode the mask by the Sobel footprint: min-pool of a 0/1 mask = max-pool of its complement.
        invalid = (~valid).permute(0, 3, 1, 2).to(render_depth.dtype)
        edge_valid = F.max_pool2d(F.pad(invalid, (1, 1, 1, 1), value=1.0), kernel_size=3, stride=1) < 0.5
        edge_l1 = (render_edges - query_edges).abs()
        loss = loss + edge_weight * _masked_mean(edge_l1[:, 0], edge_valid[:, 0])
    return loss


def reprojection_loss(
    points_world: Tensor,
    keypoints_query: Tensor,
    query_index: Tensor,
    c2w: Tensor,
    Ks: Tensor,
    num_queries: Optional[int] = None,
    huber_delta_px: float = 2.0,
) -> Tensor:
    """Mean Huber pixel reprojection error of matched 3D points, per query (iComMa-style matching loss).

    Points are projected through the (differentiable) OpenGL camera-to-world pose of their query, converted to
    an OpenCV world-to-camera with :func:`opengl_c2w_to_opencv_w2c`. The Huber function is applied to the
    Euclidean pixel residual ``r``: ``0.5 r^2`` for ``r <= delta``, ``delta (r - 0.5 delta)`` above.
    Points at or behind the camera plane are left out.

    Args:
        points_world: ``[M, 3]`` world (scene-frame) points.
        keypoints_query: ``[M, 2]`` matched query pixels ``(x, y)``, pixel centres at ``+0.5``.
        query_index: ``[M]`` long, which query each point belongs to.
        c2w: ``[B, 3|4, 4]`` OpenGL camera-to-world poses being optimised.
        Ks: ``[B, 3, 3]`` intrinsics.
        num_queries: number of queries ``B`` (defaults to ``c2w.shape[0]``).
        huber_delta_px: Huber threshold in pixels.

    Returns:
        ``[B]`` mean Huber loss per query; 0 for queries without (valid) points.
    """
    num_queries = c2w.shape[0] if num_queries is None else int(num_queries)
    if c2w.shape[0] != num_queries or Ks.shape[0] != num_queries:
        raise ValueError(f"c2w {tuple(c2w.shape)} and Ks {tuple(Ks.shape)} must have {num_queries} queries")
    out = torch.zeros(num_queries, dtype=c2w.dtype, device=c2w.device)
    if points_world.shape[0] == 0:
        # Keep the graph connected so callers can always backward().
        return out + 0.0 * c2w.sum()
    query_index = query_index.to(device=c2w.device, dtype=torch.long)
    w2c = opengl_c2w_to_opencv_w2c(c2w)[query_index]  # [M, 4, 4]
    points = points_world.to(device=c2w.device, dtype=c2w.dtype)
    cam = (w2c[:, :3, :3] @ points[:, :, None])[..., 0] + w2c[:, :3, 3]
    z = cam[:, 2]
    in_front = z > _MIN_POINT_DEPTH
    # Divide by a safe depth so excluded points cannot produce inf/NaN gradients.
    z_safe = torch.where(in_front, z, torch.ones_like(z))
    K = Ks.to(device=c2w.device, dtype=c2w.dtype)[query_index]
    u = K[:, 0, 0] * cam[:, 0] / z_safe + K[:, 0, 1] * cam[:, 1] / z_safe + K[:, 0, 2]
    v = K[:, 1, 1] * cam[:, 1] / z_safe + K[:, 1, 2]
    residual = torch.stack([u, v], dim=-1) - keypoints_query.to(device=c2w.device, dtype=c2w.dtype)
    # sqrt(r^2 + eps) keeps the gradient finite at a zero residual.
    dist = torch.sqrt((residual**2).sum(dim=-1) + 1e-12)
    weight = in_front.to(c2w.dtype)
    total = out.index_add(0, query_index, huber(dist, huber_delta_px) * weight)
    count = torch.zeros_like(out).index_add(0, query_index, weight)
    return total / count.clamp_min(1.0)


def huber(r: Tensor, delta: float) -> Tensor:
    """``0.5 r^2`` for ``|r| <= delta``, ``delta (|r| - 0.5 delta)`` above."""
    a = r.abs()
    return torch.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))


def smooth_l1(r: Tensor, floor: float) -> Tensor:
    """``|r|`` above ``floor``, the matching parabola below it (value and slope continuous)."""
    a = r.abs()
    return torch.where(a <= floor, 0.5 * a * a / floor, a - 0.5 * floor)
