"""Where the time of a localization query (or of a training step) goes, stage by stage.

Two modes::

    # every ns-localize option after `--`; the profile covers Localizer.localize (not loading the run)
    python -m nerfstudio_gsloc.scripts.profile_query query -- --load-config RUN/config.yml \\
        --max-queries 5 --num-threads 1 --output-dir /tmp/profile-loc [--method pnp] [--preset fast]

    # a few ns-train gsloc steps on the run's training images, starting from its checkpoint
    python -m nerfstudio_gsloc.scripts.profile_query train --load-config RUN/config.yml --steps 10

How: the functions of each stage (projection, SH colours, binning, compositing, feature detection and
matching, PnP, each loss) are wrapped with timers while the real code runs. Forward time is exclusive (a
stage called inside another is charged to the inner one). Backward time is charged per autograd node: every
node created while a stage ran (found by its autograd sequence number) is timed by node hooks during
``backward()``. What no stage claims (Python glue, Adam steps, trace bookkeeping, the autograd engine itself)
is reported as "other". Times are process CPU time, which a busy shared machine disturbs much less than
wall-clock time (with one thread they agree on an idle machine); the wall-clock total is printed too. The
timers cost a few microseconds per call and per autograd node.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from rich.console import Console
from rich.table import Table

CONSOLE = Console(width=120)

# (module, attribute, stage): what is timed. Methods are given as "Class.method".
TARGETS: Tuple[Tuple[str, str, str], ...] = (
    ("nerfstudio_gsloc.rendering.projection", "project_gaussians_fused", "projection"),
    ("nerfstudio_gsloc.rendering.projection", "project_gaussians", "projection"),
    ("nerfstudio_gsloc.rendering.projection", "quat_scale_to_covariance", "projection"),
    ("nerfstudio_gsloc.rendering.rasterization", "_features_per_camera", "SH colours"),
    ("nerfstudio_gsloc.rendering.tiles", "intersect_tiles", "binning"),
    ("nerfstudio_gsloc.rendering.rasterize_to_pixels", "rasterize_to_pixels", "compositing"),
    ("nerfstudio_gsloc.rendering.rasterization", "rasterization", "render glue"),
    ("nerfstudio_gsloc.rendering.splat_render", "rasterize_splat_model", "render glue"),
    ("nerfstudio_gsloc.rendering.splat_render", "render_splat_model", "render glue"),
    ("nerfstudio_gsloc.localize.features", "SiftFeatures.detect", "feature detection"),
    ("nerfstudio_gsloc.localize.matching", "SiftMatcher._detect", "feature detection"),
    ("nerfstudio_gsloc.localize.matching", "DiskLightGlueMatcher._detect", "feature detection"),
    ("nerfstudio_gsloc.localize.features", "SiftFeatures.match", "feature matching"),
    ("nerfstudio_gsloc.localize.matching", "SiftMatcher.match", "feature matching"),
    ("nerfstudio_gsloc.localize.matching", "DiskLightGlueMatcher.match", "feature matching"),
    ("nerfstudio_gsloc.localize.matching", "LoftrMatcher.match", "feature matching"),
    ("nerfstudio_gsloc.localize.absolute_pose", "lift_keypoints", "feature matching"),
    ("nerfstudio_gsloc.localize.absolute_pose", "pnp_ransac", "PnP"),
    ("nerfstudio_gsloc.localize.absolute_pose", "refine_on_tight_inliers", "PnP"),
    ("nerfstudio_gsloc.localize.losses", "photometric_loss", "photometric loss (L1+SSIM)"),
    ("nerfstudio_gsloc.localize.losses", "depth_loss", "depth loss"),
    ("nerfstudio_gsloc.localize.losses", "reprojection_loss", "reprojection loss"),
    ("nerfstudio_gsloc.model", "GSLocModel.get_loss_dict", "training loss (L1+SSIM)"),
)
STAGE_ORDER = (
    "projection", "SH colours", "binning", "compositing", "render glue", "feature detection", "feature matching",
    "PnP", "photometric loss (L1+SSIM)", "depth loss", "reprojection loss", "training loss (L1+SSIM)",
)


def _sequence_nr() -> int:
    """The autograd sequence number the next node created on this thread gets (this probe takes one)."""
    probe = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        return (probe * 1.0).grad_fn._sequence_nr() + 1


@dataclass
class StageProfiler:
    """Exclusive forward CPU time per stage, and backward CPU time per stage through autograd node hooks."""

    forward: Dict[str, float] = field(default_factory=lambda: defaultdict(float))
    backward: Dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    intervals: List[Tuple[int, int, str]] = field(default_factory=list)  # (first, last) sequence numbers per call
    stack: List[List] = field(default_factory=list)  # [stage, start of the running slice]
    restore: List[Tuple[object, str, object]] = field(default_factory=list)
    enabled: bool = True
    """Stages run while this is False (set-up outside the profiled window, e.g. the map of training photos a
    localizer builds before its queries) are not charged: the per-query totals do not contain them either."""

    def wrap(self, fn: Callable, stage: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            now = time.process_time()
            if self.stack:
                parent = self.stack[-1]
                self.forward[parent[0]] += now - parent[1]
            first = _sequence_nr() if torch.is_grad_enabled() else None
            self.stack.append([stage, time.process_time()])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.process_time()
                self.forward[stage] += end - self.stack.pop()[1]
                self.calls[stage] += 1
                if first is not None:
                    self.intervals.append((first, _sequence_nr(), stage))
                if self.stack:
                    self.stack[-1][1] = time.process_time()

        return timed

    def install(self, targets: Sequence[Tuple[str, str, str]] = TARGETS) -> None:
        """Wrap every target, in its own module and wherever another gsloc module imported it by name."""
        import importlib

        for module_name, attr, stage in targets:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            owner, name = module, attr
            if "." in attr:
                cls_name, name = attr.split(".")
                owner = getattr(module, cls_name, None)
                if owner is None:
                    continue
            original = getattr(owner, name, None)
            if original is None:
                continue
            wrapped = self.wrap(original, stage)
            self._replace(owner, name, original, wrapped)
            if owner is module:
                for other in list(sys.modules.values()):
                    if other is not module and getattr(other, "__name__", "").startswith("nerfstudio_gsloc"):
                        for key, value in list(vars(other).items()):
                            if value is original:
                                self._replace(other, key, original, wrapped)
        self._wrap_backward()

    def _replace(self, owner, name, original, wrapped) -> None:
        setattr(owner, name, wrapped)
        self.restore.append((owner, name, original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.restore):
            setattr(owner, name, original)
        self.restore.clear()

    def stage_of(self, seq: int) -> str:
        best, best_first = "other", -1
        for first, last, stage in self.intervals:
            if first <= seq <= last and first > best_first:  # the innermost call holding the node
                best, best_first = stage, first
        return best

    def _hook_graph(self, roots: Sequence[torch.Tensor]) -> None:
        """Time every node of the graph behind ``roots`` during the coming backward pass."""
        seen, todo = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
        starts: Dict[int, float] = {}
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            todo.extend(next_node for next_node, _ in node.next_functions)
            stage = self.stage_of(node._sequence_nr())
            if stage == "other":
                continue

            def pre(grad_outputs, key=id(node)):
                starts[key] = time.process_time()

            def post(grad_inputs, grad_outputs, key=id(node), stage=stage):
                self.backward[stage] += time.process_time() - starts.pop(key, time.process_time())

            node.register_prehook(pre)
            node.register_hook(post)

    def _wrap_backward(self) -> None:
        original_backward = torch.Tensor.backward
        profiler = self

        def backward(tensor, *args, **kwargs):
            profiler._hook_graph([tensor])
            start = time.process_time()
            try:
                return original_backward(tensor, *args, **kwargs)
            finally:
                profiler.backward["(all backward)"] += time.process_time() - start
                profiler.intervals = [iv for iv in profiler.intervals if iv[1] >= _sequence_nr() - 10**6]

        self._replace(torch.Tensor, "backward", original_backward, backward)

    def rows(self, total_cpu: float, total_wall: float, per: int, unit: str) -> List[Tuple[str, ...]]:
        """(stage, forward ms, backward ms, total ms, share, calls) per ``unit`` (``per`` of them in the totals)."""
        scale = 1000.0 / max(per, 1)
        rows, claimed = [], 0.0
        for stage in STAGE_ORDER:
            fwd, bwd = self.forward.get(stage, 0.0), self.backward.get(stage, 0.0)
            if fwd == 0 and bwd == 0:
                continue
            claimed += fwd + bwd
            rows.append((stage, f"{fwd * scale:.1f}", f"{bwd * scale:.1f}", f"{(fwd + bwd) * scale:.1f}",
                         f"{100 * (fwd + bwd) / total_cpu:.0f}%", f"{self.calls[stage] / max(per, 1):.1f}"))
        other = total_cpu - claimed
        rows.append(("other (Python, optimiser, autograd engine)", "", "", f"{other * scale:.1f}",
                     f"{100 * other / total_cpu:.0f}%", ""))
        rows.append((f"total CPU per {unit}", "", "", f"{total_cpu * scale:.1f}", "100%", ""))
        rows.append((f"total wall-clock per {unit}", "", "", f"{total_wall * scale:.1f}", "", ""))
        return rows

    def print(self, title: str, total_cpu: float, total_wall: float, per: int, unit: str) -> None:
        """The table on the console, then the same as Markdown (for the README)."""
        header = ("stage", "forward ms", "backward ms", "total ms", "share", "calls")
        rows = self.rows(total_cpu, total_wall, per, unit)
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="right" if col != "stage" else "left")
        for row in rows:
            table.add_row(*row)
        CONSOLE.print(table)
        print("\n" + title + "\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


def profile_query(argv: Sequence[str]) -> None:
    """Run ns-localize with ``argv`` and print the per-query profile of its Localizer.localize calls."""
    from nerfstudio_gsloc.localize import localizer as localizer_module
    from nerfstudio_gsloc.scripts import localize as localize_script

    profiler = StageProfiler(enabled=False)  # charged only inside Localizer.localize, like the totals
    totals = {"cpu": 0.0, "wall": 0.0, "queries": 0}
    original = localizer_module.Localizer.localize

    def timed_localize(self, queries, *args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        profiler.enabled = True
        try:
            return original(self, queries, *args, **kwargs)
        finally:
            profiler.enabled = False
            totals["cpu"] += time.process_time() - cpu
            totals["wall"] += time.perf_counter() - wall
            totals["queries"] += len(queries)

    localizer_module.Localizer.localize = timed_localize
    profiler.install()
    try:
        localize_script.main(list(argv))
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        profiler.uninstall()
        localizer_module.Localizer.localize = original
    if not totals["queries"]:
        raise SystemExit("no query was localized")
    title = f"one query: {totals['queries']} queries, {torch.get_num_threads()} thread(s), CPU ms per query"
    profiler.print(title, totals["cpu"], totals["wall"], totals["queries"], "query")


def profile_train(load_config: str, steps: int, num_threads: Optional[int]) -> None:
    """Time ``steps`` training steps (loss, backward, optimiser step; no densification callbacks)."""
    import functools as ft
    from pathlib import Path

    from nerfstudio.engine.optimizers import Optimizers

    from nerfstudio_gsloc.runs import load_run

    if num_threads:
        torch.set_num_threads(num_threads)
    config, pipeline = load_run(Path(load_config), test_mode="val")
    pipeline.train()
    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())
    start_step = int(getattr(pipeline.model, "step", 0))
    profiler = StageProfiler()

    def one_step(step: int) -> None:
        pipeline.model.step_cb(optimizers, step)  # what the trainer's callback does before every step
        optimizers.zero_grad_all()
        _, loss_dict, _ = pipeline.get_train_loss_dict(step=step)
        loss = ft.reduce(torch.add, loss_dict.values())
        loss.backward()
        optimizers.optimizer_step_all()

    one_step(start_step)  # warm-up (extension load, caches)
    profiler.install()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        for i in range(steps):
            one_step(start_step + 1 + i)
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        profiler.uninstall()
    num = pipeline.model.num_points if hasattr(pipeline.model, "num_points") else pipeline.model.means.shape[0]
    title = f"one training step: {steps} steps, {num:,} Gaussians, {torch.get_num_threads()} thread(s), CPU ms per step"
    profiler.print(title, cpu, wall, steps, "step")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("query", "train"):
        raise SystemExit(__doc__)
    if argv[0] == "query":
        rest = argv[1:]
        profile_query(rest[1:] if rest[:1] == ["--"] else rest)
        return
    import argparse

    parser = argparse.ArgumentParser(prog="profile_query train")
    parser.add_argument("--load-config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv[1:])
    profile_train(args.load_config, args.steps, args.num_threads)


if __name__ == "__main__":
    main()
