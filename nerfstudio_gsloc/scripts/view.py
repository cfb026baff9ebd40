"""`gsloc-view`: nerfstudio's viewer on a trained run, with the localization results of ``ns-localize`` on top.

Example::

    gsloc-view --load-config outputs/scene/gsloc/<ts>/config.yml --poses outputs/loc/poses.json --port 7007
    gsloc-view --load-config ... --poses outputs/bench/poses.json            # gsloc-bench: every method and trial
    gsloc-view --load-config ... --poses outputs/seq/poses.json --trajectory # a sequence: a line through its frames

The model is served exactly as ``ns-viewer`` serves it (nerfstudio's ``Viewer``); then every record of
``poses.json`` is drawn under ``/localization/`` (see :mod:`nerfstudio_gsloc.viewer.overlay`) with the
"Localization" panel (:mod:`nerfstudio_gsloc.viewer.panel`: summary, toggles, one row per query; clicking a row
moves the camera to that query's refined pose). Runs until Ctrl-C. Bad inputs (poses.json, config, a poses.json of
another run) are reported as one ``error:`` line before the viewer starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import tyro
from rich.console import Console

from nerfstudio_gsloc.errors import GslocError, run_cli
from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
from nerfstudio_gsloc.poses_file import read_poses
from nerfstudio_gsloc.viewer.overlay import LocalizationOverlay, add_localization_overlay, check_same_frame
from nerfstudio_gsloc.viewer.server import (
    checkpoint_step,
    query_shapes,
    serve_until_interrupted,
    start_nerfstudio_viewer,
    training_shape,
)

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
    host: Optional[str] = None
    """Interface the viewer listens on (default: nerfstudio's, 0.0.0.0; 127.0.0.1 keeps it local)."""
    thumbnails: bool = True
    """Show each query image on its refined frustum."""
    trajectory: bool = False
    """Also draw a line through the refined camera centres in query order (sequences), per method and trial."""

    def main(self) -> None:
        """Validate the inputs, load the run, start the viewer, draw the overlay, wait for Ctrl-C."""
        view_main(self)


def serve(cli: ViewCLI) -> Tuple[Any, LocalizationOverlay]:
    """Check the inputs (raising :class:`GslocError` before the viewer starts), load the run, start the viewer and
    draw the overlay; returns nerfstudio's ``Viewer`` and the overlay (the server runs in its own threads)."""
    from nerfstudio_gsloc.runs import check_run, load_run

    poses = read_poses(cli.poses)
    if cli.port is not None and not 0 < cli.port < 65536:
        raise GslocError(f"--port must be between 1 and 65535, got {cli.port}")
    checkpoint_dir = check_run(cli.load_config)
    frame = run_frame_transform(cli.load_config)
    check_same_frame(frame, poses.frame, cli.poses)

    with CONSOLE.status("loading the run"):
        config, pipeline = load_run(cli.load_config)
    viewer_state = start_nerfstudio_viewer(config, pipeline, cli.port, checkpoint_step(checkpoint_dir), cli.host)
    overlay = add_localization_overlay(
        viewer_state.viser_server,
        poses,
        frame,
        shapes=query_shapes(pipeline, poses.queries),
        default_shape=training_shape(pipeline),
        frustum_scale=config.viewer.camera_frustum_scale,
        thumbnails=cli.thumbnails,
        trajectory=cli.trajectory,
    )
    return viewer_state, overlay


def view_main(cli: ViewCLI) -> None:
    """The body of ``gsloc-view`` (raises :class:`GslocError` for bad input, before the viewer starts)."""
    viewer_state, overlay = serve(cli)
    failed = sum(r.failed for r in overlay.records)
    message = f"showing {len(overlay.records)} localized queries ({failed} failed) under /localization"
    serve_until_interrupted(viewer_state, CONSOLE, message)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run."""
    tyro.cli(ViewCLI, args=argv).main()


def entrypoint() -> None:
    """Console script ``gsloc-view``."""
    run_cli(main)


if __name__ == "__main__":
    entrypoint()
