"""What drawing live costs: one localization without and one with ``ns-localize --viewer``'s live drawing.

Usage (a trained run; its eval split, 10 deg / 0.1 units perturbations, the default gsloc schedule)::

    python scripts/bench_live_viewer.py --load-config outputs/.../config.yml [--max-queries 6]

Prints the wall time of both runs, the number of ``on_poses`` calls and the time they took (reading the poses
and drawing them into a viser server, no browser connected), as a share of the run.
"""

from __future__ import annotations

import argparse
import socket
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-config", required=True)
    parser.add_argument("--max-queries", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import viser

    from nerfstudio_gsloc.localize import optimizer as optimizer_module
    from nerfstudio_gsloc.localize.initialization import initial_poses
    from nerfstudio_gsloc.localize.live import PosesThrottle
    from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig
    from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
    from nerfstudio_gsloc.localize.queries import load_eval_queries
    from nerfstudio_gsloc.runs import load_run
    from nerfstudio_gsloc.viewer.live import LiveView
    from nerfstudio_gsloc.viewer.overlay import LocalizationOverlay

    _, pipeline = load_run(args.load_config)
    frame = run_frame_transform(args.load_config)
    queries = load_eval_queries(pipeline, args.max_queries)
    starts = initial_poses(queries, "perturb", 10.0, 0.1, 0)

    started = time.perf_counter()
    PoseInversionConfig().setup(model=pipeline.model, pipeline=pipeline).localize(queries, starts)
    plain = time.perf_counter() - started

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)
    live = LiveView(type("State", (), {"viser_server": server})(), LocalizationOverlay(server, frame))
    live.begin([], queries, starts, "gsloc")
    throttles = []

    def throttle() -> PosesThrottle:
        throttles.append(PosesThrottle())
        return throttles[-1]

    optimizer_module.PosesThrottle = throttle  # keep the instance to read its accounting
    started = time.perf_counter()
    PoseInversionConfig().setup(model=pipeline.model, pipeline=pipeline).localize(queries, starts, on_poses=live.on_poses)
    watched = time.perf_counter() - started
    server.stop()
    spent, calls = throttles[0].seconds, throttles[0].calls
    print(f"{len(queries)} queries: {plain:.1f} s without drawing, {watched:.1f} s with live drawing; "
          f"{calls} on_poses calls took {spent:.3f} s = {100.0 * spent / watched:.2f} % of the run")


if __name__ == "__main__":
    main()
