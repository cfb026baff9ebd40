"""The "Localization" GUI panel of the viewer: a summary, visibility toggles, one row per query, its details.

Layout (fits nerfstudio's side panel, 320 px, without horizontal scrolling)::

    Localization
      summary      per method: counts by status, median/mean errors and success rates, with the numbers and
                   formats of ns-localize's metrics.json table (:func:`summary_markdown`)
      [x] Refined poses   [x] Initial poses + paths   [x] Ground truth   ([x] Trajectory)
      details      the selected query: status, reason, errors, iterations, inliers, seconds
      rows         one button per record (under a heading per method when there are several), coloured by
                   status: "<image> · <rot>° · <trans>"; clicking it moves the viewer's camera to that query's
                   refined pose (and field of view), so the render can be compared with the query image, and
                   shows its details

Width: a button's label does not wrap, so its text sets the panel's narrowest width; labels are at most
:data:`ROW_CHARS` characters (a long image name is shortened in the middle; the full name is in the tooltip and the
details), which fits 320 px with room to spare, and the rows sit directly in the folder (no nested folder's indent).
viser 0.2 cannot relabel a button, so a row that changes (a live query finishing) is replaced at the same order.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from nerfstudio_gsloc.metrics import SUCCESS_THRESHOLDS, threshold_key
from nerfstudio_gsloc.poses_file import PoseRecord, summarize_records
from nerfstudio_gsloc.viewer.overlay import STATUS_RUNNING, LocalizationOverlay

#: Button colour (Mantine's names) of each status, matching the frustum colours.
ROW_COLORS: Dict[str, str] = {
    "converged": "green", "max_iterations": "yellow", "failed": "red", "rejected": "violet", STATUS_RUNNING: "cyan",
}
HINT = "Click a query to view the scene from its refined pose."
#: Longest row label (about 7 px a character in the panel's font: 28 characters take about 205 px of 320).
ROW_CHARS = 28


def _number(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def short_name(record: PoseRecord, label: str) -> str:
    """The details' name: the image's file name plus what the label adds (method, trial)."""
    return Path(record.image).name + label[len(record.image):]


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters in the middle (``"frame_…0012"``), keeping both ends."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def row_label(record: PoseRecord, scale: float) -> str:
    """``"<image> · <rot>° · <trans>"`` (errors of the refined pose, scene units) or ``"<image> · <status>"``, at
    most :data:`ROW_CHARS` characters: the image is its file name without extension (``t<trial>`` appended)."""
    rot, trans = record.errors(scale)
    name = Path(record.image).stem + ("" if record.trial is None else f" t{record.trial}")
    if record.status in (STATUS_RUNNING, "failed", "rejected") or rot is None:
        tail = f" · {record.status}"
    else:
        tail = f" · {rot:.2f}° · {trans:.4f}"
    return shorten(name, max(6, ROW_CHARS - len(tail))) + tail


def summary_markdown(records: List[PoseRecord], scale: float, running: int = 0) -> str:
    """Per method: counts by status and, with ground truth, the metrics of ``ns-localize``'s metrics.json
    (:func:`~nerfstudio_gsloc.poses_file.summarize_records`, failures count with infinite error) in the formats
    of its printed table: rotation ``.4f`` degrees, translation ``.5f`` scene units, rates ``.1f`` %."""
    finished = [r for r in records if r.status != STATUS_RUNNING]
    methods = sorted({r.method for r in finished})
    lines: List[str] = []
    if running:
        lines += [f"**{len(finished)} of {len(finished) + running} queries done**, {running} running", ""]
    for method in methods:
        group = [r for r in finished if r.method == method]
        counts: Dict[str, int] = {}
        for record in group:
            counts[record.status] = counts.get(record.status, 0) + 1
        head = f"**{method}**, " if len(methods) > 1 else ""
        lines.append(f"{head}**{len(group)} queries**: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        summary = summarize_records(group, scale)
        if summary is not None:
            rates = " · ".join(
                f"({deg:g}°, {dist:g}) {100.0 * summary['success_rates'][threshold_key(deg, dist)]:.1f}%"
                for deg, dist in SUCCESS_THRESHOLDS
            )
            lines += [
                "",
                f"median error {summary['rot_deg_median']:.4f}° / {summary['trans_median']:.5f}, "
                f"mean {summary['rot_deg_mean']:.4f}° / {summary['trans_mean']:.5f} (scene units)",
                "",
                f"success {rates}",
            ]
        lines.append("")
    return "\n".join(lines).strip() or "no queries yet"


def details_markdown(record: PoseRecord, label: str, scale: float) -> str:
    """Everything poses.json says about one record, as a short markdown list."""
    rot, trans = record.errors(scale)
    lines = [f"**{short_name(record, label)}**: {record.status}"]
    if record.reason:
        lines.append(f"- {record.reason}")
    lines.append(f"- error {_number(rot, 4)}° / {_number(trans, 5)} (scene units)")
    inliers = "-" if record.inliers is None else str(record.inliers)
    lines.append(f"- {record.iterations} iterations, {inliers} inliers, {record.seconds:.2f} s")
    return "\n".join(lines)


def move_camera(camera: Any, wxyz: np.ndarray, position: np.ndarray, fov: Optional[float] = None) -> None:
    """Put a viser client's camera exactly at a frustum's pose (OpenCV axes), keeping its orbit distance.

    viser's ``wxyz`` setter keeps the old up direction (the roll may differ); setting look-at and up instead
    gives the pose itself, so the render matches the query image's framing. ``fov``: vertical, radians.
    """
    import viser.transforms as vtf

    rotation = vtf.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix()
    distance = float(np.linalg.norm(np.asarray(camera.look_at) - np.asarray(camera.position))) or 1.0
    camera.position = position
    camera.look_at = np.asarray(position) + rotation[:, 2] * distance  # OpenCV: +z looks forward
    camera.up_direction = -rotation[:, 1]  # ... and +y points down
    if fov is not None and math.isfinite(fov):
        camera.fov = fov


class LocalizationPanel:
    """The panel (see the module docstring) for the records of ``overlay``; :meth:`update` refreshes a record."""

    def __init__(self, server: Any, overlay: LocalizationOverlay, trajectory: bool = False,
                 title: str = "Localization") -> None:
        self.server = server
        self.overlay = overlay
        self.scale = overlay.frame.scale
        self.rows: Dict[str, Any] = {}
        self.order: Dict[str, float] = {}
        self.row_info: Dict[str, Tuple[str, str]] = {}  # (text, colour) of each row, by record label
        self.selected: Optional[str] = None
        self._lock = threading.RLock()
        gui = server.gui
        with gui.add_folder(title) as self.folder:
            self.summary = gui.add_markdown("")
            toggles = [("refined", "Refined poses"), ("initial", "Initial poses + paths"), ("gt", "Ground truth")]
            if trajectory:
                toggles.append(("trajectory", "Trajectory"))
            self.toggles = {}
            for kind, text in toggles:
                checkbox = gui.add_checkbox(text, initial_value=True)
                checkbox.on_update(lambda _, kind=kind, checkbox=checkbox: overlay.set_visible(kind, checkbox.value))
                self.toggles[kind] = checkbox
            self.details = gui.add_markdown(HINT)
        method = None
        for label, drawn in overlay.drawn.items():
            if overlay.several_methods and drawn.record.method != method:
                method = drawn.record.method
                with self.folder:
                    gui.add_markdown(f"**{method}**")
            self._add_row(label)  # (enters the folder itself: a folder handle cannot be entered twice)
        self._refresh_summary()

    # -- rows --------------------------------------------------------------------------------------------------

    def _add_row(self, label: str) -> None:
        record = self.overlay.drawn[label].record
        with self._lock, self.folder:
            old = self.rows.pop(label, None)
            if old is not None:
                old.remove()
            text, color = row_label(record, self.scale), ROW_COLORS.get(record.status, "red")
            hint = short_name(record, label) + f": {record.status}" + (f", {record.reason}" if record.reason else "")
            button = self.server.gui.add_button(text, color=color, order=self.order.get(label), hint=hint)
            self.order[label] = button.order
            button.on_click(lambda event, label=label: self.select(label, event.client))
            self.rows[label] = button
            self.row_info[label] = (text, color)

    def select(self, label: str, client: Any = None) -> None:
        """Show ``label``'s details and, given a viser client, move its camera to the query's refined pose."""
        drawn = self.overlay.drawn[label]
        self.selected = label
        self.details.content = details_markdown(drawn.record, label, self.scale)
        target = self.overlay.camera_target(label)
        if client is not None and target is not None:
            with client.atomic():
                move_camera(client.camera, *target)

    def _refresh_summary(self) -> None:
        records = self.overlay.records
        running = sum(r.status == STATUS_RUNNING for r in records)
        self.summary.content = summary_markdown(records, self.scale, running)

    def update(self, label: str) -> None:
        """Redraw the row and summary of a record the overlay has (re)drawn (e.g. a live query that finished)."""
        self._add_row(label)
        self._refresh_summary()
        if self.selected == label:
            self.details.content = details_markdown(self.overlay.drawn[label].record, label, self.scale)
