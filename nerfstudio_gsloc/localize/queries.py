"""Query images to localize: the run's held-out eval split, or a nerfstudio-format transforms.json of new images.

A :class:`Query` holds everything the optimiser needs about one image, with all poses already in the
**scene** frame (nerfstudio's dataparser frame, OpenGL camera-to-world ``[3, 4]``) and depth in scene units.

Query files (``--queries path/to/transforms.json``)
---------------------------------------------------
The file follows nerfstudio's transforms.json format, with two pose keys per frame:

* ``transform_matrix`` (optional): the **ground-truth** camera-to-world pose, used only for metrics;
* ``prior_transform_matrix`` (optional): the **prior** pose that ``--init prior`` starts from.

Both are OpenGL camera-to-world ``4x4`` (or ``3x4``) matrices in the dataset's original frame, i.e. the frame of
the training dataset's own transforms.json. They are converted to the scene frame with the run's
``dataparser_transforms.json`` (see :mod:`~nerfstudio_gsloc.localize.frame_transform`). Other keys, global or
per frame (per frame wins):

* intrinsics, required: ``fl_x``, ``fl_y``, ``cx``, ``cy`` (pixels, pixel centres at +0.5 like nerfstudio) and
  ``w``, ``h``; the image must have exactly that size.
* lens distortion, optional: ``camera_model`` ``OPENCV`` (also ``PINHOLE``, ``SIMPLE_PINHOLE``, ``SIMPLE_RADIAL``,
  ``RADIAL``) with ``k1``, ``k2``, ``k3``, ``p1``, ``p2``, or ``OPENCV_FISHEYE`` with ``k1``..``k4``; or
  nerfstudio's ``distortion_params`` list ``[k1, k2, k3, k4, p1, p2]``, which wins over the single keys.
* ``file_path`` (required, per frame): the image, relative to the file's folder. RGBA images are composited
  onto white and their alpha (``> 0.5``) becomes part of the mask.
* ``depth_file_path`` (optional): 16-bit PNG or ``.npy`` z-depth, times ``depth_unit_scale_factor``
  (default ``1e-3``, millimetres, as in nerfstudio) gives original units; it is then multiplied by the
  dataparser scale to reach scene units. Zero depth = missing.
* ``mask_path`` (optional): single-channel mask of the image's size, non-zero = pixel to use.

Every frame is validated (files present and decodable, intrinsics complete, sizes consistent, matrices finite)
before anything is returned, so a bad file stops the program before any work with one :class:`GslocError`.

Distorted queries
-----------------
Queries with non-zero distortion (a transforms.json as above, or an eval split whose cameras have
``distortion_params``) are undistorted exactly like nerfstudio undistorts the training images (its own
``_undistort_image``, see :mod:`nerfstudio_gsloc.localize.undistort`): the query's ``K``, ``width`` and ``height``
are then those of the undistorted (for ``OPENCV``: cropped) image, masks and depth follow the same pixel mapping,
pixels with no source in the distorted image are masked out, and the poses are unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.poses_file import parse_pose_matrix
from nerfstudio_gsloc.localize.query_images import make_view, read_depth, read_mask, read_rgb
from nerfstudio_gsloc.localize.undistort import (
    DISTORTION_KEYS,
    FISHEYE_MODELS,
    PERSPECTIVE_MODELS,
    camera_distortion,
    check_distortion,
    is_distorted,
    raw_dataset_cameras,
)

#: nerfstudio's default unit of 16-bit depth images (millimetres).
DEFAULT_DEPTH_UNIT_SCALE = 1e-3
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")


@dataclass
class Query:
    """One image to localize.

    Attributes:
        name: identifier written to the outputs (the image path as given).
        image_path: the image file.
        image: ``[H, W, 3]`` float32 colours in ``[0, 1]``.
        K: ``[3, 3]`` float32 intrinsics in pixels (pixel centres at +0.5).
        width, height: image size ``W``, ``H``.
        depth: optional ``[H, W]`` float32 z-depth in scene units (``<= 0`` = missing).
        mask: optional ``[H, W]`` bool, True = pixel to use.
        prior_c2w: optional ``[3, 4]`` prior OpenGL camera-to-world pose, scene frame.
        gt_c2w: optional ``[3, 4]`` ground-truth OpenGL camera-to-world pose, scene frame.
        background: optional ``[3]`` colour that transparent parts of the image were composited onto; renders
            compared with this query use the same colour (``None``: the model's own background).
        index: position of the query in its list (seeds per-query randomness independently of batching).
    """

    name: str
    image_path: Path
    image: Tensor
    K: Tensor
    width: int
    height: int
    depth: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    prior_c2w: Optional[Tensor] = None
    gt_c2w: Optional[Tensor] = None
    background: Optional[Tensor] = None
    index: int = 0


# ----------------------------------------------------------------------------------------------------------
# transforms.json queries
# ----------------------------------------------------------------------------------------------------------


def _number(meta: Dict[str, Any], frame: Dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    """A per-frame value, else the file-level one, else ``default``; must be a finite number."""
    value = frame.get(key, meta.get(key, default))
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise GslocError(f"{where}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise GslocError(f"{where}: {key} must be finite")
    return value


def load_transforms_queries(
    path: Path, frame_transform: FrameTransform, max_queries: Optional[int] = None
) -> List[Query]:
    """Load and validate the queries of a nerfstudio-format transforms.json (see the module docstring).

    Args:
        path: the transforms.json.
        frame_transform: original -> scene frame map of the run the queries are localized in.
        max_queries: keep only the first ``max_queries`` frames (``None``: all).

    Returns:
        the queries, poses in the scene frame.

    Raises:
        GslocError: on the first problem found, before returning anything.
    """
    path = Path(path)
    if not path.is_file():
        raise GslocError(f"query file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GslocError(f"cannot parse query file {path}: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise GslocError(f"query file {path} has no 'frames' list")
    frames = meta["frames"]
    if max_queries is not None:
        frames = frames[: max(0, int(max_queries))]
    root = path.parent
    queries: List[Query] = []
    for index, frame in enumerate(frames):
        where = f"{path.name} frame {index}"
        if not isinstance(frame, dict) or "file_path" not in frame:
            raise GslocError(f"{where}: missing file_path")
        image_path = root / str(frame["file_path"])
        where = f"{path.name} frame {index} ({frame['file_path']})"
        if any(q.name == str(frame["file_path"]) for q in queries):
            raise GslocError(f"{where}: file_path appears twice (results are keyed by it)")
        values = {key: _number(meta, frame, key, where) for key in _INTRINSIC_KEYS}
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise GslocError(f"{where}: missing intrinsics {', '.join(missing)} (need fl_x, fl_y, cx, cy, w, h)")
        distortion = file_distortion(meta, frame, where)
        width, height = int(round(values["w"])), int(round(values["h"]))
        if width <= 0 or height <= 0 or values["fl_x"] <= 0 or values["fl_y"] <= 0:
            raise GslocError(f"{where}: w, h, fl_x and fl_y must be positive")

        rgb, alpha = read_rgb(image_path, where)
        if rgb.shape[:2] != (height, width):
            raise GslocError(
                f"{where}: image is {rgb.shape[1]}x{rgb.shape[0]} but its intrinsics say w={width}, h={height}"
            )
        file_mask: Optional[np.ndarray] = None
        if frame.get("mask_path") is not None:
            file_mask = read_mask(root / str(frame["mask_path"]), where)
            if file_mask.shape != (height, width):
                raise GslocError(f"{where}: mask is {file_mask.shape[1]}x{file_mask.shape[0]}, image is {width}x{height}")
        depth: Optional[np.ndarray] = None
        if frame.get("depth_file_path") is not None:
            raw = read_depth(root / str(frame["depth_file_path"]), where)
            unit = _number(meta, frame, "depth_unit_scale_factor", where, DEFAULT_DEPTH_UNIT_SCALE)
            if raw.shape != (height, width):
                # Same rule as nerfstudio's depth loader: nearest-neighbour resize to the image size.
                raw_t = torch.from_numpy(raw)[None, None]
                raw = torch.nn.functional.interpolate(raw_t, size=(height, width), mode="nearest")[0, 0].numpy()
            depth = raw * float(unit) * frame_transform.scale
            depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
        K = np.array([[values["fl_x"], 0.0, values["cx"]], [0.0, values["fl_y"], values["cy"]], [0.0, 0.0, 1.0]])
        view = make_view(rgb, alpha, K, file_mask, depth, distortion, torch.ones(3), alpha_as_mask=True)
        gt = prior = None
        if frame.get("transform_matrix") is not None:
            gt = frame_transform.to_scene(parse_pose_matrix(frame["transform_matrix"], "transform_matrix", where)).float()
        if frame.get("prior_transform_matrix") is not None:
            prior_orig = parse_pose_matrix(frame["prior_transform_matrix"], "prior_transform_matrix", where)
            prior = frame_transform.to_scene(prior_orig).float()
        queries.append(
            Query(name=str(frame["file_path"]), image_path=image_path, prior_c2w=prior, gt_c2w=gt, index=index, **view)
        )
    return queries


# ----------------------------------------------------------------------------------------------------------
# eval split of a loaded pipeline
# ----------------------------------------------------------------------------------------------------------


def load_eval_queries(pipeline: Any, max_queries: Optional[int] = None, split: Literal["eval", "train"] = "eval",
                      indices: Optional[Sequence[int]] = None) -> List[Query]:
    """The held-out eval split of a loaded nerfstudio pipeline as queries (ground truth known, no prior).

    Cameras come from the eval dataset (already in the scene frame, rescaled like the images); images are
    composited onto the dataparser's ``alpha_color`` like nerfstudio does (RGBA without an alpha colour:
    alpha becomes the mask); depth comes from the ``depth_filenames`` metadata, scaled by
    ``depth_unit_scale_factor`` and the dataparser scale; masks from the dataparser's mask files.

    Args:
        pipeline: a loaded nerfstudio pipeline whose ``datamanager`` has an ``eval_dataset``.
        max_queries: keep only the first ``max_queries`` images.
        split: ``"train"`` reads the training split the same way (the self-test of
            :mod:`~nerfstudio_gsloc.localize.calibration` localizes training photos as queries).
        indices: only these images of the split (after ``max_queries``); a query's ``index`` stays its
            position in the split.

    Raises:
        GslocError: no eval dataset, an empty split, unsupported camera types or distortion, unreadable files.
    """
    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path

    dataset = getattr(getattr(pipeline, "datamanager", None), f"{split}_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise GslocError(f"the run has no {split} split to localize; pass --queries path/to/transforms.json")
    outputs = dataset._dataparser_outputs
    cameras = raw_dataset_cameras(dataset)  # the raw images' cameras, with their lens distortion
    count = len(dataset) if max_queries is None else min(len(dataset), max(0, int(max_queries)))
    depth_files: Optional[Sequence[Path]] = dataset.metadata.get("depth_filenames")
    depth_scale = float(dataset.metadata.get("depth_unit_scale_factor", DEFAULT_DEPTH_UNIT_SCALE)) * float(
        outputs.dataparser_scale
    )
    alpha_color = outputs.alpha_color
    queries: List[Query] = []
    for index in (range(count) if indices is None else [i for i in indices if 0 <= i < count]):
        image_path = Path(outputs.image_filenames[index])
        where = f"{split} image {index} ({image_path.name})"
        camera = cameras[index]
        camera_type = int(camera.camera_type.reshape(-1)[0])
        if camera_type not in (CameraType.PERSPECTIVE.value, CameraType.FISHEYE.value):
            raise GslocError(f"{where}: only perspective and OPENCV_FISHEYE cameras can be localized")
        distortion = camera_distortion(camera, where)
        width, height = int(camera.width.item()), int(camera.height.item())
        try:
            pixels = dataset.get_numpy_image(index)
        except Exception as err:
            raise GslocError(f"{where}: cannot read image {image_path}: {type(err).__name__}: {err}") from None
        if pixels.shape[:2] != (height, width):
            raise GslocError(f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]} but its camera says {width}x{height}")
        file_mask: Optional[np.ndarray] = None
        if outputs.mask_filenames is not None:
            file_mask = read_mask(Path(outputs.mask_filenames[index]), where)
            if file_mask.shape != (height, width):
                resized = torch.nn.functional.interpolate(
                    torch.from_numpy(file_mask)[None, None].float(), size=(height, width), mode="nearest"
                )
                file_mask = resized[0, 0].numpy() > 0.5
        depth: Optional[np.ndarray] = None
        if depth_files is not None:
            depth_path = Path(depth_files[index])
            if not depth_path.is_file():
                raise GslocError(f"{where}: depth file not found: {depth_path}")
            depth = get_depth_image_from_path(depth_path, height, width, depth_scale)[..., 0].float().numpy()
        K = camera.get_intrinsics_matrices().double().numpy()
        alpha = pixels[..., 3] if pixels.shape[-1] == 4 else None
        background = alpha_color.float() if alpha_color is not None else torch.ones(3)
        view = make_view(pixels[..., :3], alpha, K, file_mask, depth, distortion, background, alpha_color is None)
        queries.append(
            Query(
                name=str(image_path),
                image_path=image_path,
                gt_c2w=camera.camera_to_worlds.detach().cpu().float()[:3, :4].clone(),
                index=index,
                **view,
            )
        )
    return queries


# ----------------------------------------------------------------------------------------------------------
# lens model of a query file
# ----------------------------------------------------------------------------------------------------------


def file_distortion(meta: Dict[str, Any], frame: Dict[str, Any], where: str) -> Optional[tuple]:
    """A query file's lens model (per frame, else global): ``None`` without distortion, else
    ``(params [6] float64 [k1, k2, k3, k4, p1, p2], fisheye)``. Raises :class:`GslocError` on unsupported input."""
    camera_model = str(frame.get("camera_model", meta.get("camera_model", "OPENCV"))).upper()
    if camera_model not in PERSPECTIVE_MODELS + FISHEYE_MODELS:
        supported = ", ".join(PERSPECTIVE_MODELS + FISHEYE_MODELS)
        raise GslocError(f"{where}: camera_model {camera_model} is not supported (use one of {supported})")
    listed = frame.get("distortion_params", meta.get("distortion_params"))
    if listed is not None:
        try:
            params = np.asarray(listed, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise GslocError(f"{where}: distortion_params must be a list of 6 numbers [k1, k2, k3, k4, p1, p2]") from None
    else:
        params = np.array([_number(meta, frame, key, where, 0.0) for key in DISTORTION_KEYS])
    fisheye = camera_model in FISHEYE_MODELS
    check_distortion(params, fisheye, where)
    return (params, fisheye) if is_distorted(params) else None
