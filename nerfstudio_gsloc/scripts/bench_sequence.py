"""``gsloc-bench --protocol sequence``: every method tracks the same sequence frame by frame.

Each method runs through :class:`~nerfstudio_gsloc.localize.sequence.SequenceTracker` (its per-frame localizer with
the short tracking schedule, its full schedule to re-localize; one verifier for all), from the same start of frame 0
(the protocol's perturbation of its ground truth). Outputs in ``--output-dir``:

* ``results.md``: the trajectory table (ATE RMSE without alignment, rotation RMSE, RPE, lost / re-localized frames,
  seconds per frame), the run, the machine and the command;
* ``sequence.json``, ``sequence.png``, ``trajectory_<method>.tum``, ``trajectory_gt.tum``
  (:mod:`nerfstudio_gsloc.evaluation.sequence_report`);
* ``poses.json`` with every method's frames (``gsloc-view`` shows the tracks), and ``bench.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.evaluation import sequence_report
from nerfstudio_gsloc.evaluation.protocols import Protocol
from nerfstudio_gsloc.evaluation.trials import Trial
from nerfstudio_gsloc.files import atomic_write_text
from nerfstudio_gsloc.localize.pipeline import load_preset
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.registry import LOCALIZERS, LocalizerSettings, make_verifier
from nerfstudio_gsloc.localize.result import pose_record
from nerfstudio_gsloc.localize.sequence import SequenceConfig, SequenceFrame, choose_sequence_preset, make_sequence_tracker
from nerfstudio_gsloc.poses_file import PosesDocument, QuerySource, write_poses

POSES_FILE = "poses.json"


def run_sequence_benchmark(settings: LocalizerSettings, sequence_preset: str, methods: Sequence[str], protocol: Protocol,
                           pipeline: Any, queries: Sequence[Query], first: Trial, frame: FrameTransform,
                           source: QuerySource, output_dir: Path, meta: Dict[str, Any],
                           console: Console, config: Optional[SequenceConfig] = None) -> Dict[str, Dict[str, Any]]:
    """Track ``queries`` with every method (tracker settings ``config``) and write the outputs; returns the
    per-method summaries."""
    config = config if config is not None else SequenceConfig()
    verifier = make_verifier(settings, pipeline.model, pipeline)
    estimates, summaries, records = {}, {}, []
    gt = sequence_report.stack_poses([q.gt_c2w for q in queries])
    console.print(f"sequence of {len(queries)} frames; frame 0 starts {first.init_rot_deg:.2f} deg and "
                  f"{first.init_trans:.4f} scene units from its ground truth, every method from the same pose")
    presets = {}
    for method in methods:
        presets[method], why = choose_sequence_preset(sequence_preset, method, queries, pipeline, settings.gsloc)
        console.print(f"{method}: per-frame schedule {presets[method]} ({why})")
        tracking = load_preset(presets[method], base=settings.gsloc)
        tracker = make_sequence_tracker(method, settings, tracking, pipeline.model, pipeline, seed=0, config=config,
                                        verifier=verifier)
        started = time.perf_counter()

        def on_frame(position: int, done: SequenceFrame, method=method) -> None:
            if position % 25 == 0 or done.event != "tracked":
                console.print(f"{method} frame {position}/{len(queries)}: {done.event} {done.result.seconds:.2f} s")

        frames = tracker.track(queries, first.c2w_init, on_frame=on_frame)
        meta.setdefault("method_seconds", {})[method] = time.perf_counter() - started
        est = sequence_report.stack_poses([None if f.result.skipped else f.result.c2w for f in frames])
        estimates[method] = est
        summaries[method] = sequence_report.sequence_summary(est, gt, [f.event for f in frames],
                                                             [f.result.seconds for f in frames],
                                                             [f.depth_aligned for f in frames])
        records += [pose_record(f.result, q, frame, method, trial=0) for f, q in zip(frames, queries)
                    if not f.result.skipped]
        sequence_report.write_trajectories(output_dir, f"trajectory_{method}.tum", est, gt, frame, config.fps)
        write_poses(output_dir / POSES_FILE, PosesDocument(frame=frame, queries=source, records=list(records),
                                                           settings={"protocol": protocol.name,
                                                                     "command": meta["command"]}))
        console.print(f"{method}: " + ", ".join(f"{k} {summaries[method][k]:.4g}" for k, _, _ in
                                                sequence_report.TABLE_COLUMNS))
    notes = {"protocol": protocol.to_dict(), "command": meta["command"], "sequence_preset": presets,
             "units": "scene units; ATE without alignment (the poses are estimated in the scene's own frame)"}
    sequence_report.write_sequence_json(output_dir / sequence_report.SEQUENCE_JSON, summaries, notes)
    sequence_report.plot_sequence(output_dir / sequence_report.SEQUENCE_PNG, estimates, gt, summaries,
                                  title=f"{len(queries)} frames, {meta['protocol_summary']}")
    write_results_md(output_dir, summaries, meta, presets)
    atomic_write_text(output_dir / "bench.json", json.dumps(meta, indent=2, default=str))
    return summaries


def write_results_md(output_dir: Path, summaries: Dict[str, Dict[str, Any]], meta: Dict[str, Any],
                     presets: Dict[str, str]) -> None:
    lines: List[str] = [
        "# Sequence benchmark: tracking frame by frame",
        "",
        f"- run: `{meta['load_config']}`",
        f"- queries: {QuerySource.from_json(meta['queries']).describe()} ({meta['num_queries']} frames, in file order)",
        f"- protocol: {meta['protocol_summary']}",
        "- per-frame schedule: " + ", ".join(f"`{preset}` preset for {method}" for method, preset in presets.items())
        + "; first frame and re-localizations: the method's full schedule",
        f"- {meta['machine_line']}",
        "",
        *sequence_report.markdown_table(summaries),
        "",
        "Scene units. ATE RMSE: camera centres, **no alignment** (the poses are estimated in the scene's own frame, "
        "the frame of the ground truth). RPE: consecutive frames. Lost: no confident pose after re-localization. "
        "Seconds: wall clock per frame, everything included (tracking, verification, re-localization).",
        "",
        "Methods:",
        "",
        *[f"- `{m}`: {LOCALIZERS[m]}" for m in summaries],
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    atomic_write_text(output_dir / "results.md", "\n".join(lines))
