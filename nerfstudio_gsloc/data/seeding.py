"""Where the first Gaussians come from, whatever dataparser a user picks.

``ns-train gsloc --data X nerfstudio-data ...`` (or ``blender-data``, ``colmap``...) replaces the method's own
dataparser, so seeding cannot live in a dataparser. :class:`GSLocDatamanager` decides it after the dataparser
ran and before the pipeline builds the model (``VanillaPipeline`` reads ``points3D_xyz`` / ``points3D_rgb`` from
the training dataparser outputs' metadata as seed points), in this order:

1. the dataset's own point cloud (the dataparser already put it into the metadata);
2. back-projected depth, when the dataset has depth images;
3. points triangulated from the training images with their known poses (:mod:`.triangulation`), on the images
   exactly as training sees them (undistorted by the datamanager, with the matching pinhole intrinsics) in the
   dataparser's scene frame; cached in the run folder (``seed_points.npz`` + ``seed_points.json``) and reused
   when the run is resumed;
4. when triangulation finds fewer than ``min_triangulated_points``: random points inside the union of the
   training cameras' viewing frusta between near and far bounds estimated from the cameras, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c
from nerfstudio_gsloc.data.depth import GSLocDataset, backproject_depth_points
from nerfstudio_gsloc.data.validation import check_dataparser_images
from nerfstudio_gsloc.data.triangulation import SparseMap, TriangulationSettings, triangulate_views
from nerfstudio_gsloc.files import atomic_output, atomic_write_text

SEED_FILE = "seed_points.npz"
SEED_REPORT = "seed_points.json"


class SeedingWarning(UserWarning):
    """Seeding fell back to a weaker initialisation (shown on the console and as a Python warning)."""


def estimate_depth_range(K: np.ndarray, w2c: np.ndarray) -> Tuple[float, float]:
    """Near and far bounds ``(near, far)`` of the scene in front of cameras ``w2c [N, 4, 4]`` (OpenCV).

    Where the optical axes converge (the least-squares point closest to all of them, in front of the cameras),
    the scene is taken to lie around that point's median depth ``d``; for parallel axes (forward-facing captures)
    ``d`` is a multiple of the cameras' spread. Bounds: ``[0.2 d, 3 d]``.
    """
    rot = w2c[:, :3, :3]
    centres = -np.einsum("nji,nj->ni", rot, w2c[:, :3, 3])
    axes = rot[:, 2, :]
    spread = float(np.linalg.norm(centres - centres.mean(0), axis=1).max()) if len(centres) > 1 else 0.0
    depth = None
    if len(w2c) > 1:
        proj = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]  # projectors orthogonal to each axis
        lhs, rhs = proj.sum(0), np.einsum("nij,nj->i", proj, centres)
        eig = np.linalg.eigvalsh(lhs)
        if eig[0] > 0.05 * len(w2c):  # axes not (nearly) parallel
            point = np.linalg.solve(lhs, rhs)
            depths = np.einsum("ni,ni->n", point - centres, axes)
            if np.median(depths) > 0:
                depth = float(np.median(depths))
    if depth is None:
        depth = 3.0 * spread if spread > 0 else 1.0
    return 0.2 * depth, 3.0 * depth


def frustum_points(images: List[np.ndarray], K: np.ndarray, w2c: np.ndarray, num_points: int,
                   seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Random points in the union of the cameras' viewing frusta, coloured by the pixel they were drawn through.

    Each point picks a camera and a pixel uniformly, and a depth uniformly in :func:`estimate_depth_range`.

    Returns:
        ``xyz [num_points, 3]`` float32 (world frame of ``w2c``) and ``rgb [num_points, 3]`` uint8.
    """
    near, far = estimate_depth_range(K, w2c)
    gen = np.random.default_rng(seed)
    cam = gen.integers(0, len(w2c), num_points)
    sizes = np.array([image.shape[:2] for image in images])  # [N, 2] (H, W)
    u = gen.uniform(0, 1, num_points) * sizes[cam, 1]
    v = gen.uniform(0, 1, num_points) * sizes[cam, 0]
    z = gen.uniform(near, far, num_points)
    rays = np.einsum("nij,nj->ni", np.linalg.inv(K[cam]), np.stack([u, v, np.ones_like(u)], 1))
    cam_pts = rays * z[:, None]
    c2w = np.linalg.inv(w2c[cam])
    xyz = np.einsum("nij,nj->ni", c2w[:, :3, :3], cam_pts) + c2w[:, :3, 3]
    rgb = np.stack([images[c][int(r), int(q), :3] for c, r, q in zip(cam, v, u)])
    return xyz.astype(np.float32), rgb.astype(np.uint8)


def _cameras_signature(filenames, K: np.ndarray, w2c: np.ndarray, settings: TriangulationSettings) -> str:
    """Hash of what determines the triangulation (images, cameras, settings): a cache is reused only on a match."""
    digest = hashlib.sha256()
    digest.update("\n".join(str(f) for f in filenames).encode())
    digest.update(np.round(K, 4).tobytes())
    digest.update(np.round(w2c, 5).tobytes())
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


@dataclass
class GSLocDatamanagerConfig(FullImageDatamanagerConfig):
    """nerfstudio's full-image datamanager, plus seeding that works with any dataparser (see the module docs)."""

    _target: Type = field(default_factory=lambda: GSLocDatamanager)
    seeding: Literal["auto", "triangulate", "frustum", "off"] = "auto"
    """``auto``: the dataset's points, else depth, else triangulation (frustum fallback); ``triangulate`` /
    ``frustum``: that method unless the dataset has points; ``off``: the model's own random initialisation."""
    min_triangulated_points: int = 300
    """Fewer triangulated points than this fall back to random points in the camera frusta."""
    frustum_points: int = 20_000
    """Number of random points of the frustum fallback."""
    depth_points: int = 40_000
    """Points back-projected from depth when a dataset has depth and the dataparser did not seed."""
    triangulation: TriangulationSettings = field(default_factory=TriangulationSettings)
    """Feature matching and triangulation settings."""
    seed_cache_dirs: Tuple[Path, ...] = ()
    """Folders searched for a cached ``seed_points.npz``; the first is where a new one is written (the trainer
    sets it to the run folder)."""


class GSLocDatamanager(FullImageDatamanager[GSLocDataset]):
    """A :class:`FullImageDatamanager` that puts seed points into the training dataparser outputs."""

    config: GSLocDatamanagerConfig

    def __init__(self, config: GSLocDatamanagerConfig, *args, test_mode: str = "val", **kwargs):
        super().__init__(config, *args, test_mode=test_mode, **kwargs)
        # Only training builds a model from seed points; evaluation loads a checkpoint over random ones.
        if test_mode == "val" and config.seeding != "off":
            self._seed()

    def create_train_dataset(self) -> GSLocDataset:
        # Training (test_mode "val") decodes every training image: check them all first, so that a bad file is one
        # error line naming it (and every other bad file) instead of a traceback minutes later.
        if self.test_mode == "val":
            check_dataparser_images(self.train_dataparser_outputs)
        return super().create_train_dataset()

    def _seed(self) -> None:
        metadata = self.train_dataparser_outputs.metadata
        if "points3D_xyz" in metadata:
            return
        if self.config.seeding == "auto" and metadata.get("depth_filenames") is not None:
            xyz, rgb = backproject_depth_points(self.train_dataparser_outputs, self.config.depth_points)
            CONSOLE.log(f"gsloc: seeded {len(xyz):,} Gaussians from back-projected depth")
        else:
            xyz, rgb = self._triangulated_or_frustum()
        metadata["points3D_xyz"], metadata["points3D_rgb"] = torch.as_tensor(xyz).float(), torch.as_tensor(rgb)

    def _training_views(self) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
        """Training images as training sees them (undistorted, uint8 RGB) with their pinhole ``K`` and OpenCV w2c."""
        images = []
        for data in self.cached_train:  # undistorts and updates self.train_dataset.cameras' intrinsics
            image = data["image"].detach().cpu()
            if image.dtype != torch.uint8:
                image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
            image = image.numpy()
            if image.shape[-1] == 4:  # RGBA (Blender scenes): composite on white, as those scenes train
                alpha = image[..., 3:].astype(np.float32) / 255.0
                image = np.round(image[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
            images.append(np.ascontiguousarray(image[..., :3]))
        cameras = self.train_dataset.cameras
        K = cameras.get_intrinsics_matrices().numpy().astype(np.float64)
        w2c = opengl_c2w_to_opencv_w2c(cameras.camera_to_worlds).numpy().astype(np.float64)
        return images, K, w2c

    def _triangulated_or_frustum(self) -> Tuple[np.ndarray, np.ndarray]:
        images, K, w2c = self._training_views()
        settings = self.config.triangulation
        signature = _cameras_signature(self.train_dataparser_outputs.image_filenames, K, w2c, settings)
        sparse = None
        if self.config.seeding != "frustum":
            sparse = _load_cached(self.config.seed_cache_dirs, signature)
            if sparse is None:
                CONSOLE.log(f"gsloc: triangulating seed points from {len(images)} training images with their poses")
                sparse = triangulate_views(images, K, w2c, settings)
                sparse.stats["signature"] = signature
                _save(sparse, self.config.seed_cache_dirs)
            s = sparse.stats
            CONSOLE.log(
                f"gsloc: {s['points']:,} triangulated seed points (mean track length {s['mean_track_length']:.2f}, "
                f"mean reprojection error {s['mean_reproj_error_px']:.2f} px, built in {s['seconds']:.1f} s)"
            )
            if len(sparse) >= self.config.min_triangulated_points:
                return sparse.xyz, sparse.rgb
        found = "" if sparse is None else f"triangulation found only {len(sparse)} points (< {self.config.min_triangulated_points}); "
        near, far = estimate_depth_range(K, w2c)
        message = (f"gsloc: {found}seeding {self.config.frustum_points:,} random Gaussians inside the training cameras' "
                   f"viewing frusta between depths {near:.3g} and {far:.3g} (scene units)")
        CONSOLE.log(f"[bold yellow]{message}")
        warnings.warn(message, SeedingWarning, stacklevel=2)
        return frustum_points(images, K, w2c, self.config.frustum_points)


def _load_cached(dirs, signature: str) -> Optional[SparseMap]:
    """A cached map from the first of ``dirs`` whose ``seed_points.npz`` was built from the same cameras."""
    for folder in dirs:
        path = Path(folder) / SEED_FILE
        if path.is_file():
            try:
                sparse = SparseMap.load(path)
            except Exception:  # a damaged cache is rebuilt, not an error
                continue
            if sparse.stats.get("signature") == signature:
                CONSOLE.log(f"gsloc: reusing seed points cached in {path}")
                return sparse
    return None


def _save(sparse: SparseMap, dirs) -> None:
    """Write the map and its report into the first cache folder (the run folder), if any."""
    if not dirs:
        return
    folder = Path(dirs[0])
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / SEED_FILE) as tmp:  # an interrupted run leaves no half-written cache
        sparse.save(tmp)
    atomic_write_text(folder / SEED_REPORT, json.dumps(sparse.stats, indent=2) + "\n")
