"""Absolute pose from 2D-3D correspondences: keypoints of a render lifted to world points through its depth
(:func:`lift_keypoints`), then PnP + RANSAC on the query's matching keypoints (:func:`pnp_ransac`, OpenCV),
reprojection errors of a pose (:func:`reprojection_errors`) and its Levenberg-Marquardt refinement on the tight
inliers (:func:`refine_on_tight_inliers`).

Used by gsloc's matching rounds (:mod:`~nerfstudio_gsloc.localize.matching_stage`), the ``pnp`` localizer and its
map (:mod:`~nerfstudio_gsloc.localize.scene_map`); the 2D-2D matchers that produce the keypoints are in
:mod:`~nerfstudio_gsloc.localize.matching`.

Conventions: keypoints are ``[M, 2]`` ``(x, y)`` in pixels with the centre of pixel ``(col, row)`` at
``(col + 0.5, row + 0.5)`` (the same convention as the ``[3, 3]`` intrinsics ``K``); depth is ``[H, W]`` OpenCV
z-depth (+z forward) in scene units; poses are OpenGL camera-to-world ``[3, 4]`` (or ``[4, 4]`` where accepted),
world points ``[M, 3]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import (opencv_w2c_to_opengl_c2w, opengl_c2w_to_opencv_w2c, project_points,
                                                unproject_points)


def lift_keypoints(
    kpts: Tensor,
    depth: Tensor,
    K: Tensor,
    c2w: Tensor,
    alpha: Optional[Tensor] = None,
    alpha_threshold: float = 0.5,
    interpolation: Literal["bilinear", "nearest"] = "bilinear",
) -> Tuple[Tensor, Tensor]:
    """Back-project keypoints of a rendered (or depth-carrying) view to world points.

    Depth is looked up at the keypoint (pixel centres at ``+0.5``): ``nearest`` takes the pixel containing it,
    ``bilinear`` interpolates the four nearest pixel centres (clamped at the image border). A keypoint is
    invalid when it lies outside the image, or when any pixel it reads has ``depth <= 0`` or
    ``alpha < alpha_threshold`` (so no point is interpolated across a hole or the scene's silhouette).

    Args:
        kpts: ``[M, 2]`` keypoints ``(x, y)``.
        depth: ``[H, W]`` or ``[H, W, 1]`` z-depth (OpenCV +z, scene units).
        K: ``[3, 3]`` intrinsics.
        c2w: ``[3|4, 4]`` OpenGL camera-to-world pose of the view.
        alpha: optional ``[H, W]`` or ``[H, W, 1]`` rendered opacity.
        alpha_threshold: minimum opacity of a usable pixel.
        interpolation: ``"bilinear"`` or ``"nearest"`` depth lookup.

    Returns:
        ``points_world [M, 3]`` (zeros where invalid) and ``valid [M]`` bool, on ``depth``'s device.
    """
    if depth.ndim == 3:
        depth = depth[..., 0]
    if alpha is not None and alpha.ndim == 3:
        alpha = alpha[..., 0]
    height, width = depth.shape
    device, dtype = depth.device, depth.dtype if depth.is_floating_point() else torch.float32
    depth = depth.to(dtype)
    kpts = kpts.to(device=device, dtype=dtype)
    x, y = kpts[:, 0], kpts[:, 1]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height) & torch.isfinite(kpts).all(dim=-1)
    usable = depth > 0
    if alpha is not None:
        usable = usable & (alpha.to(device) >= alpha_threshold)

    if interpolation == "nearest":
        col = x.floor().long().clamp(0, width - 1)
        row = y.floor().long().clamp(0, height - 1)
        z = depth[row, col]
        valid = inside & usable[row, col]
    elif interpolation == "bilinear":
        # Continuous coordinate x has pixel-index coordinate x - 0.5.
        xi, yi = x - 0.5, y - 0.5
        x0f, y0f = xi.floor(), yi.floor()
        wx, wy = xi - x0f, yi - y0f
        x0 = x0f.long().clamp(0, width - 1)
        x1 = (x0f.long() + 1).clamp(0, width - 1)
        y0 = y0f.long().clamp(0, height - 1)
        y1 = (y0f.long() + 1).clamp(0, height - 1)
        z = (
            depth[y0, x0] * (1 - wx) * (1 - wy)
            + depth[y0, x1] * wx * (1 - wy)
            + depth[y1, x0] * (1 - wx) * wy
            + depth[y1, x1] * wx * wy
        )
        valid = inside & usable[y0, x0] & usable[y0, x1] & usable[y1, x0] & usable[y1, x1]
    else:
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")

    world = unproject_points(c2w, K, kpts, z)
    valid = valid & torch.isfinite(world).all(dim=-1)
    world = torch.where(valid[:, None], world, torch.zeros_like(world))
    return world, valid


@dataclass
class PnPResult:
    """Outcome of :func:`pnp_ransac`."""

    c2w: Optional[Tensor]
    """``[3, 4]`` OpenGL camera-to-world pose, or ``None`` when PnP failed or found too few inliers."""
    inliers: Tensor
    """``[M]`` bool, points within the reprojection threshold of the final pose (all False on failure)."""

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum().item())


def pnp_ransac(
    points_world: Tensor,
    kpts_query: Tensor,
    K: Tensor,
    reproj_px: float = 3.0,
    min_inliers: int = 12,
    iterations: int = 1000,
    confidence: float = 0.9999,
) -> PnPResult:
    """Absolute pose from 2D-3D matches: EPnP inside RANSAC, then Levenberg-Marquardt refinement on inliers.

    Args:
        points_world: ``[M, 3]`` world points.
        kpts_query: ``[M, 2]`` query keypoints ``(x, y)``, pixel centres at ``+0.5`` (same convention as ``K``).
        K: ``[3, 3]`` query intrinsics.
        reproj_px: inlier threshold on the reprojection error in pixels.
        min_inliers: fewer inliers than this (after refinement) is a failure.
        iterations: RANSAC iterations.
        confidence: RANSAC confidence.

    Returns:
        :class:`PnPResult` with the OpenGL camera-to-world pose (``points_world``'s dtype/device) and the
        inlier mask of the refined pose.
    """
    num = points_world.shape[0]
    device = points_world.device
    dtype = points_world.dtype if points_world.is_floating_point() else torch.float32
    failed = PnPResult(c2w=None, inliers=torch.zeros(num, dtype=torch.bool, device=device))
    if num < max(int(min_inliers), 6):  # EPnP's RANSAC samples need at least 5-6 points
        return failed
    obj = points_world.detach().cpu().double().numpy().reshape(-1, 1, 3)
    img = kpts_query.detach().cpu().double().numpy().reshape(-1, 1, 2)
    K_np = K.detach().cpu().double().numpy()
    try:
        ok, rvec, tvec, inl = cv2.solvePnPRansac(
            obj,
            img,
            K_np,
            None,
            iterationsCount=int(iterations),
            reprojectionError=float(reproj_px),
            confidence=float(confidence),
            flags=cv2.SOLVEPNP_EPNP,
        )
    except cv2.error:
        return failed
    if not ok or inl is None or len(inl) < min_inliers:
        return failed

    def inlier_mask(rvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K_np, None)
        err = np.linalg.norm(proj.reshape(-1, 2) - img.reshape(-1, 2), axis=-1)
        rot, _ = cv2.Rodrigues(rvec)
        z = (obj.reshape(-1, 3) @ rot.T + tvec.reshape(1, 3))[:, 2]
        return (err <= reproj_px) & (z > 0)

    mask = np.zeros(num, dtype=bool)
    mask[inl.reshape(-1)] = True
    # Refine on the inliers, re-select inliers with the refined pose, and refine once more.
    for _ in range(2):
        rvec, tvec = cv2.solvePnPRefineLM(obj[mask], img[mask], K_np, None, rvec, tvec)
        mask = inlier_mask(rvec, tvec)
        if mask.sum() < min_inliers:
            return failed
    rot, _ = cv2.Rodrigues(rvec)
    w2c = np.eye(4)
    w2c[:3, :3] = rot
    w2c[:3, 3] = tvec.reshape(3)
    c2w = opencv_w2c_to_opengl_c2w(torch.from_numpy(w2c)).to(device=device, dtype=dtype)
    return PnPResult(c2w=c2w, inliers=torch.from_numpy(mask).to(device))


def reprojection_errors(c2w: Tensor, K: Tensor, kpts: Tensor, points: Tensor) -> Tensor:
    """``[M]`` pixel distance between each point projected through ``c2w`` and its keypoint (``inf`` behind the
    camera). ``c2w [3, 4]`` OpenGL camera-to-world, ``K [3, 3]``, ``kpts [M, 2]`` (centres at ``+0.5``),
    ``points [M, 3]`` (scene frame)."""
    uv, z = project_points(c2w[None, :3, :4].cpu(), K.cpu(), points.cpu())
    err = torch.linalg.norm(uv[0] - kpts.double().cpu(), dim=-1)
    return torch.where(z[0] > 1e-6, err, torch.full_like(err, math.inf))


def refine_on_tight_inliers(
    points_world: Tensor, kpts_query: Tensor, K: Tensor, c2w: Tensor, px: float, min_inliers: int,
    rounds: int = 2, fallback_inliers: int = 0,
) -> Tuple[Tensor, int]:
    """Levenberg-Marquardt refinement of a pose on the correspondences that reproject within ``px`` pixels.

    Args:
        points_world: ``[M, 3]`` world points.
        kpts_query: ``[M, 2]`` query pixels (centres at ``+0.5``, the convention of ``K``).
        K: ``[3, 3]`` intrinsics.
        c2w: ``[3, 4]`` OpenGL camera-to-world starting pose (e.g. from RANSAC).
        px: inlier threshold of the refinement.
        min_inliers: with fewer inliers the starting pose is returned unchanged.
        rounds: refine / re-select rounds.
        fallback_inliers: inlier count reported when the starting pose is kept.

    Returns:
        ``(c2w [3, 4] float64, number of inliers)``.
    """
    obj = points_world.cpu().numpy().reshape(-1, 1, 3)
    img = kpts_query.cpu().numpy().reshape(-1, 2)
    K_np = K.cpu().numpy()
    w2c = opengl_c2w_to_opencv_w2c(c2w.cpu()).numpy()
    rvec, _ = cv2.Rodrigues(w2c[:3, :3])
    tvec = w2c[:3, 3].reshape(3, 1).copy()
    best = (c2w.cpu(), fallback_inliers)
    for _ in range(rounds):
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K_np, None)
        rot, _ = cv2.Rodrigues(rvec)
        depth = (obj.reshape(-1, 3) @ rot.T + tvec.reshape(1, 3))[:, 2]
        mask = (np.linalg.norm(proj.reshape(-1, 2) - img, axis=-1) <= px) & (depth > 0)
        if mask.sum() < max(min_inliers, 6):
            break
        rvec, tvec = cv2.solvePnPRefineLM(obj[mask], img[mask].reshape(-1, 1, 2), K_np, None, rvec, tvec)
        rot, _ = cv2.Rodrigues(rvec)
        refined = np.eye(4)
        refined[:3, :3], refined[:3, 3] = rot, tvec.reshape(3)
        best = (opencv_w2c_to_opengl_c2w(torch.from_numpy(refined)), int(mask.sum()))
    return best
