"""``ns-localize --sequence``: track the queries in order (:mod:`nerfstudio_gsloc.localize.sequence`) and save them.

Each finished frame is saved at once in poses.json and trace.csv (as every ns-localize run); at the end come
``trajectory.tum`` (and ``trajectory_gt.tum`` with ground truth), ``sequence.json`` and, with ground truth,
``sequence.png`` (:mod:`nerfstudio_gsloc.evaluation.sequence_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nerfstudio_gsloc.evaluation import sequence_report
from nerfstudio_gsloc.localize.initialization import InitialPose
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import pose_record
from nerfstudio_gsloc.localize.sequence import SequenceFrame, SequenceTracker
from nerfstudio_gsloc.scripts.localize_outputs import LocalizeOutputs

TUM_FILE = "trajectory.tum"


def track_and_save(tracker: SequenceTracker, method: str, queries: Sequence[Query], first: InitialPose,
                   outputs: LocalizeOutputs, console: Console) -> List[SequenceFrame]:
    """Track ``queries`` from ``first`` (frame 0's initial pose; ``None`` pose: retrieval), saving every frame."""
    outputs.start(False)
    console.print(f"tracking {len(queries)} frames with {method}: frame 0 from its {first.source} pose, then each "
                  "frame from the motion model; frames not confirmed by the verifier are re-localized")
    progress = Progress(TextColumn("[bold]tracking"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console, transient=False)

    def on_frame(position: int, frame: SequenceFrame) -> None:
        if position == 0:
            frame.result.seconds += first.seconds  # retrieval of the first start, if any
        outputs.add(pose_record(frame.result, queries[position], outputs.frame, method), frame.result.trace)
        progress.update(task, advance=1, description=f"{frame.event} {frame.result.seconds:.2f} s")

    with progress:
        task = progress.add_task("", total=len(queries))
        return tracker.track(queries, first.c2w, on_frame=on_frame)


def write_sequence_outputs(output_dir: Path, queries: Sequence[Query], frames: Sequence[SequenceFrame], method: str,
                           outputs: LocalizeOutputs, fps: float, notes: Dict[str, Any]) -> Dict[str, Any]:
    """trajectory.tum (+ trajectory_gt.tum), sequence.json and sequence.png; returns the method's summary."""
    est = sequence_report.stack_poses([None if f.result.skipped else f.result.c2w for f in frames])
    has_gt = all(q.gt_c2w is not None for q in queries)
    gt = sequence_report.stack_poses([q.gt_c2w for q in queries]) if has_gt else None
    sequence_report.write_trajectories(output_dir, TUM_FILE, est, gt, outputs.frame, fps)
    summary = sequence_report.sequence_summary(est, gt, [f.event for f in frames], [f.result.seconds for f in frames],
                                               [f.depth_aligned for f in frames])
    sequence_report.write_sequence_json(output_dir / sequence_report.SEQUENCE_JSON, {method: summary}, notes)
    if gt is not None:
        sequence_report.plot_sequence(output_dir / sequence_report.SEQUENCE_PNG, {method: est}, gt, {method: summary},
                                      title=f"{method}: {len(frames)} frames")
    return summary


def sequence_table(method: str, summary: Dict[str, Any]) -> Table:
    """The printed trajectory table."""
    table = Table(title=f"Sequence of {summary['num_frames']} frames ({method}; scene units, ATE not aligned)")
    for _, header, _ in sequence_report.TABLE_COLUMNS:
        table.add_column(header, justify="right")
    table.add_row(*sequence_report.table_cells(summary))
    return table
