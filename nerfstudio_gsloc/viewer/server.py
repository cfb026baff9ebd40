"""Start nerfstudio's viewer on a loaded run (as ``ns-viewer`` does) and find the queries' frustum shapes.

Shared by ``gsloc-view`` (finished results) and ``ns-localize --viewer`` (live results).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from threading import Lock
from typing import Any, Dict, Optional

from nerfstudio_gsloc.poses_file import QuerySource
from nerfstudio_gsloc.viewer.overlay import FrustumShape


def query_shapes(pipeline: Any, source: Optional[QuerySource]) -> Dict[str, FrustumShape]:
    """Frustum shapes of the queries by name, from the eval split or the query transforms.json (best effort).

    Queries whose intrinsics cannot be found are left out (they get the training cameras' shape).
    """
    shapes: Dict[str, FrustumShape] = {}
    if source is None:
        return shapes
    if source.is_eval_split:
        dataset = getattr(pipeline.datamanager, "eval_dataset", None)
        if dataset is not None:
            cams = dataset.cameras
            for i, name in enumerate(dataset._dataparser_outputs.image_filenames):
                shapes[str(name)] = FrustumShape.from_intrinsics(
                    float(cams.fx[i]), float(cams.cx[i]), float(cams.cy[i]), float(cams.fy[i])
                )
        return shapes
    try:
        meta = json.loads(Path(str(source.path)).read_text())
        for frame in meta["frames"]:
            value = {k: frame.get(k, meta.get(k)) for k in ("fl_x", "cx", "cy")}
            if all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
                fy = frame.get("fl_y", meta.get("fl_y"))
                fy = fy if isinstance(fy, (int, float)) and fy > 0 else None
                shapes[str(frame["file_path"])] = FrustumShape.from_intrinsics(value["fl_x"], value["cx"], value["cy"], fy)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return shapes


def training_shape(pipeline: Any) -> FrustumShape:
    """The first training camera's frustum shape (the default for queries without intrinsics)."""
    train = pipeline.datamanager.train_dataset.cameras
    return FrustumShape.from_intrinsics(float(train.fx[0]), float(train.cx[0]), float(train.cy[0]), float(train.fy[0]))


def checkpoint_step(checkpoint_dir: Path) -> int:
    """The newest ``step-<N>.ckpt`` step (shown by the viewer; 0 when the names do not say)."""
    steps = [int(p.stem[5:]) for p in Path(checkpoint_dir).glob("step-*.ckpt") if p.stem[5:].isdigit()]
    return max(steps, default=0)


def start_nerfstudio_viewer(config: Any, pipeline: Any, port: Optional[int], step: int, host: Optional[str] = None) -> Any:
    """nerfstudio's ``ns-viewer`` start-up (``run_viewer._start_viewer`` without its endless loop).

    Args:
        config: the run's loaded ``TrainerConfig``; pipeline: its loaded pipeline.
        port: websocket port (``None``: 7007 or the next free one, as ns-viewer).
        step: the training step the viewer shows.
        host: interface to listen on (``None``: nerfstudio's default, 0.0.0.0).

    Returns:
        nerfstudio's ``Viewer`` (``.viser_server`` is the viser server; ``.viewer_info`` its URL line).
    """
    from nerfstudio.utils import writer
    from nerfstudio.viewer.viewer import Viewer

    config.vis = "viewer"
    if port is not None:
        config.viewer.websocket_port = port
    if host is not None:
        config.viewer.websocket_host = host
    viewer_state = Viewer(
        config.viewer,
        log_filename=config.get_base_dir() / config.viewer.relative_log_filename,
        datapath=pipeline.datamanager.get_datapath(),
        pipeline=pipeline,
        share=config.viewer.make_share_url,
        train_lock=Lock(),
    )
    # No logging, but writer.GLOBAL_BUFFER must be populated (as in ns-viewer).
    config.logging.local_writer.enable = False
    writer.setup_local_writer(config.logging, max_iter=config.max_num_iterations, banner_messages=viewer_state.viewer_info)
    viewer_state.init_scene(
        train_dataset=pipeline.datamanager.train_dataset,
        train_state="completed",
        eval_dataset=pipeline.datamanager.eval_dataset,
    )
    viewer_state.update_scene(step=step)
    return viewer_state


def serve_until_interrupted(viewer_state: Any, console: Any, message: str) -> None:
    """Print ``message`` with the viewer's URL and how to quit; keep serving until Ctrl-C, then stop cleanly."""
    for line in viewer_state.viewer_info:
        console.print(line)
    console.print(f"{message}; press Ctrl-C to quit")
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop_viewer(viewer_state)


def stop_viewer(viewer_state: Any) -> None:
    """Stop the render threads (:func:`stop_render_threads`), then the viewer's server."""
    stop_render_threads()
    viewer_state.viser_server.stop()


def stop_render_threads(timeout: float = 10.0) -> None:
    """Stop nerfstudio's render threads (one per browser tab, daemon threads) and wait for their current render.

    A daemon thread still inside torch when the interpreter exits can abort the process (SIGABRT after Ctrl-C, seen
    once in the browser test); a stopped thread leaves its loop after the render it is in.
    """
    from nerfstudio.viewer.render_state_machine import RenderStateMachine

    threads = [t for t in threading.enumerate() if isinstance(t, RenderStateMachine)]
    for thread in threads:
        thread.running = False
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
