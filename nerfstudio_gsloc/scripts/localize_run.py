"""ns-localize's work on single queries: localize them (in this process or on Ray workers) with a progress bar,
saving each query as it finishes (the counterpart of :func:`~nerfstudio_gsloc.scripts.localize_sequence.track_and_save`
for ``--sequence``)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nerfstudio_gsloc.localize.initialization import localize_from_initial_poses
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.registry import LocalizerSettings
from nerfstudio_gsloc.localize.result import LocalizationResult, pose_record
from nerfstudio_gsloc.scripts.localize_outputs import LocalizeOutputs


def ray_pool(address: Optional[str], workers: Optional[int], threads: Optional[int], load_config: Path, seed: int,
             method: str, settings: LocalizerSettings, todo: Sequence[Query]):
    """The Ray workers of ``--ray`` (a context manager), or a null context without it (``address`` None) or work."""
    if address is None or not todo:
        return contextlib.nullcontext()
    from nerfstudio_gsloc.evaluation.ray_runner import RayPool

    return RayPool(address, workers, threads, load_config, {method: settings}, settings, seed)


def localize_and_save(localizer, method: str, todo: Sequence[Query], starts, outputs: LocalizeOutputs, resume: bool,
                      num_previous: int, init: str, console: Console, live=None, pool=None) -> float:
    """Run the localizer on ``todo`` with a progress bar, saving each query as it finishes (and drawing it in the
    live viewer ``live`` when given); on the Ray workers of ``pool`` when given. Returns the seconds."""
    outputs.start(resume)
    console.print(
        f"localizing {len(todo)} queries ({num_previous} already done) with {method} from {init} poses"
        + (f", at most {localizer.max_iterations} iterations each" if localizer.max_iterations else "")
    )
    progress = Progress(
        TextColumn("[bold]localizing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=console, transient=False,
    )
    steps = {"count": 0}

    def on_step(active: int) -> None:
        steps["count"] += 1
        progress.update(task, description=f"iteration {steps['count']}, {active} active")

    def on_result(position: int, result: LocalizationResult) -> None:
        record = pose_record(result, todo[position], outputs.frame, method)
        outputs.add(record, result.trace)
        if live is not None:
            live.on_result(position, record)
        progress.advance(task)

    started = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("", total=len(todo))
            # Without --viewer the call is exactly as before (no observer).
            watch = {} if live is None else {"on_poses": live.on_poses}
            if pool is None:
                localize_from_initial_poses(localizer, todo, starts, on_result=on_result, on_step=on_step, **watch)
            else:
                progress.update(task, description=pool.header().split(" on ")[0])
                pool.localize(localizer, method, todo, starts, on_result=on_result)
    except KeyboardInterrupt:
        if live is not None:
            live.stop()
        raise
    return time.perf_counter() - started
