"""What saving results costs the driver of a long run: ns-localize's outputs per finished query, as they are now
(a journal line each, poses.json and trace.csv rewritten every few seconds) against rewriting poses.json and
trace.csv after every query (what they did before; the README's "Throughput model" has both).

Usage: .venv/bin/python scripts/bench_driver_writes.py [queries, default 1000] [output folder, default
    outputs/bench-driver-writes]

Records come back to back (no compute between them: the driver's cost alone); each has 30 trace rows, as a gsloc
query's. Prints, per way of saving, the seconds spent saving, and the time per result on average and over the
last 100 results (constant for the journal, growing with the results so far for full rewrites).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.files import RewriteThrottle
from nerfstudio_gsloc.poses_file import PoseRecord, QuerySource, read_poses
from nerfstudio_gsloc.scripts import localize_outputs
from nerfstudio_gsloc.scripts.localize_outputs import LocalizeOutputs


class EveryTime(RewriteThrottle):
    """The former behaviour: poses.json and trace.csv rewritten after every result."""

    def due(self) -> bool:
        return True


def record(i: int) -> PoseRecord:
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 3] = torch.tensor([0.1 * i, 0.2, 0.3], dtype=torch.float64)
    return PoseRecord(image=f"frame_{i:06d}.png", status="converged", c2w=pose, c2w_init=pose.clone(),
                      c2w_gt=pose.clone(), image_path=Path(f"images/frame_{i:06d}.png"), index=i, confidence=0.9,
                      loss=0.01, iterations=30, inliers=200, seconds=5.4)


def trace(i: int):
    return [{"query": f"frame_{i:06d}.png", "index": i, "iteration": k, "loss": 0.01, "rot_err_deg": 0.1,
             "trans_err": 0.001} for k in range(30)]


def run(folder: Path, queries: int, throttle) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    localize_outputs.RewriteThrottle = throttle
    outputs = LocalizeOutputs(folder, QuerySource.eval_split(), {"method": "gsloc"}, FrameTransform.identity(), {},
                              total=queries)
    outputs.start(resume=False)
    saving, last = 0.0, []
    for i in range(queries):
        t0 = time.perf_counter()
        outputs.add(record(i), trace(i))
        cost = time.perf_counter() - t0
        saving += cost
        last = (last + [cost])[-100:]
    t0 = time.perf_counter()
    outputs.flush()
    saving += time.perf_counter() - t0
    assert len(read_poses(folder / "poses.json").records) == queries
    return {"saving": saving, "mean_ms": 1000 * saving / queries, "last_ms": 1000 * sum(last) / len(last)}


def main() -> None:
    queries = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("outputs/bench-driver-writes")
    print(f"saving {queries} ns-localize results one after the other")
    for name, throttle in (("journal + rewrite when due (now)", RewriteThrottle), ("rewrite per result (before)", EveryTime)):
        r = run(out / name.split()[0], queries, throttle)
        print(f"{name}: {r['saving']:.1f} s saving, {r['mean_ms']:.2f} ms per result on average, "
              f"{r['last_ms']:.2f} ms per result over the last 100")


if __name__ == "__main__":
    main()
