"""Draw localization results (``poses.json`` of ``ns-localize`` or ``gsloc-bench``) into nerfstudio's viser viewer.

Frames and conventions
----------------------
``poses.json`` (:mod:`nerfstudio_gsloc.poses_file`) stores OpenGL camera-to-world 4x4 matrices in the dataset's
**original** frame. nerfstudio's
viewer draws the model in the **scene** (dataparser) frame, multiplied by ``VISER_NERFSTUDIO_SCALE_RATIO``,
and its training-camera frustums use viser's OpenCV camera axes (+z forward, +y down): position
``t_scene * ratio``, orientation ``R_scene @ Rx(pi)``. Poses go original -> scene with
:meth:`FrameTransform.to_scene` and OpenGL -> OpenCV with :mod:`nerfstudio_gsloc.camera_conventions`, so a
query at a training camera's pose lands exactly on that camera's frustum.

Scene tree, per record (``<q>`` = the image's file name, with ``_t<trial>`` for benchmark trials, under
``<method>/`` when the file holds several methods, made unique)::

    /localization/<q>/refined   frustum, green = converged, yellow = max_iterations, red = failed, purple = rejected
                                (thumbnail; absent when a failed query has no pose)
    /localization/<q>/initial   frustum, grey
    /localization/<q>/gt        frustum, blue (only when the entry has ground truth)
    /localization/<q>/path      orange line from the initial to the refined camera centre
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform, opengl_c2w_to_opencv_w2c, rigid_inverse
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.poses_file import PoseRecord, PosesDocument

#: nerfstudio's viewer draws scene coordinates times this (``nerfstudio.viewer.viewer``; copied so that
#: drawing does not import the whole viewer; a test checks the two agree).
VISER_NERFSTUDIO_SCALE_RATIO = 10.0

Rgb = Tuple[int, int, int]
STATUS_COLORS: Dict[str, Rgb] = {
    "converged": (30, 200, 60), "max_iterations": (235, 180, 0), "failed": (220, 30, 30), "rejected": (150, 50, 200),
}
INITIAL_COLOR: Rgb = (150, 150, 150)
GT_COLOR: Rgb = (40, 90, 255)
PATH_COLOR: Rgb = (255, 140, 0)
THUMBNAIL_SIZE = 100  # shorter image side in pixels, as nerfstudio's training-camera thumbnails


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
    """What :func:`add_localization_overlay` drew: scene-node handles by record label (:func:`record_label`) and kind."""

    nodes: Dict[str, Dict[str, Any]]
    node_paths: Dict[str, str]
    markdown: Any = None


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


def record_label(record: PoseRecord, several_methods: bool) -> str:
    """The key of a record in the overlay: its image, with ``[method]`` when the file holds several methods and
    ``trial <t>`` for benchmark trials (an ``ns-localize`` file: just the image)."""
    label = record.image
    if several_methods:
        label += f" [{record.method}]"
    if record.trial is not None:
        label += f" trial {record.trial}"
    return label


def _node_names(records: List[PoseRecord], several_methods: bool, root: str) -> List[str]:
    """``root/[<method>/]<file name>[_t<trial>]`` per record; characters viser treats specially become ``_``,
    duplicates get ``_<i>``."""
    names: List[str] = []
    for i, record in enumerate(records):
        base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(record.image).name) or f"query_{i}"
        if record.trial is not None:
            base += f"_t{record.trial}"
        folder = f"{root}/{re.sub(r'[^A-Za-z0-9._-]', '_', record.method)}" if several_methods else root
        name = f"{folder}/{base}"
        if name in names:
            name = f"{folder}/{base}_{i}"
        names.append(name)
    return names


def _error_text(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def errors_markdown(records: List[PoseRecord], labels: List[str], scale: float) -> str:
    """A markdown table: per record its status, rotation error (deg), translation error (scene units), iterations.

    Errors are those of the refined pose against the ground truth (``-`` without either); ``scale`` is the frame's
    dataparser scale (scene units per original unit).
    """
    counts = {s: sum(r.status == s for r in records) for s in STATUS_COLORS}
    lines = [
        f"**{len(records)} queries**: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "",
        "| image | status | rot (deg) | trans (scene) | iters |",
        "|---|---|---|---|---|",
    ]
    for record, label in zip(records, labels):
        rot, trans = record.errors(scale)
        name = Path(record.image).name + label[len(record.image):]
        lines.append(
            f"| {name} | {record.status} | {_error_text(rot, 3)} | {_error_text(trans, 4)} | {record.iterations} |"
        )
    return "\n".join(lines)


def add_localization_overlay(
    server: Any,
    poses: PosesDocument,
    frame: Optional[FrameTransform] = None,
    shapes: Optional[Mapping[str, FrustumShape]] = None,
    default_shape: FrustumShape = FrustumShape(fov=math.radians(60.0), aspect=4.0 / 3.0),
    frustum_scale: float = 0.1,
    thumbnails: bool = True,
    root: str = "/localization",
    gui: bool = True,
) -> LocalizationOverlay:
    """Add the frustums of every record in ``poses`` (and a GUI panel with their errors) to a viser server.

    Args:
        server: a ``viser.ViserServer`` (e.g. ``nerfstudio.viewer.viewer.Viewer.viser_server``).
        poses: the parsed ``poses.json`` (:func:`nerfstudio_gsloc.poses_file.read_poses`).
        frame: original -> scene map of the model drawn in the viewer (default: the one stored in ``poses``).
        shapes: frustum shape per query image name (from its intrinsics); others use ``default_shape``.
        frustum_scale: frustum size, as nerfstudio's ``ViewerConfig.camera_frustum_scale``.
        thumbnails: show the query image on the refined frustum.
        root: scene-tree folder of the overlay.
        gui: add a "Localization" GUI folder with the error table and visibility toggles.

    Returns:
        The scene-node handles, by :func:`record_label` (the image name for ``ns-localize`` files) then
        ``refined`` / ``initial`` / ``gt`` / ``path``; kinds whose pose is missing are absent.
    """
    frame = poses.frame if frame is None else frame
    shapes = shapes or {}
    records = poses.records
    several_methods = len({r.method for r in records}) > 1
    labels = [record_label(r, several_methods) for r in records]
    nodes: Dict[str, Dict[str, Any]] = {}
    node_paths: Dict[str, str] = {}
    for record, label, node in zip(records, labels, _node_names(records, several_methods, root)):
        shape = shapes.get(record.image, default_shape)
        handles: Dict[str, Any] = {}

        def frustum(kind: str, c2w_original: Tensor, color: Rgb, image: Optional[np.ndarray] = None) -> Any:
            # Original frame -> scene frame (the model's) -> viser's node pose.
            wxyz, position = viewer_pose(frame.to_scene(c2w_original.double()))
            handles[kind] = server.scene.add_camera_frustum(
                name=f"{node}/{kind}", fov=shape.fov, aspect=shape.aspect, scale=frustum_scale, color=color,
                image=image, wxyz=wxyz, position=position,
            )
            return position

        if record.c2w is not None:
            image = load_thumbnail(record.image_path or Path(record.image)) if thumbnails else None
            refined = frustum("refined", record.c2w, STATUS_COLORS.get(record.status, STATUS_COLORS["failed"]), image)
        if record.c2w_init is not None:
            initial = frustum("initial", record.c2w_init, INITIAL_COLOR)
        if record.c2w_gt is not None:
            frustum("gt", record.c2w_gt, GT_COLOR)
        if record.c2w is not None and record.c2w_init is not None:
            handles["path"] = server.scene.add_spline_catmull_rom(
                name=f"{node}/path", positions=np.stack([initial, refined]), line_width=2.0, color=PATH_COLOR
            )
        nodes[label] = handles
        node_paths[label] = node

    markdown = _add_gui(server, errors_markdown(records, labels, frame.scale), nodes) if gui else None
    return LocalizationOverlay(nodes=nodes, node_paths=node_paths, markdown=markdown)


def _add_gui(server: Any, table: str, nodes: Dict[str, Dict[str, Any]]) -> Any:
    """GUI folder with visibility toggles and the per-record error table; returns the markdown handle."""
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
        return server.gui.add_markdown(table)
