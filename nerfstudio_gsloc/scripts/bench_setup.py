"""gsloc-bench's setup: the checks before anything loads, training for ``--data``, the queries, each method's
settings and the retrieval starts of a protocol without prior (the CLI is :mod:`nerfstudio_gsloc.scripts.bench`, the
run loop :mod:`nerfstudio_gsloc.scripts.bench_run`).

The functions take the parsed :class:`~nerfstudio_gsloc.scripts.bench.BenchCLI` (or its ``method_settings``); poses
are ``[3, 4]`` OpenGL camera-to-world in the scene frame, as :class:`~nerfstudio_gsloc.localize.queries.Query` holds
them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, List, Sequence, Tuple

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation.protocols import Protocol, load_protocol
from nerfstudio_gsloc.files import check_writable
from nerfstudio_gsloc.localize.initialization import InitialPose, retrieval_initial_poses
from nerfstudio_gsloc.localize.pipeline import load_preset
from nerfstudio_gsloc.localize.pnp import PnPLocalizer
from nerfstudio_gsloc.localize.registry import LocalizerSettings, check_methods
from nerfstudio_gsloc.localize.queries import Query, load_eval_queries, load_transforms_queries
from nerfstudio_gsloc.localize.sequence import AUTO_PRESET
from nerfstudio_gsloc.scripts.bench_outputs import CONSOLE

if TYPE_CHECKING:  # the CLI imports this module
    from nerfstudio_gsloc.scripts.bench import BenchCLI


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
    if protocol.is_sequence and cli.sequence_preset != AUTO_PRESET:  # a bad preset name or file: before loading
        load_preset(cli.sequence_preset, base=cli.method_settings.gsloc)
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


def method_settings(cli: BenchCLI, protocol: Protocol, method: str) -> LocalizerSettings:
    """The settings ``method`` runs with: --method-settings, with pnp choosing views by retrieval when the protocol
    gives no prior."""
    settings = cli.method_settings
    if not protocol.has_prior and method == "pnp":
        settings = dataclasses.replace(settings, pnp=dataclasses.replace(settings.pnp, selection="retrieval"))
    return settings


def retrieval_starts(settings: LocalizerSettings, model, pipeline, queries: Sequence[Query]) -> List[InitialPose]:
    """Initial poses of a protocol without prior: retrieval + PnP with the pnp settings (``selection=retrieval``)."""
    config = dataclasses.replace(settings.pnp, selection="retrieval")
    baseline = PnPLocalizer(config, model, pipeline, seed=0).build_map()
    with CONSOLE.status(f"retrieval + PnP initial poses of {len(queries)} trials"):
        return retrieval_initial_poses(queries, baseline, seed=0)
