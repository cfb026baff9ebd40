"""`gsloc-bench`: compare localization methods on the same queries and the same seeded initial poses.

Examples::

    # lego-200 test split, iNeRF protocol, every method
    gsloc-bench --load-config outputs/lego-200/gsloc/<ts>/config.yml --protocol inerf --output-dir outputs/bench/lego

    # train first (or reuse <output-dir>/run), then benchmark: a dataset folder and a training preset
    gsloc-bench --data data/gsloc-room --train-preset quick --output-dir outputs/bench/room

    # methods run in parallel processes (one per core), then one table and one set of plots
    gsloc-bench --load-config .../config.yml --methods gsloc pnp --output-dir outputs/bench/a &
    gsloc-bench --load-config .../config.yml --methods icomma --output-dir outputs/bench/b
    gsloc-bench --merge outputs/bench/a outputs/bench/b --output-dir outputs/bench/all

    # or one command on Ray workers (2 local ones here; --ray HEAD_IP:6379 for a cluster, the README, "Scaling out with Ray")
    gsloc-bench --load-config .../config.yml --ray --ray-workers 2 --output-dir outputs/bench/ray
    # a sequence (a camera path, e.g. gsloc-make-scene --trajectory): gsloc, depth and pnp track it frame by frame
    gsloc-bench --load-config .../config.yml --queries track/transforms.json --protocol sequence --methods gsloc depth pnp

    # no prior: the scene regressor alone, gsloc refining its poses (gsloc-train-regressor first), retrieval + PnP
    gsloc-bench --load-config .../config.yml --protocol global --methods regression gsloc pnp --global-init regression

    # new images from a transforms.json, two methods, the rotation sweep, 10 queries
    gsloc-bench --load-config .../config.yml --queries new/transforms.json --methods gsloc pnp \\
        --protocol icomma-sweep --max-queries 10

Outputs in ``--output-dir``:

* ``results.md`` and ``results.csv``: per method the success rates at (1°, 0.01), (2°, 0.02), (5°, 0.05) scene
  units, median and mean rotation/translation errors, median seconds per query, median iterations;
* ``trials.jsonl``: one record per (method, query, trial): seed, initial and final errors, time, status; a line
  is appended as each trial finishes (so an interrupted run keeps them) and the file is put in order at the end;
* ``success_vs_angle.png`` and ``error_cdf.png``;
* ``bench.json``: the protocol, camera-distance scale, machine and settings of the run.
* ``poses.json``: the initial, final and ground-truth pose of every (method, query, trial), in the format
  ``ns-localize`` writes (:mod:`nerfstudio_gsloc.poses_file`), so a benchmark opens in ``gsloc-view``; rewritten
  every few seconds while the run goes (:class:`~nerfstudio_gsloc.files.RewriteThrottle`), at the end and on Ctrl-C.

Every method starts trial ``t`` of query ``q`` from the same initial pose, drawn from a generator seeded by
``(protocol seed, query index, t)``, so reruns and methods are comparable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import tyro
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.errors import GslocError, Interrupted, count, run_cli
from nerfstudio_gsloc.evaluation import report
from nerfstudio_gsloc.evaluation.protocols import Protocol, camera_distance_scale, generate_trials, load_protocol
from nerfstudio_gsloc.files import OutputError, RewriteThrottle, append_line, check_writable
from nerfstudio_gsloc.localize.pipeline import load_preset
from nerfstudio_gsloc.localize.initialization import InitialPose, localize_from_initial_poses, retrieval_initial_poses
from nerfstudio_gsloc.localize.pnp import PnPLocalizer, training_camera_poses
from nerfstudio_gsloc.localize.registry import (
    DEFAULT_METHODS,
    SELF_INITIALIZING,
    LocalizerSettings,
    check_methods,
    make_localizer,
    make_verifier,
)
from nerfstudio_gsloc.localize.regression import regression_initial_poses
from nerfstudio_gsloc.localize.regressor import check_run_regressor, load_run_regressor
from nerfstudio_gsloc.localize.result import LocalizationResult, pose_record
from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
from nerfstudio_gsloc.localize.queries import Query, load_eval_queries, load_transforms_queries
from nerfstudio_gsloc.poses_file import PoseRecord, PosesDocument, QuerySource, write_poses
from nerfstudio_gsloc.scripts.bench_outputs import (
    CONSOLE,
    SAME_POSES_NOTE,
    merge_results,
    print_results,
    trial_records,
    write_summaries,
)

POSES_FILE = "poses.json"


@dataclass
class BenchCLI:
    """Benchmark localization methods on a trained run."""

    load_config: Optional[Path] = None
    """The run's config.yml (written by ns-train gsloc / splatfacto). Give this or --data."""
    data: Optional[Path] = None
    """Instead of --load-config: a dataset folder (nerfstudio or Blender format) to train a gsloc model on first,
    with --train-preset; the run goes to <output-dir>/run/ and a finished run there is reused."""
    train_preset: str = "default"
    """Training preset of configs/train (tiny, quick, default) or a .yaml file, for --data."""
    output_dir: Path = Path("outputs/bench")
    """Where results.md, results.csv, trials.jsonl and the plots go."""
    queries: Optional[Path] = None
    """A nerfstudio transforms.json of query images with ground-truth poses (transform_matrix, dataset's original
    frame). Default: the run's held-out eval split. Distorted photos (OPENCV, OPENCV_FISHEYE) are undistorted like
    nerfstudio's training images."""
    methods: Tuple[str, ...] = DEFAULT_METHODS
    """Methods to compare (gsloc, photometric, icomma, depth, pnp; regression once gsloc-train-regressor has run)."""
    protocol: str = "inerf"
    """A protocol preset of configs/protocols (inerf, icomma-sweep, tracking) or a .yaml file."""
    trials: Optional[int] = None
    """Trials per query (per angle for sweeps); default: the protocol's."""
    seed: Optional[int] = None
    """Base seed of the trials; default: the protocol's."""
    max_queries: Optional[int] = None
    """Use only the first N queries (after --query-stride)."""
    query_stride: int = 1
    """Use every k-th query (a cheaper run that still spans the whole split, e.g. all viewing directions)."""
    threads: Optional[int] = None
    """torch intra-op threads (default: torch's own choice); written beside the timings."""
    merge: Tuple[Path, ...] = ()
    """Instead of running: combine the results folders of earlier gsloc-bench runs on the same run, queries and
    protocol (for example methods run in parallel processes) into --output-dir. Checks that every folder's trials
    started from the same initial poses."""
    gsloc_preset: Optional[str] = None
    """An ns-localize preset (configs/localize) or .yaml/.json file for gsloc (and photometric/depth), loaded
    before the --method-settings.gsloc.* options, which override it."""
    global_init: Literal["retrieval", "regression"] = "retrieval"
    """Protocols without a prior (global): where the refining methods start, retrieval + PnP or the scene
    regressor's pose (weights from gsloc-train-regressor); pnp and regression find their own pose either way."""
    sequence_preset: str = "sequence"
    """--protocol sequence: the per-frame schedule (a configs/localize preset or file on top of gsloc's settings)."""
    method_settings: LocalizerSettings = field(default_factory=LocalizerSettings)
    """Settings of the methods (gsloc's also apply to photometric and depth, with one loss each)."""
    ray: Optional[str] = None
    """Run the trials on Ray workers: --ray alone starts a local Ray runtime on this machine's cores; --ray ADDRESS
    joins a running cluster (see the README, "Scaling out with Ray"). Same trials as without it; needs pip install ray."""
    ray_workers: Optional[int] = None
    """Ray workers (actors, each loading the run once); default: the CPUs Ray has, divided by --threads."""

    def main(self, argv: Optional[Sequence[str]] = None) -> None:
        """Validate, load, run every method, write the results; or, with --merge, merge earlier results."""
        if not self.merge:
            bench_main(self, argv)
            return
        if self.load_config is not None or self.data is not None:
            raise GslocError("--merge combines finished results folders; it takes no --load-config or --data")
        merge_results(self.merge, self.output_dir)


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def validate(cli: BenchCLI) -> Tuple[List[str], Protocol]:
    """Everything that can be checked before loading the model. Raises :class:`GslocError`."""
    methods = check_methods(list(cli.methods))
    if (cli.load_config is None) == (cli.data is None):
        raise GslocError("give either --load-config (a trained run) or --data (a dataset to train on first)")
    if cli.trials is not None and cli.trials < 1:
        raise GslocError("--trials must be at least 1")
    if cli.query_stride < 1:
        raise GslocError("--query-stride must be at least 1")
    if cli.max_queries is not None and cli.max_queries < 1:
        raise GslocError("--max-queries must be at least 1")
    if cli.threads is not None and cli.threads < 1:
        raise GslocError("--threads must be at least 1")
    protocol = load_protocol(cli.protocol, trials=cli.trials, seed=cli.seed)
    loftr = cli.method_settings.icomma.loftr_weights_path
    if "icomma" in methods and loftr is not None and not Path(loftr).is_file():
        raise GslocError(f"LoFTR weights file not found: {loftr}")
    if cli.ray is not None:
        if protocol.is_sequence:
            raise GslocError("--protocol sequence does not run on --ray yet (frames depend on each other)")
        from nerfstudio_gsloc.evaluation.ray_runner import import_ray

        import_ray(cli.ray)  # one error line now if Ray is not installed
    check_writable(cli.output_dir, "--output-dir")  # before training or loading anything
    return methods, protocol


def train_for_benchmark(cli: BenchCLI) -> Path:
    """Train (or reuse) the gsloc run of ``--data`` with ``--train-preset``; returns its config.yml."""
    from nerfstudio_gsloc.training import dataset_format, load_train_preset, train_or_reuse

    preset = load_train_preset(cli.train_preset)
    dataset_format(cli.data)  # a clear error before anything is written
    if cli.queries is not None and not Path(cli.queries).is_file():
        raise GslocError(f"query file not found: {cli.queries}")
    timestamp = Path(cli.train_preset).stem
    CONSOLE.print(f"training gsloc on {cli.data} with preset {timestamp!r} ({preset.iterations} iterations) "
                  f"into {Path(cli.output_dir) / 'run'} (a finished run there is reused)")
    config_path = train_or_reuse(cli.data, Path(cli.output_dir) / "run", preset, timestamp=timestamp)
    CONSOLE.print(f"run: {config_path}")
    return config_path


def load_queries(cli: BenchCLI, pipeline, frame) -> List[Query]:
    """The benchmark's queries (ground truth required)."""
    if cli.queries is not None:
        queries = load_transforms_queries(cli.queries, frame)
    else:
        queries = load_eval_queries(pipeline)
    # Query.index stays the position in the full set, so trial seeds do not depend on the subset.
    queries = queries[:: cli.query_stride][: cli.max_queries]
    missing = [q.name for q in queries if q.gt_c2w is None]
    if missing:
        raise GslocError(f"benchmark queries need ground-truth poses (transform_matrix); missing for {missing[0]}")
    return queries


def bench_main(cli: BenchCLI, argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The body of ``gsloc-bench`` (raises :class:`GslocError` for bad input). Returns the summary rows."""
    from nerfstudio_gsloc.runs import check_run

    methods, protocol = validate(cli)
    if cli.threads is not None:
        torch.set_num_threads(int(cli.threads))
    if cli.data is not None:
        cli = dataclasses.replace(cli, load_config=train_for_benchmark(cli))
    check_run(cli.load_config)
    if "regression" in methods or (not protocol.has_prior and cli.global_init == "regression"):
        check_run_regressor(cli.load_config, cli.method_settings.regression.folder)  # no weights: the command to run
    frame = run_frame_transform(cli.load_config)
    if cli.queries is not None:
        # Validate the query file before loading the model (the model is needed only for the eval split).
        load_transforms_queries(cli.queries, frame, cli.max_queries)
    # With --ray the workers start now and load the run while this process loads it too (their load overlaps the
    # driver's instead of following it).
    with _ray_pool(cli, protocol, methods) as pool:
        return _run_benchmark(cli, argv, methods, protocol, frame, pool)


def _run_benchmark(cli: BenchCLI, argv: Optional[Sequence[str]], methods: List[str], protocol: Protocol,
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
                               frame, source, output_dir, meta, CONSOLE)
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


def method_settings(cli: BenchCLI, protocol: Protocol, method: str) -> LocalizerSettings:
    """The settings ``method`` runs with: --method-settings, with pnp choosing views by retrieval when the protocol
    gives no prior."""
    settings = cli.method_settings
    if not protocol.has_prior and method == "pnp":
        settings = dataclasses.replace(settings, pnp=dataclasses.replace(settings.pnp, selection="retrieval"))
    return settings


def _ray_pool(cli: BenchCLI, protocol: Protocol, methods: Sequence[str]):
    """The Ray workers of ``--ray`` (a context manager; seed 0 as in-process), or a null context without it."""
    if cli.ray is None:
        return contextlib.nullcontext()
    from nerfstudio_gsloc.evaluation.ray_runner import RayPool

    settings = {m: method_settings(cli, protocol, m) for m in methods}
    return RayPool(cli.ray, cli.ray_workers, cli.threads, cli.load_config, settings, cli.method_settings, seed=0)


def retrieval_starts(settings: LocalizerSettings, model, pipeline, queries: Sequence[Query]) -> List[InitialPose]:
    """Initial poses of a protocol without prior: retrieval + PnP with the pnp settings (``selection=retrieval``)."""
    config = dataclasses.replace(settings.pnp, selection="retrieval")
    baseline = PnPLocalizer(config, model, pipeline, seed=0).build_map()
    with CONSOLE.status(f"retrieval + PnP initial poses of {len(queries)} trials"):
        return retrieval_initial_poses(queries, baseline, seed=0)


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def _peek_option(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of ``name`` in ``argv`` (read before tyro so a preset can become the defaults)."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; ``--gsloc-preset`` fills in the gsloc defaults."""
    from nerfstudio_gsloc.evaluation.ray_runner import ray_argv

    argv = ray_argv(sys.argv[1:] if argv is None else argv)
    preset = _peek_option(argv, "--gsloc-preset")
    settings = LocalizerSettings()
    if preset not in (None, "None"):
        settings.gsloc = load_preset(preset)
    default = BenchCLI(method_settings=settings)
    tyro.cli(BenchCLI, args=argv, default=default).main(argv)


def entrypoint() -> None:
    """Console script ``gsloc-bench``."""
    run_cli(main)


if __name__ == "__main__":
    entrypoint()
