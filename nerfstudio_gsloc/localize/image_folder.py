"""Drop-in query photos: a folder of JPEG/PNG files with no transforms.json (``ns-localize --images DIR``).

Every file of the folder is a query (sorted by name; hidden files and a ``transforms.json`` are skipped); its
name relative to the folder is the query's name. The queries have no prior and no ground truth, so they are
localized from retrieval (``--init auto`` / ``retrieval``) and their poses come out, like those of every query
source, in the dataset's original frame (:mod:`nerfstudio_gsloc.poses_file`).

Intrinsics (pixels, pixel centres at ``+0.5``), first that applies:

1. ``--intrinsics fx fy cx cy``: used as given for every image;
2. ``DIR/transforms.json`` with the file-level keys ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` (nerfstudio's
   names; frames are not read): that camera scaled to each image's size;
3. the run's first training camera scaled to each image's size (the common case: the same camera).

A scaled camera must have the image's aspect ratio (within 1 %), otherwise the image was cropped or comes from
another camera and the error says to pass ``--intrinsics``.

Lens distortion: a photo from the camera of 2. (its ``camera_model`` and ``k1 k2 k3 k4 p1 p2``, as in a query file)
or 3. (the training camera's lens as the dataparser read it, not the undistorted intrinsics that nerfstudio's image
cache leaves in ``dataset.cameras``) is undistorted exactly as an eval-split query of that camera
(:mod:`~nerfstudio_gsloc.localize.undistort`); distortion coefficients do not change when the image is scaled.
``--intrinsics`` describe a pinhole camera.

Errors (one :class:`GslocError` line each, before any work): the folder is missing or empty, a file has an
unsupported format (anything but JPEG or PNG, by extension or by content), an image is corrupt or unreadable,
intrinsics are malformed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.queries import Query, file_distortion
from nerfstudio_gsloc.localize.query_images import make_view
from nerfstudio_gsloc.localize.undistort import camera_distortion, raw_dataset_cameras

#: Extensions of the files read as queries (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: PIL formats accepted (the content must match, not only the extension).
IMAGE_FORMATS = ("JPEG", "PNG", "MPO")  # MPO: JPEG files of some phone cameras
#: Largest relative difference between an image's aspect ratio and the scaled camera's.
ASPECT_TOLERANCE = 0.01


@dataclass
class AssumedCamera:
    """The camera assumed for a folder's photos: intrinsics of a ``width`` x ``height`` image (pixels, centres at
    ``+0.5``) and its lens distortion."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    source: str = ""
    """Where it comes from (for error messages)."""
    distortion: Optional[tuple] = None
    """``None`` (pinhole) or ``(params [6] float64 [k1, k2, k3, k4, p1, p2], fisheye)``, the raw photo's lens."""

    def scaled_to(self, width: int, height: int, where: str) -> np.ndarray:
        """``[3, 3]`` intrinsics scaled to a ``width`` x ``height`` image; raises when the aspect ratio differs."""
        aspect, own = width / height, self.width / self.height
        if abs(aspect - own) > ASPECT_TOLERANCE * own:
            raise GslocError(
                f"{where}: the image is {width}x{height} (aspect {aspect:.3f}) but the assumed camera ({self.source}) is "
                f"{self.width}x{self.height} (aspect {own:.3f}); pass --intrinsics fx fy cx cy or a transforms.json"
            )
        sx, sy = width / self.width, height / self.height
        return np.array([[self.fx * sx, 0.0, self.cx * sx], [0.0, self.fy * sy, self.cy * sy], [0.0, 0.0, 1.0]])


def training_camera(pipeline) -> AssumedCamera:
    """The run's first training camera as its dataparser gave it (the raw photo's intrinsics and lens)."""
    dataset = getattr(getattr(pipeline, "datamanager", None), "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise GslocError("the run has no training camera to assume for --images; pass --intrinsics fx fy cx cy")
    camera = raw_dataset_cameras(dataset)[0]
    source = "the run's training camera"
    return AssumedCamera(float(camera.fx), float(camera.fy), float(camera.cx), float(camera.cy),
                         int(camera.width), int(camera.height), source, camera_distortion(camera, source))


def folder_camera(folder: Path) -> Optional[AssumedCamera]:
    """The camera of ``folder/transforms.json`` (file-level ``fl_x fl_y cx cy w h``, ``camera_model`` and distortion
    coefficients), or ``None`` without that file."""
    path = Path(folder) / "transforms.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        values = [float(meta[key]) for key in ("fl_x", "fl_y", "cx", "cy", "w", "h")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GslocError(f"{path}: need file-level fl_x, fl_y, cx, cy, w, h for the images of {folder} "
                         f"({type(err).__name__}: {err})") from None
    if not all(math.isfinite(v) for v in values) or min(values[0], values[1], values[4], values[5]) <= 0:
        raise GslocError(f"{path}: fl_x, fl_y, w, h must be positive numbers")
    return AssumedCamera(*values[:4], int(round(values[4])), int(round(values[5])), str(path),
                         file_distortion(meta, {}, str(path)))


def check_intrinsics(intrinsics: Optional[Sequence[float]]) -> None:
    """Raise for ``--intrinsics`` that are not four finite numbers with positive focal lengths."""
    if intrinsics is None:
        return
    if len(intrinsics) != 4 or not all(math.isfinite(float(v)) for v in intrinsics):
        raise GslocError("--intrinsics takes four finite numbers: fx fy cx cy (pixels)")
    if intrinsics[0] <= 0 or intrinsics[1] <= 0:
        raise GslocError("--intrinsics: fx and fy must be positive")


def list_images(folder: Path) -> List[Path]:
    """The query files of ``folder``, sorted; raises for a missing or empty folder and unsupported files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GslocError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name != "transforms.json")
    if not files:
        raise GslocError(f"--images {folder}: the folder has no images (JPEG or PNG)")
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise GslocError(f"--images {folder}: {path.name} has an unsupported format {path.suffix or '(none)'!r} "
                             "(use JPEG or PNG)")
    return files


def _read_image(path: Path, where: str):
    """``([H, W, 3] uint8, alpha [H, W] uint8 or None)``; checks the content is JPEG/PNG and decodes it fully."""
    try:
        with Image.open(path) as img:
            if img.format not in IMAGE_FORMATS:
                raise GslocError(f"{where}: unsupported format {img.format} (use JPEG or PNG)")
            img.load()
            has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
            pixels = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except GslocError:
        raise
    except Exception as err:  # PIL raises many types for corrupt files
        raise GslocError(f"{where}: cannot read image {path}: {type(err).__name__}: {err}") from None
    return (pixels[..., :3], pixels[..., 3]) if has_alpha else (pixels, None)


def load_image_folder_queries(folder: Path, camera: Optional[AssumedCamera] = None,
                              intrinsics: Optional[Sequence[float]] = None,
                              max_queries: Optional[int] = None) -> List[Query]:
    """Read and validate every image of ``folder`` as a query (see the module docstring).

    Args:
        folder: the image folder.
        camera: the assumed camera (the run's training camera) when neither ``intrinsics`` nor
            ``folder/transforms.json`` give one; ``None`` there only validates the files (``K`` is then the
            identity and must not be used).
        intrinsics: ``(fx, fy, cx, cy)`` for every image, as given.
        max_queries: keep only the first N images.

    Returns:
        the queries (no prior, no ground truth; ``index`` = position in the sorted folder).
    """
    check_intrinsics(intrinsics)
    files = list_images(folder)
    if max_queries is not None:
        files = files[: max(0, int(max_queries))]
    assumed = folder_camera(folder) if intrinsics is None else None
    if assumed is None:
        assumed = camera
    queries: List[Query] = []
    for index, path in enumerate(files):
        where = f"--images {path.name}"
        rgb, alpha = _read_image(path, where)
        height, width = rgb.shape[:2]
        distortion = None
        if intrinsics is not None:
            fx, fy, cx, cy = (float(v) for v in intrinsics)
            if not (0 < cx < width and 0 < cy < height):
                raise GslocError(f"{where}: --intrinsics principal point ({cx:g}, {cy:g}) is outside the {width}x{height} image")
            K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        elif assumed is not None:
            K, distortion = assumed.scaled_to(width, height, where), assumed.distortion
        else:
            K = np.eye(3)
        view = make_view(rgb, alpha, K, None, None, distortion, torch.ones(3), alpha_as_mask=True)
        queries.append(Query(name=path.name, image_path=path.resolve(), index=index, **view))
    return queries
