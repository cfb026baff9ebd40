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

This module is the command (options, order of the steps, entry point); the steps live in
:mod:`~nerfstudio_gsloc.scripts.bench_setup` (checks, training for ``--data``, queries, method settings),
:mod:`~nerfstudio_gsloc.scripts.bench_run` (the run loop), :mod:`~nerfstudio_gsloc.scripts.bench_outputs` (result
files, ``--merge``) and :mod:`~nerfstudio_gsloc.scripts.bench_sequence` (``--protocol sequence``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import tyro

from nerfstudio_gsloc.errors import GslocError, run_cli
from nerfstudio_gsloc.evaluation.protocols import Protocol
from nerfstudio_gsloc.localize.pipeline import load_preset
from nerfstudio_gsloc.localize.registry import DEFAULT_METHODS, LocalizerSettings
from nerfstudio_gsloc.localize.sequence import SequenceConfig
from nerfstudio_gsloc.localize.regressor_files import check_run_regressor
from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
from nerfstudio_gsloc.localize.queries import load_transforms_queries
from nerfstudio_gsloc.scripts.bench_outputs import merge_results
from nerfstudio_gsloc.scripts.bench_run import run_benchmark
from nerfstudio_gsloc.scripts.bench_setup import method_settings, train_for_benchmark, validate


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
    sequence_preset: str = "auto"
    """--protocol sequence: the per-frame schedule (a configs/localize preset or file on top of gsloc's settings);
    auto: per method, as ns-localize --sequence (sequence-rgbd for gsloc on RGB-D frames of a run with depth
    images, else sequence)."""
    sequence_settings: SequenceConfig = field(default_factory=SequenceConfig)
    """--protocol sequence: motion model, re-localization and depth alignment, as ``ns-localize --sequence``."""
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
        return run_benchmark(cli, argv, methods, protocol, frame, pool)


def _ray_pool(cli: BenchCLI, protocol: Protocol, methods: Sequence[str]):
    """The Ray workers of ``--ray`` (a context manager; seed 0 as in-process), or a null context without it."""
    if cli.ray is None:
        return contextlib.nullcontext()
    from nerfstudio_gsloc.evaluation.ray_runner import RayPool

    settings = {m: method_settings(cli, protocol, m) for m in methods}
    return RayPool(cli.ray, cli.ray_workers, cli.threads, cli.load_config, settings, cli.method_settings, seed=0)


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