"""Registering an RGB-D frame's depth to the capture's own depth images (point-to-plane ICP).

The photometric optimum of a trained model sits a little off the true pose wherever the model is imperfect (on the
embedded room path about 0.07 degrees: README, "Tracking"), and the model's rendered depth carries the same error.
An RGB-D capture holds better geometry than the model: the depth images of its training views, at their known
poses. A query frame with depth is therefore aligned to them, as RGB-D odometry aligns a frame to its keyframes:

* the **map** (:func:`build_capture_depth_map`): every training view's depth pixels lifted to the scene frame
  (z-depth in scene units, the dataparser's transform and scale, :func:`~nerfstudio_gsloc.data.depth.load_scene_depth`)
  with a normal from the neighbouring pixels; pixels on a depth discontinuity (no surface to take a normal of) are
  left out; a k-d tree over the points;
* the **alignment** (:func:`register_depth`): the query's depth pixels (every ``query_stride``-th) moved by the
  current pose, each paired with its nearest map point when that point's plane passes within ``max_distance`` (a
  fraction of the query's median depth); Gauss-Newton steps on the point-to-plane distances with Huber weights at
  twice their robust spread;
* **acceptance**: the aligned pose is kept only when most query points found their surface
  (``min_overlap``) and the alignment moved the pose by a correction (``max_correction``,
  ``max_correction_deg``), not a jump: it refines a pose that localization already found, never replaces one.

Poses are nerfstudio's ``[3, 4]`` OpenGL camera-to-world in the scene frame; depth pixels are lifted to the scene
frame with :func:`~nerfstudio_gsloc.camera_conventions.unproject_points` and every ICP update is a rigid motion of
the scene frame, applied to the pose on the left.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import unproject_points
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


@dataclass
class DepthRegistrationConfig:
    """Settings of the ICP refinement of RGB-D frames against the capture's depth images."""

    enabled: bool = True
    """Refine frames that have depth when the run's training views have depth images (off: never)."""
    iterations: int = 15
    """Gauss-Newton steps at most (it stops earlier once a step moves less than ``1e-7``)."""
    max_distance: float = 0.02
    """A query point whose nearest map point's plane is further than this fraction of the query's median depth
    (or that point itself further than three times that) is not on the same surface and does not pair."""
    query_stride: int = 2
    """Every ``query_stride``-th query pixel in each direction takes part."""
    map_points: int = 2_000_000
    """At most this many map points: each training view is subsampled by a pixel stride to stay under it."""
    min_overlap: float = 0.5
    """The aligned pose is kept when at least this fraction of the query points pair with the map."""
    max_correction: float = 0.02
    """... and it moved the camera by at most this fraction of the query's median depth ..."""
    max_correction_deg: float = 2.0
    """... and turned it by at most this (degrees): further than that, the start was not the pose the depth fits."""


@dataclass
class CaptureDepthMap:
    """The training views' depth pixels in the scene frame.

    Attributes:
        points: ``[M, 3]`` float64 scene-frame points.
        normals: ``[M, 3]`` float64 unit normals (sign arbitrary: point-to-plane distances do not need it).
        views: number of training views that contributed.
    """

    points: np.ndarray
    normals: np.ndarray
    views: int

    def __post_init__(self) -> None:
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.points)


@dataclass
class RegistrationResult:
    """One alignment.

    Attributes:
        c2w: ``[3, 4]`` OpenGL camera-to-world pose: the aligned one when ``accepted``, else the starting pose.
        accepted: whether the aligned pose passed the checks.
        overlap: fraction of the query points paired with the map at the aligned pose.
        rms: RMS point-to-plane distance of the paired points (scene units).
        moved, turned: the correction's translation (scene units) and rotation (degrees).
        iterations: Gauss-Newton steps taken.
        reason: one line saying what happened.
    """

    c2w: Tensor
    accepted: bool
    overlap: float
    rms: float
    moved: float
    turned: float
    iterations: int
    reason: str


def depth_points(depth: np.ndarray, K: Any, c2w: Tensor, stride: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene-frame points of a depth image's pixel centres (every ``stride``-th) seen from ``c2w [3|4, 4]`` (OpenGL
    camera-to-world) with intrinsics ``K [3, 3]``.

    Returns:
        ``points [h, w, 3]`` float64, their z-depths ``[h, w]`` and where the depth is valid (``> 0`` and finite)
        ``[h, w]``.
    """
    z = np.asarray(depth, dtype=np.float64)[::stride, ::stride]
    v, u = np.mgrid[0:depth.shape[0]:stride, 0:depth.shape[1]:stride].astype(np.float64)
    valid = np.isfinite(z) & (z > 0)
    z = np.where(valid, z, 0.0)
    pixels = torch.from_numpy(np.stack([u + 0.5, v + 0.5], axis=-1).reshape(-1, 2))
    points = unproject_points(torch.as_tensor(c2w).double(), torch.as_tensor(K).double(), pixels,
                              torch.from_numpy(z.reshape(-1)))
    return points.numpy().reshape(*z.shape, 3), z, valid


def surface_normals(points: np.ndarray, z: np.ndarray, valid: np.ndarray,
                    max_step: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """Normals of a grid of points ``[h, w, 3]`` (any one frame) from central differences, and where they hold
    ``[h, w]``: valid pixels whose four neighbours are valid and within ``max_step`` of their z-depth ``z [h, w]``
    (relative), i.e. not on a depth discontinuity. Border pixels get none."""
    dx = np.zeros_like(points)
    dy = np.zeros_like(points)
    dx[:, 1:-1] = points[:, 2:] - points[:, :-2]
    dy[1:-1] = points[2:] - points[:-2]
    normals = np.cross(dx, dy)
    norm = np.linalg.norm(normals, axis=-1)
    good = valid & (norm > 0)
    good[:, 1:-1] &= valid[:, 2:] & valid[:, :-2] & (np.abs(z[:, 2:] - z[:, :-2]) <= max_step * z[:, 1:-1])
    good[1:-1] &= valid[2:] & valid[:-2] & (np.abs(z[2:] - z[:-2]) <= max_step * z[1:-1])
    good[0, :] = good[-1, :] = False
    good[:, 0] = good[:, -1] = False
    return normals / np.maximum(norm, 1e-300)[..., None], good


def capture_depth_map(depths: Sequence[np.ndarray], Ks: Sequence[np.ndarray], c2ws: Sequence[Tensor],
                      stride: int = 1) -> Optional[CaptureDepthMap]:
    """The depth map of views with z-depth images ``depths`` (``[H, W]`` each, scene units, ``<= 0`` missing), pinhole
    intrinsics ``Ks`` (``[3, 3]``) and OpenGL camera-to-world poses ``c2ws`` (``[3|4, 4]``, scene frame), every
    ``stride``-th pixel; ``None`` when no view holds a usable pixel."""
    points, normals, views = [], [], 0
    for depth, K, c2w in zip(depths, Ks, c2ws):
        world, z, valid = depth_points(np.asarray(depth), K, c2w, stride)
        normal, good = surface_normals(world, z, valid)
        if not good.any():
            continue
        points.append(world[good])
        normals.append(normal[good])
        views += 1
    if not points:
        return None
    return CaptureDepthMap(np.concatenate(points), np.concatenate(normals), views)


def build_capture_depth_map(outputs: Any, max_points: int = 2_000_000) -> Optional[CaptureDepthMap]:
    """The depth map (:func:`capture_depth_map`) of a dataparser's training views (``DataparserOutputs`` with
    ``depth_filenames``, read with :func:`~nerfstudio_gsloc.data.depth.load_scene_depth`), subsampled to at most
    ``max_points`` pixels; ``None`` when it has no depth images or none holds valid depth. A view with lens
    distortion has its depth image undistorted first (nearest samples, the pixel map of its colour image,
    :func:`~nerfstudio_gsloc.localize.undistort.undistort_view`), so that its pixels are on the pinhole grid of the
    undistorted intrinsics."""
    from nerfstudio_gsloc.data.depth import load_scene_depth
    from nerfstudio_gsloc.localize.undistort import camera_distortion, undistort_view

    if outputs is None or getattr(outputs, "metadata", {}).get("depth_filenames") is None:
        return None
    cameras = outputs.cameras
    count = len(outputs.image_filenames)
    pixels = sum(int(cameras.height[i]) * int(cameras.width[i]) for i in range(count))
    stride = max(1, math.ceil(math.sqrt(pixels / max(1, max_points))))
    depths, Ks, c2ws = [], [], []
    for i in range(count):
        height, width = int(cameras.height[i]), int(cameras.width[i])
        depth = load_scene_depth(outputs, i, height, width)[..., 0].numpy()
        K = cameras.get_intrinsics_matrices()[i].double().numpy()
        distortion = camera_distortion(cameras[i], f"training depth image {i}")
        if distortion is not None:
            view = undistort_view(np.zeros((height, width, 3), np.uint8), K, distortion[0], distortion[1], depth=depth)
            depth, K = view.depth, view.K
        depths.append(depth)
        Ks.append(K)
        c2ws.append(cameras.camera_to_worlds[i])
    return capture_depth_map(depths, Ks, c2ws, stride)


def _pairs(points: np.ndarray, depth_map: CaptureDepthMap, reach: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Each of ``points [N, 3]`` (scene frame) paired with its nearest map point when that point is within
    ``3 reach`` and its plane within ``reach`` (a map sampled more sparsely than ``reach`` still pairs).

    Returns:
        the paired points ``[P, 3]``, their map points ``[P, 3]`` and normals ``[P, 3]``, and ``P / N``.
    """
    distance, index = depth_map.tree.query(points, distance_upper_bound=3.0 * reach)
    near = np.isfinite(distance)
    p, q, n = points[near], depth_map.points[index[near]], depth_map.normals[index[near]]
    on_plane = np.abs(np.einsum("ij,ij->i", p - q, n)) <= reach
    return p[on_plane], q[on_plane], n[on_plane], float(on_plane.sum()) / max(1, len(points))


def register_depth(c2w: Tensor, depth: Tensor, K: Tensor, depth_map: CaptureDepthMap,
                   config: Optional[DepthRegistrationConfig] = None, mask: Optional[Tensor] = None) -> RegistrationResult:
    """Point-to-plane ICP of a query's depth onto the capture's depth map, from ``c2w`` (see the module docstring).

    Args:
        c2w: ``[3, 4]`` OpenGL camera-to-world starting pose (scene frame), e.g. a localized pose.
        depth: ``[H, W]`` the query's z-depth in scene units (``<= 0``: missing).
        K: ``[3, 3]`` its intrinsics (pixel centres at ``+0.5``).
        depth_map: from :func:`build_capture_depth_map`.
        config: settings.
        mask: optional ``[H, W]`` bool, True = pixel to use.
    """
    config = config or DepthRegistrationConfig()
    stride = max(1, int(config.query_stride))
    start = c2w[:3, :4].detach().cpu().double()
    world, z, valid = depth_points(depth.detach().cpu().numpy(), K.detach().cpu(), start, stride)
    if mask is not None:
        valid &= mask.detach().cpu().numpy()[::stride, ::stride]
    src, src_depth = world[valid], z[valid]  # the query's points at the starting pose

    def keep(reason: str, overlap: float = 0.0, rms: float = math.nan, moved: float = 0.0, turned: float = 0.0,
             iterations: int = 0) -> RegistrationResult:
        return RegistrationResult(c2w[:3, :4].clone(), False, overlap, rms, moved, turned, iterations, reason)

    if len(src) < 6:
        return keep("depth ICP not run: fewer than 6 query depth pixels")
    median_depth = float(np.median(src_depth))
    reach = config.max_distance * median_depth
    R, t = np.eye(3), np.zeros(3)  # the correction: a rigid motion of the scene frame
    steps = 0
    for steps in range(1, max(1, config.iterations) + 1):
        p, q, n, _ = _pairs(src @ R.T + t, depth_map, reach)
        if len(p) < 6:
            return keep(f"depth ICP not kept: {len(p)} query points on the map's surfaces", iterations=steps)
        residual = np.einsum("ij,ij->i", p - q, n)
        # d residual / d (w, v) for the update p -> exp(w) p + v, applied on the left (in the scene frame)
        jacobian = np.concatenate([np.cross(p, n), n], axis=1)
        spread = 1.4826 * float(np.median(np.abs(residual))) + 1e-12
        huber = np.minimum(1.0, 2.0 * spread / np.maximum(np.abs(residual), 1e-300))
        normal_matrix = jacobian.T @ (jacobian * huber[:, None]) + 1e-12 * np.eye(6)
        try:
            update = -np.linalg.solve(normal_matrix, jacobian.T @ (huber * residual))
        except np.linalg.LinAlgError:
            return keep("depth ICP not kept: the geometry does not constrain the pose", iterations=steps)
        turn = cv2.Rodrigues(update[:3].reshape(3, 1))[0]
        R, t = turn @ R, turn @ t + update[3:]
        if float(np.linalg.norm(update)) < 1e-7:
            break
    p, q, n, overlap = _pairs(src @ R.T + t, depth_map, reach)
    residual = np.einsum("ij,ij->i", p - q, n)
    rms = float(np.sqrt(np.mean(residual ** 2))) if len(residual) else math.nan
    start_np = start.numpy()
    aligned = torch.from_numpy(np.concatenate([R @ start_np[:, :3], (R @ start_np[:, 3] + t)[:, None]], axis=1))
    moved = float(translation_error(aligned[None], start[None])[0])
    turned = float(rotation_error_deg(aligned[None], start[None])[0])
    summary = f"overlap {100 * overlap:.0f}%, rms {rms:.5f}, moved {moved:.4f} and {turned:.3f} deg, {steps} steps"
    if overlap < config.min_overlap:
        return keep(f"depth ICP not kept ({summary}): overlap under {100 * config.min_overlap:.0f}%", overlap, rms,
                    moved, turned, steps)
    if moved > config.max_correction * median_depth or turned > config.max_correction_deg:
        return keep(f"depth ICP not kept ({summary}): a jump, not a correction", overlap, rms, moved, turned, steps)
    return RegistrationResult(aligned.to(c2w.dtype), True, overlap, rms, moved, turned, steps, f"depth ICP ({summary})")


_CACHE_ATTRIBUTE = "gsloc_capture_depth_map"


def capture_depth_map_of(pipeline: Any, max_points: int = 2_000_000) -> Optional[CaptureDepthMap]:
    """The depth map of a loaded run's training views (``pipeline.datamanager.train_dataparser_outputs``), built
    on first use and kept on the pipeline, so that every localizer of the run shares one; ``None`` when the
    views have no depth images (or one cannot be read: a warning says so, localization goes on without it)."""
    cached = getattr(pipeline, _CACHE_ATTRIBUTE, None)
    if cached is None or cached[0] != max_points:
        outputs = getattr(getattr(pipeline, "datamanager", None), "train_dataparser_outputs", None)
        try:
            depth_map = build_capture_depth_map(outputs, max_points)
        except Exception as err:  # an unreadable depth image: localize without the alignment, and say so once
            warnings.warn(f"gsloc: the training views' depth images cannot be read ({type(err).__name__}: {err}); "
                          "RGB-D queries are not aligned to them")
            depth_map = None
        cached = (max_points, depth_map)
        try:
            setattr(pipeline, _CACHE_ATTRIBUTE, cached)
        except AttributeError:  # an object that takes no attributes: build again next time
            pass
    return cached[1]


def align_result(query: Any, result: Any, depth_map: CaptureDepthMap, config: DepthRegistrationConfig) -> None:
    """Align a localization result's pose to ``depth_map`` in place when the query has depth and the result a
    finite pose (``result.depth_aligned`` says whether the alignment was kept, the reason what it did)."""
    if query.depth is None or result.failed or result.skipped or not bool(torch.isfinite(result.c2w).all()):
        return
    registration = register_depth(result.c2w, query.depth, query.K, depth_map, config, query.mask)
    result.depth_aligned = registration.accepted
    if registration.accepted:
        result.move_to(registration.c2w, registration.reason, query.gt_c2w)
    else:
        result.add_note(registration.reason)
