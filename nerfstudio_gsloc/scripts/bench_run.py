"""gsloc-bench's run loop: load the run, draw the seeded trials, run every method on them (in this process or on
the Ray workers) and save as trials finish: a ``trials.jsonl`` line per trial at once, ``poses.json`` every few
seconds, the summaries (:mod:`nerfstudio_gsloc.scripts.bench_outputs`) at the end. ``--protocol sequence`` goes to
:mod:`nerfstudio_gsloc.scripts.bench_sequence`.

Every method gets the same trials: the same seeded ``[3, 4]`` camera-to-world initial poses (scene frame) or, with
no prior, the same retrieval / regression starts; errors are in degrees and scene units. The checks and inputs
before the loop are :mod:`nerfstudio_gsloc.scripts.bench_setup`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.errors import GslocError, Interrupted, count
from nerfstudio_gsloc.evaluation import report
from nerfstudio_gsloc.evaluation.protocols import Protocol
from nerfstudio_gsloc.evaluation.trials import generate_trials
from nerfstudio_gsloc.files import OutputError, RewriteThrottle, append_line
from nerfstudio_gsloc.localize.initialization import InitialPose, localize_from_initial_poses
from nerfstudio_gsloc.localize.scene_map import camera_distance_scale, training_camera_poses
from nerfstudio_gsloc.localize.registry import SELF_INITIALIZING, make_localizer, make_verifier
from nerfstudio_gsloc.localize.regression import regression_initial_poses
from nerfstudio_gsloc.localize.regressor_files import load_run_regressor
from nerfstudio_gsloc.localize.result import LocalizationResult, pose_record
from nerfstudio_gsloc.poses_file import PoseRecord, PosesDocument, QuerySource, write_poses
from nerfstudio_gsloc.scripts.bench_outputs import (
    CONSOLE,
    SAME_POSES_NOTE,
    print_results,
    trial_records,
    write_summaries,
)
from nerfstudio_gsloc.scripts.bench_setup import load_queries, method_settings, retrieval_starts

if TYPE_CHECKING:  # the CLI imports this module
    from nerfstudio_gsloc.scripts.bench import BenchCLI

POSES_FILE = "poses.json"


def run_benchmark(cli: BenchCLI, argv: Optional[Sequence[str]], methods: List[str], protocol: Protocol,
                  frame: FrameTransform, pool) -> List[Dict[str, Any]]:
    """Load the run, draw the trials, run every method (on the Ray workers of ``pool`` when given), save."""
    from nerfstudio_gsloc.runs import load_run

    with CONSOLE.status("loading the run"):
        _, pipeline = load_run(cli.load_config)
    queries = load_queries(cli, pipeline, frame)
    camera_scale = camera_distance_scale(training_camera_poses(pipeline))
    trials = generate_trials(protocol, queries, camera_scale)
    model = pipeline.model
    device = model.means.device
    info = report.machine_info(device)
    sizes = sorted({(q.width, q.height) for q in queries})
    machine_line = report.machine_line(info, sizes)
    output_dir = Path(cli.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    CONSOLE.print(f"protocol {protocol.summary(camera_scale)}")
    CONSOLE.print(f"camera-distance scale {camera_scale:.4g} scene units (median distance of training cameras to the origin)")
    CONSOLE.print(f"{len(queries)} queries x {protocol.trials_per_query} trials = {len(trials)} trials per method; {SAME_POSES_NOTE}")
    CONSOLE.print(machine_line)
    if "icomma" in methods and cli.method_settings.icomma.loftr_weights_path is None:
        CONSOLE.print("icomma: kornia's differentiable SIFT stands in for LoFTR (LoFTR weights cannot be downloaded here)")

    meta: Dict[str, Any] = {
        "load_config": str(cli.load_config),
        "trained_from": None if cli.data is None else {"data": str(cli.data), "train_preset": cli.train_preset},
        "queries": (QuerySource.eval_split() if cli.queries is None else QuerySource.transforms(cli.queries)).to_json(),
        "num_queries": len(queries),
        "methods": methods,
        "protocol": protocol.to_dict(),
        "protocol_summary": protocol.summary(camera_scale),
        "camera_scale": camera_scale,
        "machine": info,
        "machine_line": machine_line,
        "image_sizes": [list(s) for s in sizes],
        "method_settings": dataclasses.asdict(cli.method_settings),
        "confidence_threshold": cli.method_settings.verification.threshold if cli.method_settings.verification.enabled else None,
        "command": "gsloc-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if protocol.is_sequence:  # frames tracked in order; trajectory metrics instead of per-trial ones
        from nerfstudio_gsloc.scripts.bench_sequence import run_sequence_benchmark

        source = QuerySource.eval_split() if cli.queries is None else QuerySource.transforms(cli.queries)
        run_sequence_benchmark(cli.method_settings, cli.sequence_preset, methods, protocol, pipeline, queries, trials[0],
                               frame, source, output_dir, meta, CONSOLE, cli.sequence_settings)
        CONSOLE.print(f"results in {output_dir}")
        return []
    progress = Progress(
        TextColumn("[bold]{task.fields[method]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=CONSOLE, transient=False,
    )
    records: List[report.TrialRecord] = []
    trial_queries = [queries[trial.query] for trial in trials]
    source = QuerySource.eval_split() if cli.queries is None else QuerySource.transforms(cli.queries)
    pose_records: List[PoseRecord] = []
    trial_starts = [trial.c2w_init for trial in trials]
    # One map of the training views checks every method's results (confidence) and serves gsloc and pnp.
    verifier = make_verifier(cli.method_settings, model, pipeline)
    total = len(trials) * len(methods)
    global_inits = None
    if not protocol.has_prior and any(m not in SELF_INITIALIZING for m in methods):
        # One initial pose per trial, shared by every refining method: retrieval + PnP (pnp runs the same route)
        # or the scene regressor's.
        meta["global_init"] = cli.global_init
        if cli.global_init == "regression":
            regression = cli.method_settings.regression
            regressor = load_run_regressor(pipeline, regression.folder, regression.inference)
            global_inits = regression_initial_poses(trial_queries, regressor)
        else:
            global_inits = retrieval_starts(cli.method_settings, model, pipeline, trial_queries)
        meta[f"{cli.global_init}_seconds"] = sum(init.seconds for init in global_inits)

    def save(method_poses: Dict[int, PoseRecord]) -> None:
        """poses.json with every finished trial (atomic: an interruption keeps a complete file)."""
        # keyed: a method's poses are in pose_records and, until the next method starts, in method_poses too
        finished = {r.key: r for r in pose_records + [method_poses[k] for k in sorted(method_poses)]}
        try:
            with rewrites.rewriting():
                write_poses(output_dir / POSES_FILE, PosesDocument(
                    frame=frame, queries=source, records=list(finished.values()),
                    settings={"protocol": protocol.name, "command": meta["command"]}))
        except OutputError as err:
            raise GslocError(f"{err}; {output_dir / 'trials.jsonl'} keeps all {count(saved[0], 'trial')} finished; "
                             f"lost: {count(total - saved[0], 'trial')} and the summaries (results.md, plots)") from None

    def append_trial(record: report.TrialRecord) -> None:
        """One line of trials.jsonl per finished trial (O(1); the file is put in order at the end)."""
        try:
            append_line(output_dir / "trials.jsonl", json.dumps(record.to_json()))
        except OutputError as err:
            raise GslocError(f"{err}; {output_dir} keeps {count(saved[0], 'trial')} saved before; lost: "
                             f"{count(total - saved[0], 'trial')} and the summaries (results.md, plots)") from None
        saved[0] += 1

    saved = [0]
    # trials.jsonl gets a line per trial at once; poses.json (all trials so far) is rewritten every few seconds
    rewrites = RewriteThrottle()
    report.write_trials_jsonl(output_dir / "trials.jsonl", [])
    method_poses: Dict[int, PoseRecord] = {}
    try:
        with progress:
            for method in methods:
                task = progress.add_task("setting up", total=len(trials), method=method)
                method_records: Dict[int, report.TrialRecord] = {}
                method_poses: Dict[int, PoseRecord] = {}

                def on_result(position: int, result: LocalizationResult, task=task, method=method,
                              method_records=method_records, method_poses=method_poses) -> None:
                    trial, query = trials[position], trial_queries[position]
                    method_records[position] = trial_records(method, queries, [trial], [result])[0]
                    append_trial(method_records[position])
                    if not result.skipped:  # after its trials.jsonl line: poses.json never holds more trials
                        method_poses[position] = pose_record(result, query, frame, method, trial=trial.trial)
                    if rewrites.due():
                        save(method_poses)
                    progress.update(task, advance=1, description=f"{result.status} {result.seconds:.1f} s")
                    if not CONSOLE.is_terminal:  # no live bar in a log file: one line per finished trial instead
                        CONSOLE.print(f"{method} {len(method_records)}/{len(trials)}: {result.status} {result.seconds:.1f} s")

                started, cpu_started = time.perf_counter(), time.process_time()
                # Every method through the one localizer call: same queries, same initial poses.
                settings = method_settings(cli, protocol, method)
                localizer = make_localizer(method, settings, model, pipeline, seed=0, verifier=verifier)
                if pool is not None:  # the same call, unit by unit on the Ray workers
                    inits = global_inits if global_inits is not None and method not in SELF_INITIALIZING else [
                        InitialPose(c2w, "prior") for c2w in trial_starts]
                    results = pool.localize(localizer, method, trial_queries, inits, on_result=on_result)
                elif global_inits is not None and method not in SELF_INITIALIZING:
                    results = localize_from_initial_poses(localizer, trial_queries, global_inits, on_result=on_result)
                else:
                    results = localizer.localize(trial_queries, trial_starts, on_result=on_result)
                meta.setdefault("method_seconds", {})[method] = time.perf_counter() - started
                # this process's CPU (with --ray only the driver's; the workers' is in ray_workers)
                meta.setdefault("method_cpu_seconds", {})[method] = time.process_time() - cpu_started
                meta.update(localizer.notes)
                records.extend(trial_records(method, queries, trials, results))
                pose_records.extend(
                    pose_record(result, query, frame, method, trial=trial.trial)
                    for trial, query, result in zip(trials, trial_queries, results) if not result.skipped
                )
            save({})
        if pool is not None:
            meta["ray_workers"] = [pool.header()] + pool.lines("trials")
            CONSOLE.print(pool.table("trials"))
        rows = write_summaries(output_dir, methods, records, protocol, meta)
    except KeyboardInterrupt:
        save(method_poses)  # every finished trial, also those of the last few seconds
        raise Interrupted(f"{output_dir / 'trials.jsonl'} and {output_dir / POSES_FILE} hold "
                          f"{count(saved[0], 'trial')} of {total}; the summaries (results.md, plots) are not complete") from None
    print_results(rows, f"{protocol.name}: {len(queries)} queries x {protocol.trials_per_query} trials", machine_line, output_dir)
    return rows
