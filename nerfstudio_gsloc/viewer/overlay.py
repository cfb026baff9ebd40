"""Draw ``ns-localize`` results (``poses.json``) into nerfstudio's viser viewer.

Frames and conventions
----------------------
``poses.json`` stores OpenGL camera-to-world 4x4 matrices in the dataset's **original** frame. nerfstudio's
viewer draws the model in the **scene** (dataparser) frame, multiplied by ``VISER_NERFSTUDIO_SCALE_RATIO``,
and its training-camera frustums use viser's OpenCV camera axes (+z forward, +y down): position
``t_scene * ratio``, orientation ``R_scene @ Rx(pi)``. Poses go original -> scene with
:meth:`FrameTransform.to_scene` and OpenGL -> OpenCV with :mod:`nerfstudio_gsloc.camera_conventions`, so a
query at a training camera's pose lands exactly on that camera's frustum.

Scene tree, per query (``<q>`` = the image's file name, made unique)::

    /localization/<q>/refined   frustum, green = converged, yellow = max_iterations, red = failed (thumbnail)
    /localization/<q>/initial   frustum, grey
    /localization/<q>/gt        frustum, blue (only when the entry has ground truth)
    /localization/<q>/path      orange line from the initial to the refined camera centre
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c, rigid_inverse, to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.queries import FrameTransform, parse_pose_matrix

#: nerfstudio's viewer draws scene coordinates times this (``nerfstudio.viewer.viewer``; copied so that
#: drawing does not import the whole viewer; a test checks the two agree).
VISER_NERFSTUDIO_SCALE_RATIO = 10.0

Rgb = Tuple[int, int, int]
STATUS_COLORS: Dict[str, Rgb] = {"converged": (30, 200, 60), "max_iterations": (235, 180, 0), "failed": (220, 30, 30)}
INITIAL_COLOR: Rgb = (150, 150, 150)
GT_COLOR: Rgb = (40, 90, 255)
PATH_COLOR: Rgb = (255, 140, 0)
THUMBNAIL_SIZE = 100  # shorter image side in pixels, as nerfstudio's training-camera thumbnails


@dataclass
class LocalizedQuery:
    """One entry of ``poses.json``.

    Attributes:
        name: the query's identifier (``image``).
        image_path: the query image (may no longer exist).
        status: ``converged`` / ``max_iterations`` / ``failed``.
        c2w, c2w_init: ``[4, 4]`` float64 refined / initial OpenGL camera-to-world, original frame.
        c2w_gt: optional ``[4, 4]`` ground truth, original frame.
        rot_err_deg, trans_err_scene: errors against the ground truth (``None`` without it).
        reason, iterations: why it stopped and after how many iterations.
    """

    name: str
    image_path: Path
    status: str
    c2w: Tensor
    c2w_init: Tensor
    c2w_gt: Optional[Tensor] = None
    rot_err_deg: Optional[float] = None
    trans_err_scene: Optional[float] = None
    reason: str = ""
    iterations: Optional[int] = None


@dataclass
class PosesFile:
    """A parsed ``poses.json``: its entries and the original <-> scene frame it was written with."""

    path: Path
    queries: List[LocalizedQuery]
    frame: FrameTransform
    settings: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FrustumShape:
    """Frustum shape in nerfstudio's convention for training cameras: ``fov = 2 atan(cx / fx)``, ``aspect = cx / cy``."""

    fov: float
    aspect: float

    @staticmethod
    def from_intrinsics(fx: float, cx: float, cy: float) -> "FrustumShape":
        """Shape of a pinhole camera (pixels) exactly as nerfstudio's viewer computes it."""
        return FrustumShape(fov=2.0 * math.atan(cx / fx), aspect=cx / cy)


@dataclass
class LocalizationOverlay:
    """What :func:`add_localization_overlay` drew: scene-node handles by query name and node kind."""

    nodes: Dict[str, Dict[str, Any]]
    node_paths: Dict[str, str]
    markdown: Any = None


def _matrix(value: Any, key: str, where: str) -> Tensor:
    """A finite ``[4, 4]`` (or ``[3, 4]``) rigid pose -> ``[4, 4]`` float64 (one-line error otherwise)."""
    return to_homogeneous(parse_pose_matrix(value, key, where))


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def read_poses_file(path: Path) -> PosesFile:
    """Read and validate a ``poses.json`` written by ``ns-localize``.

    Raises:
        GslocError: the file is missing, not JSON, or not a poses.json (keys, matrices, frame).
    """
    path = Path(path)
    if not path.is_file():
        raise GslocError(f"poses file not found: {path} (pass the poses.json that ns-localize wrote)")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GslocError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list) or "frame" not in document:
        raise GslocError(f"{path} is not a poses.json written by ns-localize (needs 'results' and 'frame')")
    try:
        frame_meta = document["frame"]
        transform = torch.tensor(frame_meta["transform"], dtype=torch.float64)[:3]
        scale = float(frame_meta["scale"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise GslocError(f"{path}: 'frame' must hold a 3x4 'transform' and a 'scale'") from None
    if transform.shape != (3, 4) or not torch.isfinite(transform).all() or not (math.isfinite(scale) and scale > 0):
        raise GslocError(f"{path}: 'frame' must hold a finite 3x4 'transform' and a positive 'scale'")
    queries = []
    for i, entry in enumerate(document["results"]):
        where = f"{path} result {i}"
        if not isinstance(entry, dict) or not all(k in entry for k in ("image", "status", "transform_matrix")):
            raise GslocError(f"{where}: needs 'image', 'status' and 'transform_matrix'")
        c2w = _matrix(entry["transform_matrix"], "transform_matrix", where)
        queries.append(
            LocalizedQuery(
                name=str(entry["image"]),
                image_path=Path(entry.get("image_path") or entry["image"]),
                status=str(entry["status"]),
                c2w=c2w,
                c2w_init=_matrix(entry["initial_transform_matrix"], "initial_transform_matrix", where)
                if entry.get("initial_transform_matrix") is not None
                else c2w,
                c2w_gt=_matrix(entry["gt_transform_matrix"], "gt_transform_matrix", where)
                if entry.get("gt_transform_matrix") is not None
                else None,
                rot_err_deg=_optional_float(entry.get("rot_err_deg")),
                trans_err_scene=_optional_float(entry.get("trans_err_scene")),
                reason=str(entry.get("reason") or ""),
                iterations=entry.get("iterations"),
            )
        )
    frame = FrameTransform(transform, scale, str(frame_meta.get("source", "")))
    return PosesFile(path, queries, frame, dict(document.get("settings") or {}))


def check_same_frame(run_frame: FrameTransform, poses_frame: FrameTransform, poses_path: Path) -> None:
    """Raise :class:`GslocError` when ``poses.json`` was written with another original <-> scene map than the run's."""
    same = math.isclose(run_frame.scale, poses_frame.scale, rel_tol=1e-6) and torch.allclose(
        run_frame.transform.double(), poses_frame.transform.double(), atol=1e-6
    )
    if not same:
        raise GslocError(f"{poses_path} was written for another run or dataset (its dataparser transform differs)")


def viewer_pose(c2w_scene: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Scene-frame OpenGL camera-to-world ``[3|4, 4]`` -> viser node ``(wxyz [4], position [3])``.

    viser frustums use OpenCV camera axes and the viewer scales scene units by ``VISER_NERFSTUDIO_SCALE_RATIO``,
    as nerfstudio's viewer does for its training cameras.
    """
    import viser.transforms as vtf

    c2w_opencv = rigid_inverse(opengl_c2w_to_opencv_w2c(c2w_scene.double()))
    wxyz = vtf.SO3.from_matrix(c2w_opencv[:3, :3].numpy()).wxyz
    position = c2w_opencv[:3, 3].numpy() * VISER_NERFSTUDIO_SCALE_RATIO
    return np.asarray(wxyz, dtype=np.float64), np.asarray(position, dtype=np.float64)


def load_thumbnail(image_path: Path, size: int = THUMBNAIL_SIZE) -> Optional[np.ndarray]:
    """The image as ``[h, w, 3]`` uint8 with its shorter side ``size`` pixels; ``None`` if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(image_path) as img:
            img = img.convert("RGB")
            ratio = size / min(img.size)
            if ratio < 1.0:
                img = img.resize((max(1, round(img.width * ratio)), max(1, round(img.height * ratio))))
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError):
        return None


def _node_names(queries: List[LocalizedQuery], root: str) -> List[str]:
    """``root/<file name>`` per query; characters viser treats specially become ``_``, duplicates get ``_<i>``."""
    names: List[str] = []
    for i, query in enumerate(queries):
        base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(query.name).name) or f"query_{i}"
        name = f"{root}/{base}"
        if name in names:
            name = f"{root}/{base}_{i}"
        names.append(name)
    return names


def _error_text(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def errors_markdown(queries: List[LocalizedQuery]) -> str:
    """A markdown table: per query its status, rotation error (deg), translation error (scene units), iterations."""
    counts = {s: sum(q.status == s for q in queries) for s in STATUS_COLORS}
    lines = [
        f"**{len(queries)} queries**: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "",
        "| image | status | rot (deg) | trans (scene) | iters |",
        "|---|---|---|---|---|",
    ]
    for q in queries:
        lines.append(
            f"| {Path(q.name).name} | {q.status} | {_error_text(q.rot_err_deg, 3)} | "
            f"{_error_text(q.trans_err_scene, 4)} | {'-' if q.iterations is None else q.iterations} |"
        )
    return "\n".join(lines)


def add_localization_overlay(
    server: Any,
    poses: PosesFile,
    frame: Optional[FrameTransform] = None,
    shapes: Optional[Mapping[str, FrustumShape]] = None,
    default_shape: FrustumShape = FrustumShape(fov=math.radians(60.0), aspect=4.0 / 3.0),
    frustum_scale: float = 0.1,
    thumbnails: bool = True,
    root: str = "/localization",
    gui: bool = True,
) -> LocalizationOverlay:
    """Add the frustums of every query in ``poses`` (and a GUI panel with their errors) to a viser server.

    Args:
        server: a ``viser.ViserServer`` (e.g. ``nerfstudio.viewer.viewer.Viewer.viser_server``).
        poses: the parsed ``poses.json``.
        frame: original -> scene map of the model drawn in the viewer (default: the one stored in ``poses``).
        shapes: frustum shape per query name (from its intrinsics); others use ``default_shape``.
        frustum_scale: frustum size, as nerfstudio's ``ViewerConfig.camera_frustum_scale``.
        thumbnails: show the query image on the refined frustum.
        root: scene-tree folder of the overlay.
        gui: add a "Localization" GUI folder with the error table and visibility toggles.

    Returns:
        The scene-node handles, by query name then ``refined`` / ``initial`` / ``gt`` / ``path``.
    """
    frame = poses.frame if frame is None else frame
    shapes = shapes or {}
    nodes: Dict[str, Dict[str, Any]] = {}
    node_paths: Dict[str, str] = {}
    for query, node in zip(poses.queries, _node_names(poses.queries, root)):
        shape = shapes.get(query.name, default_shape)
        # Original frame -> scene frame (the model's), for all three poses at once: [3, 4, 4] -> [3, 3, 4].
        stacked = torch.stack([query.c2w, query.c2w_init, query.c2w if query.c2w_gt is None else query.c2w_gt])
        scene = frame.to_scene(stacked)
        handles: Dict[str, Any] = {}

        def frustum(kind: str, c2w_scene: Tensor, color: Rgb, image: Optional[np.ndarray] = None) -> Any:
            wxyz, position = viewer_pose(c2w_scene)
            return server.scene.add_camera_frustum(
                name=f"{node}/{kind}", fov=shape.fov, aspect=shape.aspect, scale=frustum_scale, color=color,
                image=image, wxyz=wxyz, position=position,
            )

        image = load_thumbnail(query.image_path) if thumbnails else None
        handles["refined"] = frustum("refined", scene[0], STATUS_COLORS.get(query.status, STATUS_COLORS["failed"]), image)
        handles["initial"] = frustum("initial", scene[1], INITIAL_COLOR)
        if query.c2w_gt is not None:
            handles["gt"] = frustum("gt", scene[2], GT_COLOR)
        centres = np.stack([viewer_pose(scene[1])[1], viewer_pose(scene[0])[1]])  # [2, 3] initial -> refined
        handles["path"] = server.scene.add_spline_catmull_rom(
            name=f"{node}/path", positions=centres, line_width=2.0, color=PATH_COLOR
        )
        nodes[query.name] = handles
        node_paths[query.name] = node

    markdown = _add_gui(server, poses.queries, nodes) if gui else None
    return LocalizationOverlay(nodes=nodes, node_paths=node_paths, markdown=markdown)


def _add_gui(server: Any, queries: List[LocalizedQuery], nodes: Dict[str, Dict[str, Any]]) -> Any:
    """GUI folder with visibility toggles and the per-query error table; returns the markdown handle."""
    with server.gui.add_folder("Localization"):
        for kind, label in (("refined", "Refined poses"), ("initial", "Initial poses + paths"), ("gt", "Ground truth")):
            checkbox = server.gui.add_checkbox(label, initial_value=True)

            def toggle(_: Any, kind: str = kind, checkbox: Any = checkbox) -> None:
                kinds = ("initial", "path") if kind == "initial" else (kind,)
                for handles in nodes.values():
                    for k in kinds:
                        if k in handles:
                            handles[k].visible = checkbox.value

            checkbox.on_update(toggle)
        return server.gui.add_markdown(errors_markdown(queries))
