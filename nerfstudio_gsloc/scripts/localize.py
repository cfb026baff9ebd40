"""`ns-localize`: refine query camera poses against a trained gsloc (or splatfacto) run.

Examples::

    # the run's held-out eval split, each view started from its ground truth moved by 10 deg / 0.1 units
    ns-localize --load-config outputs/scene/gsloc/<ts>/config.yml --output-dir outputs/loc --init perturb

    # another registered method (gsloc, photometric, depth, icomma, pnp) through the same interface
    ns-localize --load-config .../config.yml --method pnp --output-dir outputs/loc-pnp

    # watch it: nerfstudio's viewer on the run, each query's frustum moving live; stays open until Ctrl-C
    ns-localize --load-config .../config.yml --output-dir outputs/loc --viewer

    # new images (nerfstudio transforms.json, poses in the dataset's original frame), from their priors
    ns-localize --load-config .../config.yml --queries new/transforms.json --init prior --preset fast

    # a folder of photos with no poses and no transforms.json: retrieval + PnP, then refinement
    ns-localize --load-config .../config.yml --images my_photos/ --output-dir outputs/photos

    # no prior: the scene regressor's one-shot pose (gsloc-train-regressor first), alone or refined by gsloc
    ns-localize --load-config .../config.yml --method regression --output-dir outputs/loc-reg
    ns-localize --load-config .../config.yml --init regression --output-dir outputs/loc-reg-gsloc

    # the same on Ray workers: every core of this machine, or a cluster (README, "Scaling out with Ray")
    ns-localize --load-config .../config.yml --output-dir outputs/loc --init perturb --ray [HEAD_IP:6379]

    # a sequence (frame order of the file): each frame from the last, re-localized when the track is lost
    ns-localize --load-config .../config.yml --queries track/transforms.json --sequence --output-dir outputs/track

Outputs in ``--output-dir``:

* ``poses.json`` (schema: :mod:`nerfstudio_gsloc.poses_file`): per query the image, the refined, initial and
  ground-truth OpenGL camera-to-world 4x4 in the dataset's original frame (``dataparser_transforms.json`` undone),
  status (converged / max_iterations / failed) with the reason, final loss, iterations, match inliers and seconds;
  each finished query is appended at once to ``poses.journal.jsonl`` and poses.json is rewritten from everything so
  far (atomically) every few seconds, at the end and on Ctrl-C or an error, so an interrupted run leaves a valid
  file and ``--resume`` (which first folds in the journal of a killed run) skips what it holds.
* ``metrics.json`` (and a printed table) when ground truth is known: rotation error (geodesic degrees),
  translation error (scene and original units), mean/median, success rates at (1deg, 0.01), (2deg, 0.02),
  (5deg, 0.05) scene units, by :mod:`nerfstudio_gsloc.metrics`, as gsloc-bench's results.md: failed queries are
  failures with infinite error (an infinite mean once one fails), written as the string ``"inf"`` (strict JSON;
  :func:`~nerfstudio_gsloc.scripts.localize_outputs.read_metrics` reads it back).
* ``trace.csv`` (loss and errors per iteration, saved with every finished query) and ``trace.png`` (error against
  iteration).
* with ``--sequence``: ``trajectory.tum`` (TUM format: camera-to-world, OpenCV camera axes, original frame),
  ``trajectory_gt.tum``, ``sequence.json`` (ATE, rotation RMSE, RPE, lost / re-localized frames, time per frame)
  and ``sequence.png`` (see :mod:`nerfstudio_gsloc.scripts.localize_sequence`).

Distorted queries (the eval split of a dataset with OPENCV / OPENCV_FISHEYE distortion, or such a query file) are
undistorted exactly like nerfstudio undistorts the training images; poses are unchanged.

Every bad input (config, checkpoint, query file, images, intrinsics, preset, matcher weights, an --output-dir that
cannot be written, --method depth on queries without depth) is reported as one ``error:`` line with exit code 1
before any work starts and before anything is written. A write that fails later (disk full) is one ``error:`` line
naming what is kept and what is lost; Ctrl-C at any moment is one ``interrupted:`` line and exit code 130, every
file in --output-dir complete (see :mod:`nerfstudio_gsloc.scripts.localize_outputs`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple

import torch
import tyro
from rich.console import Console

from nerfstudio_gsloc.errors import GslocError, Interrupted, run_cli
from nerfstudio_gsloc.files import check_writable
from nerfstudio_gsloc.localize.image_folder import load_image_folder_queries, training_camera
from nerfstudio_gsloc.localize.initialization import no_pose, query_init_sources
from nerfstudio_gsloc.localize.icomma import IComMaConfig
from nerfstudio_gsloc.localize.pipeline import PoseInversion, PoseInversionConfig, load_preset
from nerfstudio_gsloc.localize.pnp import PnPLocalizerConfig
from nerfstudio_gsloc.localize.regression import RegressionLocalizerConfig
from nerfstudio_gsloc.localize.regressor_files import check_run_regressor
from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
from nerfstudio_gsloc.localize.queries import Query, load_eval_queries, load_transforms_queries
from nerfstudio_gsloc.localize.verification import VerificationConfig
from nerfstudio_gsloc.localize.registry import (
    LocalizerSettings,
    SingleLossBudget,
    check_methods,
    check_queries_suit,
    make_localizer,
)
from nerfstudio_gsloc.localize.sequence import AUTO_PRESET, SequenceConfig, choose_sequence_preset, make_sequence_tracker
from nerfstudio_gsloc.scripts.localize_run import localize_and_save, ray_pool
from nerfstudio_gsloc.scripts.localize_sequence import sequence_table, track_and_save, write_sequence_outputs
from nerfstudio_gsloc.scripts.localize_starts import initial_poses_of, load_previous, query_source, resolve_init, run_settings
from nerfstudio_gsloc.scripts.localize_outputs import (
    JOURNAL_FILE,
    LocalizeOutputs,
    SaveFailed,
    compute_metrics,
    metrics_table,
    recover_journal,
)

CONSOLE = Console()


@dataclass
class LocalizeCLI:
    """Localize query images by inverting a trained Gaussian splatting run."""

    load_config: Path
    """The run's config.yml (written by ns-train gsloc / splatfacto)."""
    output_dir: Path = Path("outputs/localize")
    """Where poses.json, metrics.json, trace.csv and trace.png go."""
    queries: Optional[Path] = None
    """A nerfstudio transforms.json of query images (transform_matrix = ground truth, prior_transform_matrix =
    prior, both in the dataset's original frame). Default: the run's held-out eval split. Photos with lens
    distortion (OPENCV k1..p2, OPENCV_FISHEYE k1..k4, global or per frame) are undistorted like nerfstudio's
    training images."""
    images: Optional[Path] = None
    """A folder of JPEG/PNG photos to localize (no transforms.json needed; no prior, so they start from
    retrieval). Intrinsics: --intrinsics, else DIR/transforms.json's fl_x fl_y cx cy w h, else the run's training
    camera, scaled to each image's size."""
    intrinsics: Optional[Tuple[float, float, float, float]] = None
    """fx fy cx cy (pixels) of every --images photo, overriding the assumed camera."""
    init: Literal["auto", "prior", "perturb", "retrieval", "regression"] = "auto"
    """Initial poses: the query file's priors; the ground truth perturbed by --perturb-deg/--perturb-trans
    (evaluation); or retrieval + PnP against the run (no prior: training and rendered views ranked by VLAD, SIFT
    matches, RANSAC PnP; the index is cached in <run>/gsloc_index). auto: each query's prior when it has one,
    otherwise retrieval. A query retrieval cannot place is reported as failed with the reason. regression: the
    scene regressor's one-shot pose (weights from gsloc-train-regressor, beside the run)."""
    perturb_deg: float = 10.0
    """Rotation of the perturbation, degrees, about a random axis through the camera centre."""
    perturb_trans: float = 0.1
    """Translation of the perturbation, scene units, in a random direction."""
    seed: int = 0
    """Base seed of the perturbations and RANSAC (each query uses its own stream)."""
    resume: bool = False
    """Skip queries already in --output-dir/poses.json (from an interrupted run with the same settings)."""
    max_queries: Optional[int] = None
    """Localize only the first N queries."""
    num_threads: Optional[int] = None
    """torch CPU threads (default: torch's choice). On a busy machine 1 thread is often several times faster."""
    preset: Optional[str] = None
    """A preset from configs/localize (default, fast, rgbd, ...) or a .yaml/.json file; loaded before the
    other --localization.* options, which override it."""
    method: str = "gsloc"
    """The localizer: gsloc, photometric, depth, icomma, pnp or regression (see nerfstudio_gsloc/localize/registry.py)."""
    localization: PoseInversionConfig = field(default_factory=PoseInversionConfig)
    """gsloc's pose-inversion settings (losses, matcher, schedule, optimiser); photometric and depth use them with
    one loss term each and the --single-loss budget."""
    single_loss: SingleLossBudget = field(default_factory=SingleLossBudget)
    """Iterations and learning rates of --method photometric / depth."""
    icomma: IComMaConfig = field(default_factory=IComMaConfig)
    """Settings of --method icomma."""
    pnp: PnPLocalizerConfig = field(default_factory=PnPLocalizerConfig)
    """Settings of --method pnp (its map of the training views also serves the confidence check)."""
    regression: RegressionLocalizerConfig = field(default_factory=RegressionLocalizerConfig)
    """Settings of --method regression and --init regression (weights folder, alignment, confidence)."""
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    """The ground-truth-free check of every result: confidence in [0, 1] from the support of the pose among the
    query's matches to the training photos; under --verification.threshold the result is 'rejected'."""
    sequence: bool = False
    """Track the queries as one sequence, in order (file-name order of --images, frame order of --queries): each
    frame starts from the previous refined pose (constant-velocity motion model) with the short --sequence-preset
    schedule, the first from its prior (else retrieval) with the full one; a frame whose confidence falls under
    --verification.threshold is re-localized (retrieval + PnP, then the last good pose) and the event recorded."""
    sequence_preset: str = "auto"
    """The per-frame schedule of --sequence: a configs/localize preset or file, applied on top of the other
    --localization.* settings (which the first frame and re-localizations use); auto: sequence-rgbd for gsloc on
    RGB-D frames of a run with depth images (its depth alignment sets each pose), else sequence."""
    sequence_settings: SequenceConfig = field(default_factory=SequenceConfig)
    """Motion model, re-localization and TUM frame rate of --sequence."""
    viewer: bool = False
    """Show the run in nerfstudio's viewer while localizing (frustums move live) and keep it open until Ctrl-C."""
    viewer_port: Optional[int] = None
    """Port of --viewer (default: 7007 or the next free port, like ns-viewer)."""
    viewer_host: Optional[str] = None
    """Interface --viewer listens on (default: nerfstudio's, 0.0.0.0)."""
    ray: Optional[str] = None
    """Localize on Ray workers: --ray alone starts a local Ray runtime on this machine's cores; --ray ADDRESS
    joins a running cluster (see the README, "Scaling out with Ray"). Same poses.json as without it; needs pip install ray."""
    ray_workers: Optional[int] = None
    """Ray workers (actors, each loading the run once); default: the CPUs Ray has, divided by --num-threads."""

    def settings(self) -> LocalizerSettings:
        """The settings of every method, as the registry takes them."""
        return LocalizerSettings(gsloc=self.localization, single_loss=self.single_loss, icomma=self.icomma, pnp=self.pnp,
                                 regression=self.regression, verification=self.verification)

    def main(self) -> None:
        """Validate everything, load the run, localize, write the outputs."""
        localize_main(self)


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def localize_main(cli: LocalizeCLI) -> None:
    """The body of ``ns-localize`` (raises :class:`GslocError` for bad input)."""
    from nerfstudio_gsloc.runs import check_run, eval_split_has_depth, load_run

    if cli.num_threads is not None:
        if cli.num_threads < 1:
            raise GslocError("--num-threads must be at least 1")
        torch.set_num_threads(cli.num_threads)
    # 1. Everything that can be checked without the model: run files, query file and images, init, matcher.
    checkpoint_dir = check_run(cli.load_config)
    frame = run_frame_transform(cli.load_config)
    if cli.max_queries is not None and cli.max_queries < 1:
        raise GslocError("--max-queries must be at least 1")
    if cli.perturb_deg < 0 or cli.perturb_trans < 0:
        raise GslocError("--perturb-deg and --perturb-trans must be >= 0")
    if cli.viewer_port is not None and not 0 < cli.viewer_port < 65536:
        raise GslocError(f"--viewer-port must be between 1 and 65535, got {cli.viewer_port}")
    queries: Optional[List[Query]] = None
    init = cli.init
    if cli.queries is not None and cli.images is not None:
        raise GslocError("give either --queries (a transforms.json) or --images (a folder of photos), not both")
    if cli.intrinsics is not None and cli.images is None:
        raise GslocError("--intrinsics applies to --images only (a transforms.json has its own intrinsics)")
    if cli.sequence and (cli.resume or cli.viewer or cli.ray is not None):
        raise GslocError("--sequence does not support --resume, --viewer or --ray yet (frames depend on each other)")
    starting = slice(0, 1) if cli.sequence else slice(None)  # a sequence needs the first frame's start only
    if cli.sequence and cli.sequence_preset != AUTO_PRESET:  # a preset file checked before loading the model
        PoseInversion.build_matcher(load_preset(cli.sequence_preset, base=cli.localization))
    if cli.queries is not None:
        queries = load_transforms_queries(cli.queries, frame, cli.max_queries)
        init = resolve_init(queries[starting], init)
    elif cli.images is not None:
        # Files, formats and intrinsics checked now; the run's camera is assumed once the run is loaded.
        init = resolve_init(load_image_folder_queries(cli.images, None, cli.intrinsics, cli.max_queries)[starting], init)
    elif init == "prior":
        raise GslocError("the eval split has no prior poses: use --init perturb or retrieval, or --queries with "
                         "prior_transform_matrix")
    elif init == "auto":
        init = "retrieval"
    method = check_methods([cli.method])[0]
    config = cli.settings().config(method)
    if isinstance(config, PoseInversionConfig):
        PoseInversion.build_matcher(config)  # schedule and matcher weights checked before loading the model
    if method == "icomma" and cli.icomma.loftr_weights_path is not None and not Path(cli.icomma.loftr_weights_path).is_file():
        raise GslocError(f"LoFTR weights file not found: {cli.icomma.loftr_weights_path}")
    if method == "regression" or init == "regression":
        check_run_regressor(cli.load_config, cli.regression.folder)  # no weights: one line naming gsloc-train-regressor
    if queries is not None:
        check_queries_suit(method, config, queries)
    elif eval_split_has_depth(cli.load_config) is False:
        check_queries_suit(method, config, [], source="the run's eval split")  # no depth in the dataset at all
    if cli.ray is not None:
        from nerfstudio_gsloc.evaluation.ray_runner import import_ray

        if cli.viewer:
            raise GslocError("--viewer shows an in-process run; it cannot be combined with --ray")
        import_ray(cli.ray)  # one error line now if Ray is not installed
    output_dir = check_writable(cli.output_dir, "--output-dir")

    # 2. The model (and the eval split, which needs the loaded datamanager).
    with CONSOLE.status("loading the run"):
        run_config, pipeline = load_run(cli.load_config)
    if cli.images is not None:
        queries = load_image_folder_queries(cli.images, training_camera(pipeline), cli.intrinsics, cli.max_queries)
    elif queries is None:
        queries = load_eval_queries(pipeline, cli.max_queries)
        query_init_sources(queries[starting], init)
        check_queries_suit(method, config, queries)
    settings_all = cli.settings()
    if method == "pnp" and "retrieval" in query_init_sources(queries[starting], init):
        settings_all.pnp = dataclasses.replace(settings_all.pnp, selection="retrieval")  # no prior to choose views by
    localizer = make_localizer(method, settings_all, pipeline.model, pipeline, seed=cli.seed)
    source, settings = query_source(cli), run_settings(cli, init)
    if cli.resume:
        recovered = recover_journal(output_dir)  # what a killed run saved only in its journal
        if recovered:
            CONSOLE.print(f"recovered {recovered} finished queries from {output_dir / JOURNAL_FILE}")
    previous = load_previous(output_dir, source, settings) if cli.resume else {}
    todo = [q for q in queries if q.name not in previous]
    starts = initial_poses_of(cli, todo[starting], init, method, pipeline, CONSOLE) if todo else []
    live = None
    if cli.viewer:
        from nerfstudio_gsloc.viewer.live import start_live_view

        live = start_live_view(run_config, pipeline, checkpoint_dir, frame, source, cli.viewer_port, cli.viewer_host)
        live.begin(previous.values(), todo, [no_pose() if s.c2w is None else s.c2w for s in starts], method)
        for line in live.viewer_state.viewer_info:
            CONSOLE.print(line)

    # 3. Work. Every finished query is saved at once (a journal line; poses.json and trace.csv every few seconds).
    outputs = LocalizeOutputs(output_dir, source, settings, frame, previous, total=len(previous) + len(todo))
    pool = None
    try:
        try:
            if cli.sequence:
                started = time.perf_counter()
                preset, why = choose_sequence_preset(cli.sequence_preset, method, todo, pipeline, settings_all.gsloc)
                CONSOLE.print(f"per-frame schedule: {preset} ({why})")
                tracking = load_preset(preset, base=cli.localization)
                tracker = make_sequence_tracker(method, settings_all, tracking, pipeline.model, pipeline, cli.seed,
                                                cli.sequence_settings, verifier=localizer.verifier)
                frames = track_and_save(tracker, method, todo, starts[0], outputs, CONSOLE)
                sequence = write_sequence_outputs(output_dir, todo, frames, method, outputs, cli.sequence_settings.fps,
                                                  {"command": "ns-localize " + " ".join(sys.argv[1:]), "method": method,
                                                   "sequence_preset": {method: preset}})
                elapsed = time.perf_counter() - started
            else:
                with ray_pool(cli.ray, cli.ray_workers, cli.num_threads, cli.load_config, cli.seed, method,
                              settings_all, todo) as pool:
                    elapsed = localize_and_save(localizer, method, todo, starts, outputs, cli.resume, len(previous),
                                                init, CONSOLE, live, pool)
                if pool is not None:
                    CONSOLE.print(pool.table())
        except SaveFailed:
            raise  # its message says what is kept; writing again would not help
        except BaseException:
            outputs.flush()  # every finished query into poses.json, also on Ctrl-C or an error
            raise
        outputs.flush()
        # 4. Summaries.
        for record in outputs.records.values():
            if record.failed:
                CONSOLE.print(f"[yellow]{record.status}:[/yellow] {record.image}: {record.reason}")
        metrics = compute_metrics(list(outputs.records.values()), frame)
        outputs.write_summaries(metrics)
    except KeyboardInterrupt:
        raise Interrupted(outputs.interrupted_message()) from None
    if metrics is not None:
        CONSOLE.print(metrics_table(metrics))
    if cli.sequence:
        CONSOLE.print(sequence_table(method, sequence))
    CONSOLE.print(f"{len(todo)} queries in {elapsed:.1f} s; results in {output_dir}")
    CONSOLE.print(f"view them with: gsloc-view --load-config {cli.load_config} --poses {outputs.poses_path}")
    if live is not None:
        from nerfstudio_gsloc.viewer.server import serve_until_interrupted

        serve_until_interrupted(live.viewer_state, CONSOLE, "the viewer stays open with the results")


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def _peek_preset(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--preset`` in ``argv`` (read before tyro so the preset becomes the defaults)."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run; presets fill in the --localization.* defaults."""
    from nerfstudio_gsloc.evaluation.ray_runner import ray_argv

    argv = ray_argv(sys.argv[1:] if argv is None else argv)
    preset = _peek_preset(argv)
    localization = load_preset(preset) if preset not in (None, "None") else PoseInversionConfig()
    default = LocalizeCLI(load_config=tyro.MISSING, localization=localization)  # type: ignore[arg-type]
    cli = tyro.cli(LocalizeCLI, args=argv, default=default)
    cli.main()


def entrypoint() -> None:
    """Console script ``ns-localize``."""
    run_cli(main)


if __name__ == "__main__":
    entrypoint()
