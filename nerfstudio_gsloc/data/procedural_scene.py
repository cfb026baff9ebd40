"""Embedded default scene: a procedurally textured room rendered by an analytic numpy ray caster.

The project's main job (train a Gaussian splat, then localize query images against it) must run without any
download. This module writes such a dataset from a seed:

* a closed box room (metres, world +z up, floor at ``z = 0``) whose walls, floor and ceiling carry rich
  procedural textures (checkers, stripes, value noise, colour ramps, random mosaics) plus "posters" and "rugs"
  (rectangles with their own texture), so that SIFT finds features and photometric alignment has gradients;
* a few textured spheres, boxes (rotated about ``z``) and cylinders in the middle of the room;
* Lambertian shading from one point light with hard shadows plus an ambient term (view independent, so a
  splat model can reproduce it exactly).

Images are *ray cast* (exact ray–primitive intersections, vectorised over all pixels of a view), not rendered
with Gaussians, so the splat model is trained against an independent ground truth.

Outputs follow nerfstudio's ``transforms.json`` format: OPENCV camera model without distortion, OpenGL
camera-to-world ``transform_matrix`` per frame, RGB PNGs and 16-bit depth PNGs that hold **z-depth** (along the
camera's optical axis, not the ray length) in **millimetres**, which nerfstudio's default
``depth_unit_scale_factor = 1e-3`` turns into metres. The train/eval split is stored in ``train_filenames`` /
``val_filenames`` / ``test_filenames`` (val and test are the same frames) so nerfstudio's own dataparser uses it.

Pixel convention: pixel ``(u, v)`` (column, row) covers ``[u, u + 1) x [v, v + 1)`` and its centre is at
``(u + 0.5, v + 0.5)`` in the coordinates that the intrinsics ``K`` map to, as in gsplat and nerfstudio.
The depth stored for a pixel is that of the ray through its centre; its colour is the average of
``supersample x supersample`` rays spread over the pixel (anti-aliasing).

The scene itself lives in three modules, each importing only the ones before it (this one, the dataset files,
imports all three):

* :mod:`~nerfstudio_gsloc.data.room_geometry`: value noise, materials, the primitives and the
  :class:`~nerfstudio_gsloc.data.room_geometry.ProceduralScene` record;
* :mod:`~nerfstudio_gsloc.data.room_layout`: the room drawn from a seed
  (:func:`~nerfstudio_gsloc.data.room_layout.build_scene`) and the camera poses (dataset loop, forward-facing
  capture, queries; :func:`~nerfstudio_gsloc.data.room_layout.focal_from_hfov`);
* :mod:`~nerfstudio_gsloc.data.room_raycast`: the ray caster and shading
  (:func:`~nerfstudio_gsloc.data.room_raycast.render_views`).

Public API here: :func:`generate_scene`, :func:`write_query_set`, :func:`load_depth_png`,
:func:`depth_to_png_units`, :func:`eval_indices`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nerfstudio_gsloc.data.room_geometry import ProceduralScene
from nerfstudio_gsloc.data.room_layout import (
    DEFAULT_HFOV_DEG,
    build_scene,
    dataset_poses,
    focal_from_hfov,
    forward_facing_poses,
    query_poses,
)
from nerfstudio_gsloc.data.room_raycast import render_views
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_output, atomic_write_text, check_writable

#: Largest image side (pixels) the generator accepts; the ray caster is CPU numpy, keep images small.
MAX_IMAGE_SIDE = 160
#: Smallest image side (pixels) the generator accepts.
MIN_IMAGE_SIDE = 16


def validate_request(output_dir: Path, num_views: int, width: int, height: int, hfov_deg: float,
                     min_views: int) -> Path:
    """Check user arguments (raising :class:`GslocError`), then create ``output_dir``/images and /depth."""
    if not 10.0 <= hfov_deg <= 120.0:
        raise GslocError(f"hfov_deg must be between 10 and 120 degrees, got {hfov_deg}")
    if num_views < min_views:
        raise GslocError(f"num_views must be at least {min_views}, got {num_views}")
    for name, size in (("width", width), ("height", height)):
        if not MIN_IMAGE_SIDE <= size <= MAX_IMAGE_SIDE:
            raise GslocError(f"{name} must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels, got {size}")
    output_dir = check_writable(output_dir, "output directory")
    try:
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        (output_dir / "depth").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GslocError(f"cannot create output directory {output_dir}: {err.strerror}") from err
    return output_dir


def _progress(console: Optional[Console]) -> Progress:
    """A rich progress bar (spinner, bar, count, elapsed, remaining)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
        transient=True,  # gone when done, so an error or an interruption is the one line left on stderr
    )


def depth_to_png_units(depth_m: np.ndarray) -> np.ndarray:
    """z-depth in metres ``[H, W]`` -> uint16 millimetres ``[H, W]`` (what the depth PNGs hold)."""
    if np.nanmax(depth_m) * 1000.0 > 65535:
        raise ValueError("depth does not fit in 16-bit millimetres")
    return np.round(depth_m * 1000.0).astype(np.uint16)


def load_depth_png(path: Path) -> np.ndarray:
    """Read a depth PNG written here -> float32 z-depth in metres ``[H, W]`` (0 would mean invalid)."""
    image = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise GslocError(f"cannot read depth image {path}")
    return image.astype(np.float32) / 1000.0


def render_and_write(
    scene: ProceduralScene,
    output_dir: Path,
    poses: np.ndarray,
    width: int,
    height: int,
    focal: float,
    description: str,
    show_progress: bool,
    with_depth: bool = True,
) -> List[str]:
    """Render ``poses [N, 4, 4]`` and write ``images/frame_XXXXX.png`` and (``with_depth``) ``depth/frame_XXXXX.png``.

    Returns:
        The ``N`` frame names ``frame_XXXXX.png``.
    """
    names = [f"frame_{i:05d}.png" for i in range(len(poses))]

    with _progress(Console(stderr=True) if show_progress else None) as progress:
        task = progress.add_task(description, total=len(poses))

        def write(index: int, rgb: np.ndarray, depth: np.ndarray) -> None:
            # Atomic: an interrupted run never leaves a truncated image (transforms.json, written last, marks
            # a complete dataset).
            with atomic_output(output_dir / "images" / names[index]) as tmp:
                Image.fromarray(rgb).save(tmp)
            if with_depth:
                with atomic_output(output_dir / "depth" / names[index]) as tmp:
                    if not cv2.imwrite(str(tmp), depth_to_png_units(depth)):
                        raise OSError(f"OpenCV could not write {tmp}")
            progress.advance(task)

        render_views(scene, poses, focal, focal, width / 2.0, height / 2.0, width, height, on_view=write)
    return names


def eval_indices(num_views: int, eval_fraction: float) -> np.ndarray:
    """Evenly spaced eval frame indices (between training neighbours): ``round(num_views * eval_fraction)``, >= 1."""
    num_eval = min(max(1, round(num_views * eval_fraction)), num_views - 1)
    step = num_views / num_eval
    return np.unique(np.floor(np.arange(num_eval) * step + step / 2.0).astype(np.int64))


def generate_scene(
    output_dir: Path,
    seed: int = 0,
    num_views: int = 80,
    width: int = 128,
    height: int = 96,
    eval_fraction: float = 1.0 / 8.0,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    show_progress: bool = True,
    layout: str = "ring",
    with_depth: bool = True,
) -> Path:
    """Write the procedural room as a nerfstudio dataset.

    Layout of ``output_dir``: ``transforms.json``, ``images/frame_XXXXX.png`` (RGB),
    ``depth/frame_XXXXX.png`` (uint16 z-depth in millimetres).

    Args:
        output_dir: destination folder (created; existing frames are overwritten).
        seed: scene seed; the same seed writes byte-identical files.
        num_views: number of frames (train + eval), at least 2.
        width, height: image size in pixels (16..160).
        eval_fraction: fraction of frames held out for eval (evenly spaced along the trajectory).
        hfov_deg: horizontal field of view.
        show_progress: show a rich progress bar on stderr.
        layout: ``ring`` (a loop around the objects, looking inwards:
            :func:`~nerfstudio_gsloc.data.room_layout.dataset_poses`) or ``forward`` (a forward-facing capture:
            :func:`~nerfstudio_gsloc.data.room_layout.forward_facing_poses`).
        with_depth: write depth images (without them the dataset is RGB-only, like most real captures).

    Returns:
        Path of the written ``transforms.json``.
    """
    if layout not in ("ring", "forward"):
        raise GslocError(f"layout must be 'ring' or 'forward', got {layout!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise GslocError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    output_dir = validate_request(output_dir, num_views, width, height, hfov_deg, min_views=2)
    scene = build_scene(seed)
    poses = dataset_poses(scene, num_views) if layout == "ring" else forward_facing_poses(scene, num_views)
    focal = focal_from_hfov(width, hfov_deg)
    names = render_and_write(scene, output_dir, poses, width, height, focal, f"rendering scene {seed}", show_progress,
                             with_depth)
    if not with_depth and not any((output_dir / "depth").iterdir()):
        (output_dir / "depth").rmdir()  # an RGB-only dataset has no depth folder

    eval_set = set(eval_indices(num_views, eval_fraction).tolist())
    train = [f"images/{n}" for i, n in enumerate(names) if i not in eval_set]
    evals = [f"images/{n}" for i, n in enumerate(names) if i in eval_set]
    meta = {
        "camera_model": "OPENCV",
        "fl_x": focal,
        "fl_y": focal,
        "cx": width / 2.0,
        "cy": height / 2.0,
        "w": width,
        "h": height,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": [
            {"file_path": f"images/{n}", **({"depth_file_path": f"depth/{n}"} if with_depth else {}),
             "transform_matrix": pose.tolist()}
            for n, pose in zip(names, poses)
        ],
        "train_filenames": train,
        "val_filenames": evals,
        "test_filenames": evals,
        "gsloc_scene": scene_info(scene),
    }
    path = output_dir / "transforms.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path


def scene_info(scene: ProceduralScene) -> dict:
    """Provenance stored in transforms.json (ignored by nerfstudio)."""
    return {
        "generator": "nerfstudio_gsloc.data.procedural_scene",
        "scene_seed": scene.seed,
        "units": "metres",
        "depth_units": "millimetres, z-depth along the optical axis",
        "room_min": scene.room_min.tolist(),
        "room_max": scene.room_max.tolist(),
    }


def write_query_set(
    output_dir: Path,
    seed: int,
    num_views: int,
    width: int,
    height: int,
    scene_seed: int = 0,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    show_progress: bool = True,
) -> Path:
    """Write novel views of scene ``scene_seed`` (never in its dataset) for localization tests.

    The poses are in the same original frame as :func:`generate_scene`'s ``transforms.json`` (so a trained
    model's ``dataparser_transforms.json`` maps them with ``camera_conventions.original_to_scene_frame``).
    Do not feed this file to nerfstudio's dataparser for poses: it re-centres and re-scales by *these* poses.
    Intrinsics are written per frame (``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``); all frames are listed
    in every split.

    Args:
        output_dir: destination folder (created).
        seed: query seed (poses differ per seed).
        num_views: number of query images, at least 1.
        width, height: query image size (may differ from the dataset's).
        scene_seed: which scene (same as ``generate_scene``'s ``seed``).
        hfov_deg: horizontal field of view.
        show_progress: show a rich progress bar on stderr.

    Returns:
        Path of the written ``transforms.json``.
    """
    output_dir = validate_request(output_dir, num_views, width, height, hfov_deg, min_views=1)
    scene = build_scene(scene_seed)
    poses = query_poses(scene, num_views, seed)
    focal = focal_from_hfov(width, hfov_deg)
    names = render_and_write(scene, output_dir, poses, width, height, focal, f"rendering queries {seed}", show_progress)
    files = [f"images/{n}" for n in names]
    meta = {
        "camera_model": "OPENCV",
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": [
            {
                "file_path": f"images/{n}",
                "depth_file_path": f"depth/{n}",
                "transform_matrix": pose.tolist(),
                "fl_x": focal,
                "fl_y": focal,
                "cx": width / 2.0,
                "cy": height / 2.0,
                "w": width,
                "h": height,
            }
            for n, pose in zip(names, poses)
        ],
        "train_filenames": files,
        "val_filenames": files,
        "test_filenames": files,
        "gsloc_scene": {**scene_info(scene), "query_seed": seed},
    }
    path = output_dir / "transforms.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path
