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

    /localization/<q>/refined        frustum outline, green = converged, yellow = max_iterations, red = failed,
                                     purple = rejected, cyan = still running (ns-localize --viewer)
    /localization/<q>/refined/image  the query image inside that outline (0.85 of its size, so the outline shows)
    /localization/<q>/initial        frustum, grey
    /localization/<q>/gt             frustum, blue, 1.15 times larger (visible around a converged refined frustum)
    /localization/<q>/path           orange line from the initial camera centre to the refined one (while running:
                                     through every centre drawn so far)
    /localization/trajectory[/<m>]   optional: a line through the refined centres in query order, per method/trial

Absent: ``refined`` when a failed query has no pose, ``gt`` without ground truth.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
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
STATUS_RUNNING = "running"
"""Not a result status: a query that ``ns-localize --viewer`` is still optimising."""
STATUS_COLORS: Dict[str, Rgb] = {
    "converged": (30, 200, 60), "max_iterations": (235, 180, 0), "failed": (220, 30, 30), "rejected": (150, 50, 200),
    STATUS_RUNNING: (0, 200, 230),
}
INITIAL_COLOR: Rgb = (150, 150, 150)
GT_COLOR: Rgb = (40, 90, 255)
PATH_COLOR: Rgb = (255, 140, 0)
TRAJECTORY_COLOR: Rgb = (255, 60, 170)
THUMBNAIL_SIZE = 100  # shorter image side in pixels, as nerfstudio's training-camera thumbnails
IMAGE_SCALE = 0.85  # the thumbnail sits inside the refined outline ...
GT_SCALE = 1.15  # ... and the ground truth around it, so that a converged query shows all three


@dataclass
class FrustumShape:
    """Frustum shape in nerfstudio's convention for training cameras: ``fov = 2 atan(cx / fx)``, ``aspect = cx / cy``.

    ``vertical_fov`` (``2 atan(cy / fy)``, radians) is the query camera's, for moving the viewer's camera to it.
    """

    fov: float
    aspect: float
    vertical_fov: Optional[float] = None

    @staticmethod
    def from_intrinsics(fx: float, cx: float, cy: float, fy: Optional[float] = None) -> "FrustumShape":
        """Shape of a pinhole camera (pixels) exactly as nerfstudio's viewer computes it."""
        fy = fx if fy is None else fy
        return FrustumShape(fov=2.0 * math.atan(cx / fx), aspect=cx / cy, vertical_fov=2.0 * math.atan(cy / fy))


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


def _safe(text: str) -> str:
    """A scene-tree name part: characters viser treats specially become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _image_plane(shape: FrustumShape, scale: float) -> Tuple[float, float, float]:
    """``(width, height, depth)`` of the image plane viser's ``CameraFrustum`` draws at ``scale`` (its
    volume-normalised extent), so that a separate image node can sit exactly where the frustum's own would."""
    y = math.tan(shape.fov / 2.0)
    volume = (y * shape.aspect * y / 3.0) ** (1.0 / 3.0)
    y, z = y / volume, 1.0 / volume
    return scale * shape.aspect * y * 2.0, scale * y * 2.0, scale * z


@dataclass
class DrawnRecord:
    """One record in the scene: its record, node folder, handles by kind, and the path's centres so far."""

    record: PoseRecord
    node: str
    shape: FrustumShape
    handles: Dict[str, Any] = field(default_factory=dict)
    path: List[np.ndarray] = field(default_factory=list)


class LocalizationOverlay:
    """The frustums of localized queries in a viser scene (see the module docstring); records can be added,
    redrawn (when a live query finishes) and moved (while it is optimised).

    Args:
        server: a ``viser.ViserServer`` (e.g. ``nerfstudio.viewer.viewer.Viewer.viser_server``).
        frame: original -> scene map of the model drawn in the viewer.
        shapes: frustum shape per query image name (from its intrinsics); others use ``default_shape``.
        frustum_scale: frustum size, as nerfstudio's ``ViewerConfig.camera_frustum_scale``.
        thumbnails: show the query image in the refined frustum.
        several_methods: the records come from several methods (labels and folders name the method).
        root: scene-tree folder of the overlay.
    """

    def __init__(self, server: Any, frame: FrameTransform, shapes: Optional[Mapping[str, FrustumShape]] = None,
                 default_shape: FrustumShape = FrustumShape(fov=math.radians(60.0), aspect=4.0 / 3.0),
                 frustum_scale: float = 0.1, thumbnails: bool = True, several_methods: bool = False,
                 root: str = "/localization") -> None:
        self.server = server
        self.frame = frame
        self.shapes = dict(shapes or {})
        self.default_shape = default_shape
        self.frustum_scale = frustum_scale
        self.thumbnails = thumbnails
        self.several_methods = several_methods
        self.root = root
        self.drawn: Dict[str, DrawnRecord] = {}
        self.visible: Dict[str, bool] = {"refined": True, "initial": True, "gt": True, "trajectory": True}
        self.trajectory: Dict[str, Any] = {}
        self.panel: Any = None  # the LocalizationPanel showing these records, if any
        self._thumbnail_cache: Dict[str, Optional[np.ndarray]] = {}

    # -- what the panel and tests read -------------------------------------------------------------------------

    @property
    def nodes(self) -> Dict[str, Dict[str, Any]]:
        """Scene-node handles by record label, then kind (``refined``, ``image``, ``initial``, ``gt``, ``path``)."""
        return {label: drawn.handles for label, drawn in self.drawn.items()}

    @property
    def node_paths(self) -> Dict[str, str]:
        """Scene-tree folder of each record, by label."""
        return {label: drawn.node for label, drawn in self.drawn.items()}

    @property
    def records(self) -> List[PoseRecord]:
        return [drawn.record for drawn in self.drawn.values()]

    def label(self, record: PoseRecord) -> str:
        return record_label(record, self.several_methods)

    # -- drawing -----------------------------------------------------------------------------------------------

    def _node_name(self, record: PoseRecord) -> str:
        base = _safe(Path(record.image).name) or f"query_{len(self.drawn)}"
        if record.trial is not None:
            base += f"_t{record.trial}"
        folder = f"{self.root}/{_safe(record.method)}" if self.several_methods else self.root
        name, taken = f"{folder}/{base}", {d.node for d in self.drawn.values()}
        return name if name not in taken else f"{folder}/{base}_{len(self.drawn)}"

    def _thumbnail(self, record: PoseRecord) -> Optional[np.ndarray]:
        path = str(record.image_path or record.image)
        if path not in self._thumbnail_cache:
            self._thumbnail_cache[path] = load_thumbnail(Path(path))
        return self._thumbnail_cache[path]

    def draw(self, record: PoseRecord) -> str:
        """Draw (or redraw, replacing its nodes) one record; returns its label."""
        label = self.label(record)
        previous = self.drawn.get(label)
        if previous is not None:
            for handle in previous.handles.values():
                handle.remove()
        node = previous.node if previous is not None else self._node_name(record)
        drawn = DrawnRecord(record, node, self.shapes.get(record.image, self.default_shape))
        self.drawn[label] = drawn
        scale, shape = self.frustum_scale, drawn.shape

        def frustum(kind: str, c2w_original: Tensor, color: Rgb, size: float = 1.0) -> np.ndarray:
            # Original frame -> scene frame (the model's) -> viser's node pose.
            wxyz, position = viewer_pose(self.frame.to_scene(c2w_original.double()))
            drawn.handles[kind] = self.server.scene.add_camera_frustum(
                name=f"{node}/{kind}", fov=shape.fov, aspect=shape.aspect, scale=scale * size, color=color,
                wxyz=wxyz, position=position, visible=self.visible[kind],
            )
            return position

        if record.c2w_gt is not None:
            frustum("gt", record.c2w_gt, GT_COLOR, GT_SCALE)
        if record.c2w_init is not None:
            drawn.path.append(frustum("initial", record.c2w_init, INITIAL_COLOR))
        if record.c2w is not None:
            color = STATUS_COLORS.get(record.status, STATUS_COLORS["failed"])
            refined = frustum("refined", record.c2w, color)
            image = self._thumbnail(record) if self.thumbnails else None
            if image is not None:
                width, height, depth = _image_plane(shape, scale * IMAGE_SCALE)
                drawn.handles["image"] = self.server.scene.add_image(
                    f"{node}/refined/image", image, width, height, position=(0.0, 0.0, depth)
                )
            if drawn.path:
                if previous is not None and previous.path:
                    drawn.path = previous.path  # keep the centres a live query went through
                drawn.path.append(refined)
                self._draw_path(drawn)
        if self.trajectory:
            self.draw_trajectory()
        return label

    def _draw_path(self, drawn: DrawnRecord) -> None:
        drawn.handles["path"] = self.server.scene.add_spline_catmull_rom(
            name=f"{drawn.node}/path", positions=np.stack(drawn.path), line_width=2.0, color=PATH_COLOR,
            visible=self.visible["initial"],
        )

    def move(self, label: str, c2w_scene: Tensor) -> None:
        """Move a record's refined frustum to ``c2w_scene`` (``[3, 4]``, scene frame; live updates), extending its path."""
        drawn = self.drawn[label]
        refined = drawn.handles.get("refined")
        if refined is None:
            return
        wxyz, position = viewer_pose(c2w_scene)
        refined.wxyz, refined.position = wxyz, position
        if drawn.path:
            drawn.path.append(position)
            self._draw_path(drawn)

    def set_visible(self, kind: str, visible: bool) -> None:
        """Show or hide every node of ``kind`` (``initial`` also hides the paths)."""
        self.visible[kind] = visible
        kinds = {"initial": ("initial", "path"), "refined": ("refined",)}.get(kind, (kind,))
        for drawn in self.drawn.values():
            for k in kinds:
                if k in drawn.handles:
                    drawn.handles[k].visible = visible
        if kind == "trajectory":
            for handle in self.trajectory.values():
                handle.visible = visible

    def draw_trajectory(self) -> None:
        """A line through the refined centres in query order, one per method and trial (e.g. a sequence's frames)."""
        groups: Dict[Tuple[str, Optional[int]], List[PoseRecord]] = {}
        for record in self.records:
            if record.c2w is not None:
                groups.setdefault((record.method, record.trial), []).append(record)
        for handle in self.trajectory.values():
            handle.remove()
        self.trajectory = {}
        for (method, trial), members in groups.items():
            if len(members) < 2:
                continue
            members.sort(key=lambda r: r.index)
            centres = [viewer_pose(self.frame.to_scene(r.c2w.double()))[1] for r in members]
            name = f"{self.root}/trajectory" + (f"/{_safe(method)}" if self.several_methods else "")
            name += f"_t{trial}" if trial is not None else ""
            self.trajectory[name] = self.server.scene.add_spline_catmull_rom(
                name=name, positions=np.stack(centres), line_width=3.0, color=TRAJECTORY_COLOR,
                visible=self.visible["trajectory"],
            )

    def camera_target(self, label: str) -> Optional[Tuple[np.ndarray, np.ndarray, Optional[float]]]:
        """``(wxyz, position, vertical fov or None)`` of a record's refined frustum (else its initial one)."""
        drawn = self.drawn[label]
        handle = drawn.handles.get("refined", drawn.handles.get("initial"))
        if handle is None:
            return None
        return np.asarray(handle.wxyz), np.asarray(handle.position), drawn.shape.vertical_fov


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
    trajectory: bool = False,
) -> LocalizationOverlay:
    """Add the frustums of every record in ``poses`` (and the Localization GUI panel) to a viser server.

    Args:
        server: a ``viser.ViserServer``.
        poses: the parsed ``poses.json`` (:func:`nerfstudio_gsloc.poses_file.read_poses`).
        frame: original -> scene map of the model drawn in the viewer (default: the one stored in ``poses``).
        shapes, default_shape, frustum_scale, thumbnails, root: see :class:`LocalizationOverlay`.
        gui: add the "Localization" panel (:class:`~nerfstudio_gsloc.viewer.panel.LocalizationPanel`).
        trajectory: also draw a line through the refined centres in query order (sequences).

    Returns:
        The overlay; ``overlay.panel`` is the panel (``None`` without ``gui``).
    """
    several = len({r.method for r in poses.records}) > 1
    overlay = LocalizationOverlay(server, poses.frame if frame is None else frame, shapes, default_shape,
                                  frustum_scale, thumbnails, several, root)
    for record in poses.records:
        overlay.draw(record)
    if trajectory:
        overlay.draw_trajectory()
    if gui:
        from nerfstudio_gsloc.viewer.panel import LocalizationPanel

        overlay.panel = LocalizationPanel(server, overlay, trajectory=trajectory)
    return overlay
