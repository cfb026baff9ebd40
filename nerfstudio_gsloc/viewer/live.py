"""``ns-localize --viewer``: the run in nerfstudio's viewer with every query's frustum moving while it is optimised.

Before the optimisation each query is drawn at its initial pose (status ``running``, cyan; the queries a
``--resume`` skips are drawn finished). The localizer's ``on_poses`` observer (throttled, see
:mod:`nerfstudio_gsloc.localize.live`) moves the refined frustums and extends their paths; ``on_result`` redraws a
query in its final status colour with its thumbnail and fills in its row and the panel's summary. The drawing is
:mod:`nerfstudio_gsloc.viewer.overlay` and :mod:`nerfstudio_gsloc.viewer.panel`, as for ``gsloc-view``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.poses_file import PoseRecord, QuerySource, pose_to_original
from nerfstudio_gsloc.viewer.overlay import STATUS_RUNNING, LocalizationOverlay
from nerfstudio_gsloc.viewer.panel import LocalizationPanel
from nerfstudio_gsloc.viewer.server import (
    checkpoint_step,
    query_shapes,
    start_nerfstudio_viewer,
    stop_viewer,
    training_shape,
)


def running_record(query: Query, start_c2w: Tensor, frame: FrameTransform, method: str) -> PoseRecord:
    """The record drawn for a query that is being optimised: at its ``[3, 4]`` scene-frame start pose."""
    start = pose_to_original(frame, start_c2w[:3, :4])
    return PoseRecord(
        image=query.name, status=STATUS_RUNNING, c2w=start, c2w_init=start, c2w_gt=pose_to_original(frame, query.gt_c2w),
        image_path=Path(query.image_path), index=query.index, method=method,
    )


class LiveView:
    """The overlay and panel of one ``ns-localize`` run, fed by the localizer's callbacks.

    Args:
        viewer_state: nerfstudio's ``Viewer`` (its ``viser_server`` is drawn on).
        overlay: an empty :class:`LocalizationOverlay` on that server.
    """

    def __init__(self, viewer_state: Any, overlay: LocalizationOverlay) -> None:
        self.viewer_state = viewer_state
        self.overlay = overlay
        self.panel: Optional[LocalizationPanel] = None
        self.labels: Dict[int, str] = {}

    def begin(self, finished: Iterable[PoseRecord], queries: Sequence[Query], starts: Sequence[Tensor], method: str) -> None:
        """Draw the already finished records and every query to localize at its start pose, then the panel."""
        for record in finished:
            self.overlay.draw(record)
        for position, (query, start) in enumerate(zip(queries, starts)):
            self.labels[position] = self.overlay.draw(running_record(query, start, self.overlay.frame, method))
        self.panel = LocalizationPanel(self.overlay.server, self.overlay)

    def on_poses(self, poses: Dict[int, Tensor]) -> None:
        """The localizer's ``on_poses``: move the frustums of the queries being optimised (scene-frame ``[3, 4]``)."""
        for position, c2w in poses.items():
            self.overlay.move(self.labels[position], c2w)

    def on_result(self, position: int, record: PoseRecord) -> None:
        """A query finished: redraw it in its status colour and update its row and the summary."""
        label = self.overlay.draw(record)
        if self.panel is not None:
            self.panel.update(label)

    def stop(self) -> None:
        stop_viewer(self.viewer_state)


def start_live_view(run_config: Any, pipeline: Any, checkpoint_dir: Path, frame: FrameTransform,
                    source: Optional[QuerySource], port: Optional[int] = None, host: Optional[str] = None) -> LiveView:
    """Start nerfstudio's viewer on the loaded run (as ``gsloc-view`` does) with an empty overlay."""
    viewer_state = start_nerfstudio_viewer(run_config, pipeline, port, checkpoint_step(checkpoint_dir), host)
    overlay = LocalizationOverlay(
        viewer_state.viser_server, frame, shapes=query_shapes(pipeline, source), default_shape=training_shape(pipeline),
        frustum_scale=run_config.viewer.camera_frustum_scale,
    )
    return LiveView(viewer_state, overlay)
