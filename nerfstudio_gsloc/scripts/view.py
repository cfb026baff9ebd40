"""`gsloc-view`: nerfstudio's viewer on a trained run, with the localization results of ``ns-localize`` on top.

Example::

    gsloc-view --load-config outputs/scene/gsloc/<ts>/config.yml --poses outputs/loc/poses.json --port 7007

The model is served exactly as ``ns-viewer`` serves it (nerfstudio's ``Viewer``); then every query of
``poses.json`` is drawn under ``/localization/<image>`` (see :mod:`nerfstudio_gsloc.viewer.overlay`) with a
"Localization" GUI folder listing the errors. Runs until Ctrl-C. Bad inputs (poses.json, config, a poses.json of
another run) are reported as one ``error:`` line before the viewer starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any, Dict, Optional, Sequence

import tyro
from rich.console import Console

from nerfstudio_gsloc.errors import GslocError, run_cli
from nerfstudio_gsloc.localize.queries import run_frame_transform
from nerfstudio_gsloc.poses_file import QuerySource, read_poses
from nerfstudio_gsloc.viewer.overlay import FrustumShape, add_localization_overlay, check_same_frame

CONSOLE = Console()


@dataclass
class ViewCLI:
    """Show a trained run in nerfstudio's viewer with ns-localize's poses (refined, initial, ground truth)."""

    load_config: Path
    """The run's config.yml (the one ns-localize used)."""
    poses: Path
    """The poses.json written by ns-localize or gsloc-bench."""
    port: Optional[int] = None
    """Websocket port of the viewer (default: 7007, or the next free port, like ns-viewer)."""
    thumbnails: bool = True
    """Show each query image on its refined frustum."""

    def main(self) -> None:
        """Validate the inputs, load the run, start the viewer, draw the overlay, wait for Ctrl-C."""
        view_main(self)

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
                shapes[str(name)] = FrustumShape.from_intrinsics(float(cams.fx[i]), float(cams.cx[i]), float(cams.cy[i]))
        return shapes
    try:
        meta = json.loads(Path(str(source.path)).read_text())
        for frame in meta["frames"]:
            value = {k: frame.get(k, meta.get(k)) for k in ("fl_x", "cx", "cy")}
            if all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
                shapes[str(frame["file_path"])] = FrustumShape.from_intrinsics(value["fl_x"], value["cx"], value["cy"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return shapes


def _checkpoint_step(checkpoint_dir: Path) -> int:
    """The newest ``step-<N>.ckpt`` step (shown by the viewer; 0 when the names do not say)."""
    steps = [int(p.stem[5:]) for p in checkpoint_dir.glob("step-*.ckpt") if p.stem[5:].isdigit()]
    return max(steps, default=0)


def _start_nerfstudio_viewer(config: Any, pipeline: Any, port: Optional[int], step: int) -> Any:
    """nerfstudio's ``ns-viewer`` start-up (``run_viewer._start_viewer`` without its endless loop)."""
    from nerfstudio.utils import writer
    from nerfstudio.viewer.viewer import Viewer

    config.vis = "viewer"
    if port is not None:
        config.viewer.websocket_port = port
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


def view_main(cli: ViewCLI) -> None:
    """The body of ``gsloc-view`` (raises :class:`GslocError` for bad input, before the viewer starts)."""
    from nerfstudio_gsloc.runs import check_run, load_run

    poses = read_poses(cli.poses)
    if cli.port is not None and not 0 < cli.port < 65536:
        raise GslocError(f"--port must be between 1 and 65535, got {cli.port}")
    checkpoint_dir = check_run(cli.load_config)
    frame = run_frame_transform(cli.load_config)
    check_same_frame(frame, poses.frame, cli.poses)

    with CONSOLE.status("loading the run"):
        config, pipeline = load_run(cli.load_config)
    viewer_state = _start_nerfstudio_viewer(config, pipeline, cli.port, _checkpoint_step(checkpoint_dir))
    train = pipeline.datamanager.train_dataset.cameras
    default_shape = FrustumShape.from_intrinsics(float(train.fx[0]), float(train.cx[0]), float(train.cy[0]))
    add_localization_overlay(
        viewer_state.viser_server,
        poses,
        frame,
        shapes=query_shapes(pipeline, poses.queries),
        default_shape=default_shape,
        frustum_scale=config.viewer.camera_frustum_scale,
        thumbnails=cli.thumbnails,
    )
    failed = sum(r.failed for r in poses.records)
    CONSOLE.print(f"showing {len(poses.records)} localized queries ({failed} failed) under /localization; Ctrl-C to stop")
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        viewer_state.viser_server.stop()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run."""
    tyro.cli(ViewCLI, args=argv).main()


def entrypoint() -> None:
    """Console script ``gsloc-view``."""
    run_cli(main)


if __name__ == "__main__":
    entrypoint()
