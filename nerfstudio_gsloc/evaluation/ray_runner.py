"""Localization on Ray actors: ``ns-localize --ray [ADDRESS]`` and ``gsloc-bench --ray [ADDRESS]``.

``--ray`` alone starts a local Ray runtime on this machine's cores (bound to 127.0.0.1); ``--ray ADDRESS``
connects to a running cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the
others; every node needs the package installed and the run's files at the same path). Ray is imported only then.

The driver (the command) loads the run as before, plans the work and writes every file; the workers compute:

* a **unit** is a batch of queries (``ns-localize``) or of one method's trials (``gsloc-bench``) as
  :meth:`Localizer.batches <nerfstudio_gsloc.localize.localizer.Localizer.batches>` splits them: for the
  optimising methods the optimiser's own batches, so each query gets exactly the result of an in-process run
  (seeds are per query index and trial; a batch's stages end together, so the batch is the unit);
* a **worker** is a Ray actor (:class:`LocalizerWorker`) that loads the run once and keeps it and its
  localizers; ``workers x torch threads`` equals the CPUs Ray was given (default: one thread per worker);
* results come back unit by unit and go through the caller's ``on_result`` (which saves them atomically, as
  in-process), so ``--resume`` works after an interrupted distributed run; a unit whose worker dies is queued
  again and run by a new actor (at most :data:`MAX_ATTEMPTS` times); a unit's results are used once.

The driver keeps :data:`UNITS_QUEUED_PER_WORKER` units queued on each worker, so a worker goes from one unit to
the next without waiting for the driver: a worker's rate is its units' compute time, the driver's cost per unit
is one result transfer and a journal line per result (see the README, "Scaling out with Ray").
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import torch
from rich.table import Table

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation.report import machine_info
from nerfstudio_gsloc.localize.initialization import InitialPose, localize_from_initial_poses
from nerfstudio_gsloc.localize.localizer import Localizer
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.registry import LocalizerSettings, make_localizer, make_verifier
from nerfstudio_gsloc.localize.result import LocalizationResult

#: ``--ray`` without an address: start a local runtime.
LOCAL = "local"
#: Tries of one unit before the run stops (its worker died each time).
MAX_ATTEMPTS = 3
#: Units of methods that localize every query on its own hold this many queries.
UNIT_SIZE = 4
#: Units queued on each worker: the next one waits on the worker while it runs one, so it never idles while the
#: driver saves a result and sends more.
UNITS_QUEUED_PER_WORKER = 2
#: Test hook: a path; the first worker to start a unit creates the file and dies (``os._exit``) mid-run.
CRASH_ENV = "GSLOC_RAY_TEST_CRASH_MARKER"


def ray_argv(argv: Sequence[str]) -> List[str]:
    """``argv`` with a bare ``--ray`` (last, or followed by another option) made ``--ray local`` for tyro."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--ray=" + LOCAL
    return out


def import_ray(address: Optional[str] = None):
    """The ``ray`` module, or one error line saying how to install it. Before a local runtime (``address``
    :data:`LOCAL`) is started, Ray is told to use the loopback address (its own switch for single-machine
    runtimes), so nothing listens beyond 127.0.0.1."""
    if address == LOCAL and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise GslocError("--ray needs Ray, which is not installed: pip install 'nerfstudio-gsloc[ray]' "
                         "(or pip install ray)") from None
    return ray


def init_ray(address: str, num_cpus: Optional[int] = None) -> None:
    """Start a local runtime (``address`` :data:`LOCAL`: ``num_cpus``, default all cores, on 127.0.0.1, no
    dashboard) or connect to a cluster; one error line when that fails."""
    ray = import_ray(address)
    for attempt in (1, 2):
        try:
            if address == LOCAL:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            return
        except Exception as err:  # noqa: BLE001  (Ray raises plain Exception when its node starts too slowly)
            ray.shutdown()
            # Ray gives its raylet 30 s to register; a busy machine can miss that once, so a local start tries twice.
            if attempt == 2 or address != LOCAL:
                raise GslocError(f"cannot start or reach Ray at {address}: {err}") from None


@dataclass
class Unit:
    """One piece of work: ``method`` on ``queries`` from ``inits``; ``positions`` index the caller's full list."""

    key: int
    method: str
    positions: List[int]
    queries: List[Query]
    inits: List[InitialPose]


def plan_units(localizer: Localizer, method: str, queries: Sequence[Query], inits: Sequence[InitialPose]) -> List[Unit]:
    """Units whose separate runs give what one :func:`localize_from_initial_poses` call on all gives.

    Queries without an initial pose (they fail without running the method) form one unit; the others are split
    by ``localizer.batches`` exactly as the call would hand them to the localizer.
    """
    runnable = [p for p, init in enumerate(inits) if init.c2w is not None]
    no_start = [p for p, init in enumerate(inits) if init.c2w is None]
    groups = [[runnable[k] for k in batch] for batch in localizer.batches([queries[p] for p in runnable], UNIT_SIZE)]
    groups = ([no_start] if no_start else []) + groups
    return [Unit(key, method, group, [queries[p] for p in group], [inits[p] for p in group])
            for key, group in enumerate(groups)]


def describe_machine(device: torch.device) -> str:
    """One line: host, process, CPU, cores, torch threads, device (what a worker's timings were measured on)."""
    info = machine_info(device)
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{socket.gethostname()} pid {os.getpid()}: {info['cpu']} ({info['cpu_count']} cores), "
            f"{info['torch_threads']} torch threads, device {info['device']}{gpu}")


class LocalizerWorker:
    """The body of a Ray actor: the run loaded once, one localizer per method, one verifier shared by them.

    Args:
        load_config: the run's config.yml (same path on every node).
        settings: per method the :class:`LocalizerSettings` its localizer is made with.
        verifier_settings: the settings of the shared verifier (:func:`make_verifier`).
        seed: base seed of the localizers (as in-process).
        threads: torch intra-op threads of this worker.
        crash_marker: test hook (:data:`CRASH_ENV`).
    """

    def __init__(self, load_config: str, settings: Dict[str, LocalizerSettings], verifier_settings: LocalizerSettings,
                 seed: int, threads: int, crash_marker: Optional[str] = None) -> None:
        from nerfstudio_gsloc.runs import load_run

        started = time.perf_counter()
        torch.set_num_threads(int(threads))
        _, self.pipeline = load_run(load_config)
        self.model = self.pipeline.model
        self.verifier = make_verifier(verifier_settings, self.model, self.pipeline)
        self.settings, self.seed, self.crash_marker = settings, int(seed), crash_marker
        self.localizers: Dict[str, Localizer] = {}
        self.units = 0
        self.load_seconds = time.perf_counter() - started
        self.machine = describe_machine(self.model.means.device)

    def run(self, unit: Unit):
        """Localize one unit: ``(key, results in order, {seconds, load_seconds, machine, notes})``."""
        if self.crash_marker:
            try:
                os.close(os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(1)  # the first worker here dies with its unit unfinished, once
            except FileExistsError:
                pass
        started, cpu_started = time.perf_counter(), time.process_time()
        if unit.method not in self.localizers:
            self.localizers[unit.method] = make_localizer(unit.method, self.settings[unit.method], self.model,
                                                          self.pipeline, seed=self.seed, verifier=self.verifier)
        localizer = self.localizers[unit.method]
        results = localize_from_initial_poses(localizer, unit.queries, unit.inits)
        self.units += 1
        return unit.key, results, {"seconds": time.perf_counter() - started, "load_seconds": self.load_seconds,
                                   "cpu_seconds": time.process_time() - cpu_started,
                                   "machine": self.machine, "notes": dict(localizer.notes)}


@dataclass
class WorkerStats:
    """What one actor did (a replacement of a dead actor gets its own entry)."""

    name: str
    machine: str = ""
    load_seconds: float = float("nan")
    units: int = 0
    queries: int = 0
    busy_seconds: float = 0.0
    cpu_seconds: float = 0.0
    died: bool = False

    @property
    def where(self) -> str:
        """Its machine, once a unit came back."""
        return self.machine or ("(died before its first unit)" if self.died else "(got no unit)")

    @property
    def rate(self) -> float:
        return self.queries / self.busy_seconds if self.busy_seconds > 0 else 0.0


@dataclass
class _Slot:
    actor: Any
    stats: WorkerStats


class RayPool:
    """Ray actors that localize units for a driver; use as a context manager (actors and a runtime it started are
    stopped at the end, also on Ctrl-C).

    Args:
        address: :data:`LOCAL` (start a runtime on this machine's cores, bound to 127.0.0.1) or a cluster address;
            an already initialised Ray (e.g. a test's) is used as it is.
        workers: number of actors (default: one per CPU Ray has, divided by ``threads``).
        threads: torch threads per worker (default: CPUs / workers, at least 1).
        load_config, settings, verifier_settings, seed: what every :class:`LocalizerWorker` is made with.
    """

    def __init__(self, address: str, workers: Optional[int], threads: Optional[int], load_config,
                 settings: Dict[str, LocalizerSettings], verifier_settings: LocalizerSettings, seed: int) -> None:
        if workers is not None and workers < 1:
            raise GslocError("--ray-workers must be at least 1")
        self.address, self.requested, self.threads = address, workers, threads
        self.worker_args = (str(load_config), settings, verifier_settings, int(seed))
        self.ray = import_ray(address)
        self.started_runtime = False
        self.slots: List[_Slot] = []
        self.retired: List[WorkerStats] = []
        self.retries = 0

    def __enter__(self) -> "RayPool":
        ray = self.ray
        if not ray.is_initialized():
            init_ray(self.address)
            self.started_runtime = True
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = self.threads or max(1, cpus // (self.requested or cpus))
        workers = self.requested or max(1, cpus // threads)
        self.threads = threads
        self.crash_marker = os.environ.get(CRASH_ENV) or None
        self.actor_class = ray.remote(LocalizerWorker).options(num_cpus=threads, max_restarts=0)
        self.slots = [_Slot(self._new_actor(), WorkerStats(f"w{i}")) for i in range(workers)]
        self.cpus = cpus
        return self

    def _new_actor(self):
        return self.actor_class.remote(*self.worker_args, self.threads, self.crash_marker)

    def __exit__(self, *exc) -> None:
        for slot in self.slots:
            self.ray.kill(slot.actor)
        if self.started_runtime:
            self.ray.shutdown()

    def localize(self, localizer: Localizer, method: str, queries: Sequence[Query], inits: Sequence[InitialPose],
                 on_result: Optional[Callable[[int, LocalizationResult], None]] = None) -> List[LocalizationResult]:
        """What ``localize_from_initial_poses(localizer, queries, inits, on_result)`` returns, computed by the
        workers unit by unit; ``on_result`` runs on the driver as units arrive. The workers' notes (e.g. a map's
        build time) are merged into ``localizer.notes``."""
        ray = self.ray
        localizer.prepare(queries)  # e.g. gsloc's self-test, cached beside the run, where every worker reads it
        units = plan_units(localizer, method, queries, inits)
        results: List[Optional[LocalizationResult]] = [None] * len(queries)
        queue: Deque[Unit] = collections.deque(units)
        attempts: Dict[int, int] = collections.Counter()
        done: set = set()
        queued: Dict[int, int] = collections.Counter()  # units sent to each slot's current actor, not yet back
        pending: Dict[Any, Any] = {}
        while queue or pending:
            for slot in self.slots:
                while queue and queued[id(slot)] < UNITS_QUEUED_PER_WORKER:
                    unit = queue.popleft()
                    pending[slot.actor.run.remote(unit)] = (slot, slot.actor, slot.stats, unit)
                    queued[id(slot)] += 1
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            slot, actor, stats, unit = pending.pop(ref)
            current = slot.actor is actor  # False: the reply of an actor that died and was replaced
            if current:
                queued[id(slot)] -= 1
            try:
                key, unit_results, info = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if getattr(err, "actor_init_failed", False):  # could not load the run: no use trying again
                    cause = [line for line in str(err).splitlines() if line.strip()][-1].strip()
                    raise GslocError(f"a Ray worker could not load {self.worker_args[0]}: {cause}") from None
                attempts[unit.key] += 1
                if attempts[unit.key] >= MAX_ATTEMPTS:
                    raise GslocError(f"a Ray worker died {MAX_ATTEMPTS} times on the same {len(unit.queries)} "
                                     f"queries (first {unit.queries[0].name}): {err}") from None
                self.retries += 1
                queue.appendleft(unit)
                if current:  # the first of the dead actor's units to come back: replace it (once)
                    stats.died = True
                    self.retired.append(stats)
                    slot.actor, slot.stats = self._new_actor(), WorkerStats(f"{slot.stats.name}'")
                    queued[id(slot)] = 0
                continue
            except ray.exceptions.RayTaskError as err:
                raise err.as_instanceof_cause() from None  # the method's own error, as in-process
            if key in done:  # a unit is used once, whatever happened to its worker
                continue
            done.add(key)
            stats.machine, stats.load_seconds = info["machine"], info["load_seconds"]
            stats.units += 1
            stats.queries += len(unit.queries)
            stats.busy_seconds += info["seconds"]
            stats.cpu_seconds += info["cpu_seconds"]
            localizer.notes.update(info["notes"])
            for position, result in zip(unit.positions, unit_results):
                results[position] = result
                if on_result is not None:
                    on_result(position, result)
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------------------------------------------
    # summary
    # ------------------------------------------------------------------------------------------------------

    def workers(self) -> List[WorkerStats]:
        """Every actor that ran, dead ones first."""
        return self.retired + [slot.stats for slot in self.slots]

    def header(self) -> str:
        where = "a local Ray runtime" if self.address == LOCAL else f"the Ray cluster at {self.address}"
        return (f"{len(self.slots)} Ray workers x {self.threads} torch threads on {where} ({self.cpus} CPUs)"
                + (f"; {self.retries} unit(s) retried after a worker died" if self.retries else ""))

    def lines(self, noun: str = "queries") -> List[str]:
        """Per worker one line: its machine beside its timings (for results.md / bench.json)."""
        return [f"Ray worker {w.name}{' (died)' if w.died else ''}: {w.queries} {noun} in {w.units} units, "
                f"{w.busy_seconds:.1f} s busy ({w.rate:.3f} {noun}/s, {w.cpu_seconds:.1f} s CPU), run loaded in {w.load_seconds:.1f} s, on "
                f"{w.where}" for w in self.workers()]

    def table(self, noun: str = "queries") -> Table:
        """The per-worker throughput summary (rich)."""
        table = Table(title=self.header())
        for column in ("worker", "units", noun, "busy s", "CPU s", f"{noun}/s", "load s", "machine"):
            table.add_column(column, justify="left" if column in ("worker", "machine") else "right")
        for w in self.workers():
            table.add_row(w.name + (" (died)" if w.died else ""), str(w.units), str(w.queries), f"{w.busy_seconds:.1f}",
                          f"{w.cpu_seconds:.1f}", f"{w.rate:.3f}", f"{w.load_seconds:.1f}", w.where)
        return table
