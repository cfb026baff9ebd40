"""Sparse structure from images with known poses: SIFT, pose-guided matching, multi-view triangulation.

Given the training images and their (fixed, never refined) cameras, this builds the sparse coloured point cloud
that seeds a Gaussian-splatting model when a dataset ships neither a point cloud nor depth:

1. SIFT keypoints and descriptors per image (OpenCV; small images are upsampled first so that a 135x240 phone
   frame still yields several hundred features);
2. image pairs chosen from the poses: each image is matched with its nearest cameras whose optical axes point
   the same way (within ``max_pair_angle_deg``);
3. mutual nearest-neighbour matching of RootSIFT descriptors with Lowe's ratio test, verified with the epipolar geometry that the known
   poses imply (no RANSAC: the poses are trusted);
4. tracks: connected components of the matches, dropped where a track holds two keypoints of one image;
5. linear multi-view triangulation (DLT on normalised image coordinates) of each track, then outlier
   observations removed by reprojection error and the point triangulated again; points kept with at least
   ``min_track_length`` observations, positive depth in all of them, all errors below ``max_reproj_error`` and a
   triangulation angle of at least ``min_angle_deg``;
6. colour: mean of the images' colours at the observations.

Conventions: cameras are OpenCV world-to-camera ``w2c [N, 4, 4]`` and pinhole ``K [N, 3, 3]``; pixel ``(u, v)``
covers ``[u, u + 1)``, so a pixel centre is at ``u + 0.5`` (gsplat's and nerfstudio's convention; OpenCV's
keypoints put centres at integers and are shifted by +0.5 here). The result keeps every observation (image
index, point id, pixel) so a 2D-3D localizer can reuse the map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence

import cv2
import numpy as np


@dataclass
class TriangulationSettings:
    """Knobs of :func:`triangulate_views` (defaults tuned on small real and synthetic captures)."""

    max_features: int = 4000
    """SIFT features kept per image."""
    min_side_for_native: int = 400
    """Images whose longer side is below this are upsampled 2x before SIFT (more features on small images)."""
    neighbours: int = 8
    """Images each image is matched with (the nearest camera centres among those looking the same way)."""
    max_pair_angle_deg: float = 60.0
    """Largest angle between two cameras' optical axes for them to be matched."""
    ratio: float = 0.8
    """Lowe's ratio test threshold."""
    max_epipolar_px: float = 2.0
    """Largest symmetric distance (pixels) of a match to the epipolar lines the known poses imply."""
    max_reproj_error: float = 2.0
    """Largest reprojection error (pixels) of any observation of a kept point."""
    min_track_length: int = 2
    """Fewest observations of a kept point."""
    min_angle_deg: float = 1.5
    """Smallest angle (degrees) between a kept point's first viewing ray and another of its rays: points seen
    from one spot are unreliable."""


@dataclass
class SparseMap:
    """A triangulated sparse map.

    Attributes:
        xyz: ``[P, 3]`` float32 points (world frame of the given cameras).
        rgb: ``[P, 3]`` uint8 colours.
        errors: ``[P]`` mean reprojection error (pixels) of each point.
        track_lengths: ``[P]`` number of observations of each point.
        obs_image: ``[O]`` image index of each observation.
        obs_point: ``[O]`` point index (into ``xyz``) of each observation.
        obs_uv: ``[O, 2]`` float32 pixel of each observation (pixel centres at ``+0.5``).
        stats: numbers for the report (images, pairs, matches, seconds...).
    """

    xyz: np.ndarray
    rgb: np.ndarray
    errors: np.ndarray
    track_lengths: np.ndarray
    obs_image: np.ndarray
    obs_point: np.ndarray
    obs_uv: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.xyz)

    def save(self, path: Path) -> None:
        """Write the map (and its stats, as a JSON string) to an ``.npz`` file."""
        import json

        np.savez_compressed(
            path, xyz=self.xyz, rgb=self.rgb, errors=self.errors, track_lengths=self.track_lengths,
            obs_image=self.obs_image, obs_point=self.obs_point, obs_uv=self.obs_uv, stats=json.dumps(self.stats),
        )

    @classmethod
    def load(cls, path: Path) -> "SparseMap":
        """Read a map written by :meth:`save`."""
        import json

        with np.load(path) as data:
            fields = {k: data[k] for k in ("xyz", "rgb", "errors", "track_lengths", "obs_image", "obs_point", "obs_uv")}
            return cls(**fields, stats=json.loads(str(data["stats"])))


def _features(images: Sequence[np.ndarray], settings: TriangulationSettings):
    """SIFT keypoints ``[K, 2]`` (pixel centres at +0.5) and descriptors ``[K, 128]`` of each image."""
    sift = cv2.SIFT_create(nfeatures=settings.max_features, contrastThreshold=0.02)
    keypoints, descriptors = [], []
    for image in images:
        gray = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
        factor = 2.0 if max(gray.shape) < settings.min_side_for_native else 1.0
        if factor != 1.0:
            gray = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        kps, desc = sift.detectAndCompute(gray, None)
        # OpenCV's pixel centres are integers at either resolution: map to the original image, centres at +0.5
        uv = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
        keypoints.append((uv + 0.5) / factor)
        if desc is None:
            desc = np.zeros((0, 128), np.float32)
        # RootSIFT (L1-normalise, square root): unit L2 norm, and matches better than raw SIFT
        desc = np.sqrt(desc / np.clip(desc.sum(axis=1, keepdims=True), 1e-12, None))
        descriptors.append(desc.astype(np.float32))
    return keypoints, descriptors


def select_pairs(w2c: np.ndarray, neighbours: int, max_angle_deg: float) -> List[tuple]:
    """Image pairs ``(i, j)``, ``i < j``, to match: each camera with its nearest ``neighbours`` cameras (by centre
    distance) among those whose optical axis is within ``max_angle_deg`` of its own."""
    rot = w2c[:, :3, :3]
    centres = -np.einsum("nji,nj->ni", rot, w2c[:, :3, 3])
    axes = rot[:, 2, :]  # +z of each camera in the world
    cos = np.clip(axes @ axes.T, -1.0, 1.0)
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    dist[cos < np.cos(np.radians(max_angle_deg))] = np.inf
    np.fill_diagonal(dist, np.inf)
    pairs = set()
    for i in range(len(w2c)):
        for j in np.argsort(dist[i])[:neighbours]:
            if np.isfinite(dist[i, j]):
                pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def _skew(t: np.ndarray) -> np.ndarray:
    return np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])


def _fundamental(K1, w2c1, K2, w2c2) -> np.ndarray:
    """F with ``x2^T F x1 = 0`` for pixels (homogeneous) of camera 1 and 2."""
    rel = w2c2 @ np.linalg.inv(w2c1)
    essential = _skew(rel[:3, 3]) @ rel[:3, :3]
    return np.linalg.inv(K2).T @ essential @ np.linalg.inv(K1)


def _match_pair(desc1, desc2, uv1, uv2, F, settings: TriangulationSettings) -> np.ndarray:
    """Mutual ratio-test matches that agree with the epipolar geometry: ``[M, 2]`` keypoint indices.

    Descriptors are unit-norm (RootSIFT), so one matrix product gives all distances (``d^2 = 2 - 2 a.b``); that
    is far faster on a CPU than OpenCV's brute-force k-NN matcher run both ways.
    """
    if len(desc1) < 2 or len(desc2) < 2:
        return np.zeros((0, 2), np.int64)
    sim = desc1 @ desc2.T  # [K1, K2]
    rows = np.arange(len(desc1))
    best_back = np.argmax(sim, axis=0)
    best = np.argmax(sim, axis=1)
    s_best = sim[rows, best]
    sim[rows, best] = -np.inf
    s_second = sim.max(axis=1)
    d_best = np.sqrt(np.clip(2.0 - 2.0 * s_best, 0.0, None))
    d_second = np.sqrt(np.clip(2.0 - 2.0 * s_second, 0.0, None))
    mutual = best_back[best] == rows
    keep = mutual & (d_best < settings.ratio * d_second)
    if not keep.any():
        return np.zeros((0, 2), np.int64)
    pairs = np.stack([rows[keep], best[keep]], axis=1)
    x1 = np.c_[uv1[pairs[:, 0]], np.ones(len(pairs))]
    x2 = np.c_[uv2[pairs[:, 1]], np.ones(len(pairs))]
    line2 = x1 @ F.T  # epipolar lines in image 2
    line1 = x2 @ F  # and in image 1
    d2 = np.abs(np.sum(line2 * x2, axis=1)) / np.linalg.norm(line2[:, :2], axis=1).clip(1e-12)
    d1 = np.abs(np.sum(line1 * x1, axis=1)) / np.linalg.norm(line1[:, :2], axis=1).clip(1e-12)
    return pairs[np.maximum(d1, d2) < settings.max_epipolar_px]


def _tracks(num_kps: List[int], matches: dict) -> List[np.ndarray]:
    """Connected components of the match graph as ``[L, 2]`` arrays of (image, keypoint); ambiguous ones dropped."""
    offsets = np.concatenate([[0], np.cumsum(num_kps)])
    parent = np.arange(offsets[-1])

    def find(a):
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    for (i, j), m in matches.items():
        for a, b in zip(offsets[i] + m[:, 0], offsets[j] + m[:, 1]):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb
    nodes = np.unique(np.concatenate([offsets[i] + m[:, 0] for (i, _), m in matches.items()] +
                                     [offsets[j] + m[:, 1] for (_, j), m in matches.items()]))
    roots = np.array([find(n) for n in nodes])
    image_of = np.searchsorted(offsets, nodes, side="right") - 1
    order = np.argsort(roots, kind="stable")
    roots, nodes, image_of = roots[order], nodes[order], image_of[order]
    splits = np.flatnonzero(np.diff(roots)) + 1
    tracks = []
    for group_nodes, group_images in zip(np.split(nodes, splits), np.split(image_of, splits)):
        if len(group_nodes) >= 2 and len(np.unique(group_images)) == len(group_images):
            tracks.append(np.stack([group_images, group_nodes - offsets[group_images]], axis=1))
    return tracks


def _dlt(rays: np.ndarray, poses: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Batched linear triangulation.

    Args:
        rays: ``[T, L, 2]`` normalised image coordinates (``K^-1`` applied).
        poses: ``[T, L, 3, 4]`` world-to-camera ``[R | t]``.
        valid: ``[T, L]`` bool, observations that take part.

    Returns:
        ``[T, 3]`` points.
    """
    rows_x = rays[..., 0:1] * poses[..., 2, :] - poses[..., 0, :]
    rows_y = rays[..., 1:2] * poses[..., 2, :] - poses[..., 1, :]
    design = np.concatenate([rows_x, rows_y], axis=1) * np.concatenate([valid, valid], axis=1)[..., None]
    # least-squares null vector from the 4x4 normal matrix (a full SVD of the padded [2L, 4] rows is far slower)
    _, vectors = np.linalg.eigh(np.einsum("tki,tkj->tij", design, design))
    homog = vectors[..., 0]
    return homog[:, :3] / np.where(np.abs(homog[:, 3:]) < 1e-12, 1e-12, homog[:, 3:])


def triangulate_views(images: Sequence[np.ndarray], K: np.ndarray, w2c: np.ndarray,
                      settings: TriangulationSettings = TriangulationSettings()) -> SparseMap:
    """Triangulate a sparse coloured map from images with known cameras (see the module docstring).

    Args:
        images: ``N`` uint8 ``[H, W, 3]`` RGB images (undistorted: ``K`` must describe them exactly).
        K: ``[N, 3, 3]`` pinhole intrinsics. w2c: ``[N, 4, 4]`` OpenCV world-to-camera poses.

    Returns:
        The :class:`SparseMap` (possibly empty).
    """
    start = time.perf_counter()
    K, w2c = np.asarray(K, np.float64), np.asarray(w2c, np.float64)
    uvs, descs = _features(images, settings)
    pairs = select_pairs(w2c, settings.neighbours, settings.max_pair_angle_deg)
    matches = {}
    for i, j in pairs:
        m = _match_pair(descs[i], descs[j], uvs[i], uvs[j], _fundamental(K[i], w2c[i], K[j], w2c[j]), settings)
        if len(m):
            matches[(i, j)] = m
    tracks = _tracks([len(u) for u in uvs], matches) if matches else []
    stats = {"images": len(images), "features": int(sum(len(u) for u in uvs)), "pairs": len(pairs),
             "matches": int(sum(len(m) for m in matches.values())), "tracks": len(tracks)}
    result = _triangulate_tracks(tracks, uvs, K, w2c, settings)
    if len(result.xyz):
        result.rgb = _colours(images, result)
    result.stats = {**stats, "points": len(result.xyz),
                    "mean_track_length": float(result.track_lengths.mean()) if len(result.xyz) else 0.0,
                    "mean_reproj_error_px": float(result.errors.mean()) if len(result.xyz) else 0.0,
                    "seconds": round(time.perf_counter() - start, 2)}
    return result


def _triangulate_tracks(tracks, uvs, K, w2c, settings: TriangulationSettings) -> SparseMap:
    """DLT, outlier-observation removal and a second DLT for all tracks at once (padded to the longest)."""
    empty = SparseMap(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), np.zeros(0, np.float32),
                      np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    if not tracks:
        return empty
    length = max(len(t) for t in tracks)
    num = len(tracks)
    image_idx = np.zeros((num, length), np.int64)
    uv = np.zeros((num, length, 2))
    valid = np.zeros((num, length), bool)
    for n, track in enumerate(tracks):
        image_idx[n, : len(track)] = track[:, 0]
        uv[n, : len(track)] = np.stack([uvs[i][k] for i, k in track])
        valid[n, : len(track)] = True
    k_inv = np.linalg.inv(K)[image_idx]  # [T, L, 3, 3]
    rays = np.einsum("tlij,tlj->tli", k_inv, np.concatenate([uv, np.ones((num, length, 1))], axis=-1))[..., :2]
    poses = w2c[image_idx][..., :3, :]

    def residuals(points):
        cam = np.einsum("tlij,tj->tli", poses[..., :3], points) + poses[..., 3]
        proj = np.einsum("tlij,tlj->tli", K[image_idx], cam)
        pix = proj[..., :2] / np.where(np.abs(proj[..., 2:]) < 1e-12, 1e-12, proj[..., 2:])
        return np.linalg.norm(pix - uv, axis=-1), cam[..., 2]

    points = _dlt(rays, poses, valid)
    err, depth = residuals(points)
    valid &= (err < settings.max_reproj_error) & (depth > 0)
    enough = valid.sum(1) >= max(settings.min_track_length, 2)
    points[enough] = _dlt(rays[enough], poses[enough], valid[enough])
    err, depth = residuals(points)
    valid &= (err < settings.max_reproj_error) & (depth > 0)
    # largest angle between the first kept viewing ray of each point and its others (at least half the largest
    # pairwise angle; O(L) rather than O(L^2) for long tracks)
    centres = -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])[image_idx]
    dirs = points[:, None] - centres
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True).clip(1e-12)
    first = dirs[np.arange(num), np.argmax(valid, axis=1)]
    cos = np.where(valid, np.einsum("tli,ti->tl", dirs, first), 1.0)
    angle = np.degrees(np.arccos(np.clip(cos.min(axis=1), -1.0, 1.0)))
    keep = (valid.sum(1) >= settings.min_track_length) & (angle >= settings.min_angle_deg) & np.isfinite(points).all(1)
    if not keep.any():
        return empty
    points, valid, err, image_idx, uv = points[keep], valid[keep], err[keep], image_idx[keep], uv[keep]
    point_ids = np.broadcast_to(np.arange(len(points))[:, None], valid.shape)
    counts = valid.sum(1)
    return SparseMap(
        xyz=points.astype(np.float32), rgb=np.zeros((len(points), 3), np.uint8),
        errors=(np.where(valid, err, 0).sum(1) / counts).astype(np.float32), track_lengths=counts.astype(np.int64),
        obs_image=image_idx[valid], obs_point=point_ids[valid].astype(np.int64), obs_uv=uv[valid].astype(np.float32),
    )


def _colours(images: Sequence[np.ndarray], sparse: SparseMap) -> np.ndarray:
    """Mean colour ``[P, 3]`` uint8 of each point over its observations (nearest pixel)."""
    total = np.zeros((len(sparse.xyz), 3))
    for i, image in enumerate(images):
        sel = sparse.obs_image == i
        if not sel.any():
            continue
        h, w = image.shape[:2]
        col = np.clip(np.floor(sparse.obs_uv[sel, 0]).astype(int), 0, w - 1)
        row = np.clip(np.floor(sparse.obs_uv[sel, 1]).astype(int), 0, h - 1)
        np.add.at(total, sparse.obs_point[sel], image[row, col, :3].astype(np.float64))
    return np.clip(np.round(total / sparse.track_lengths[:, None]), 0, 255).astype(np.uint8)
