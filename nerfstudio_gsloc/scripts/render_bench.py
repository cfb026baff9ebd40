"""Render benchmark of the CPU rasterizer: `gsloc-render-bench`.

Prints a table of median milliseconds for a forward render and for forward + backward to the view matrix
(what pose refinement does every iteration), for several image sizes and Gaussian counts, with the peak
resident memory growth of each case. Besides wall-clock time it prints the process CPU time of forward +
backward, which a busy shared machine disturbs much less (with ``--threads 1`` the two agree on an idle one). The synthetic scene is a slab of random Gaussians in front of the
camera whose footprints are 0.5 to 3 pixels at 128 px (like a trained scene seen at that resolution).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
import tyro
from rich.console import Console
from rich.table import Table

from nerfstudio_gsloc.errors import GslocError, run_cli
from nerfstudio_gsloc.rendering import rasterization
from nerfstudio_gsloc.rendering.rasterize_to_pixels import load_cpu_extension

CONSOLE = Console()


def synthetic_scene(num_gaussians: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Gaussians in a 2 x 2 x 1 slab, 2.5 to 3.5 units in front of a camera at the origin."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(num_gaussians, 3, generator=gen) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([-1.0, -1.0, 2.5])
    return {
        "means": means,
        "quats": torch.randn(num_gaussians, 4, generator=gen),
        "scales": torch.exp(torch.empty(num_gaussians, 3).uniform_(-5.0, -3.5, generator=gen)),
        "opacities": torch.rand(num_gaussians, generator=gen) * 0.8 + 0.1,
        "colors": torch.rand(num_gaussians, 3, generator=gen),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class RenderBench:
    """Time the CPU rasterizer."""

    sizes: tuple[int, ...] = (64, 128, 256)
    """Square image sizes in pixels."""
    counts: tuple[int, ...] = (10_000, 50_000, 200_000)
    """Numbers of Gaussians."""
    repeats: int = 7
    """Timed repetitions per case (after one warm-up); the median is reported."""
    threads: int = 2
    """torch.set_num_threads for the run."""
    render_mode: str = "RGB+ED"
    """What is rendered (localization renders colour and expected depth)."""
    only: list[str] = field(default_factory=list)
    """Optional subset of cases as SIZExCOUNT, e.g. 128x50000."""

    def main(self) -> None:
        if self.repeats < 1 or self.threads < 1:
            raise GslocError("--repeats and --threads must be at least 1")
        torch.set_num_threads(self.threads)
        backend = "C++ kernel" if load_cpu_extension() is not None else "PyTorch fallback"
        table = Table(title=f"CPU rasterizer ({backend}, {self.threads} threads, {self.render_mode})")
        for col in ("size", "Gaussians", "forward ms", "fwd+bwd(viewmat) ms", "fwd+bwd CPU ms", "intersections", "peak RSS MB"):
            table.add_column(col, justify="right")
        for size in self.sizes:
            for count in self.counts:
                if self.only and f"{size}x{count}" not in self.only:
                    continue
                fwd, fwd_bwd, cpu, isects = self._time_case(size, count)
                row = (f"{fwd:.1f}", f"{fwd_bwd:.1f}", f"{cpu:.1f}", f"{isects:,}", f"{_peak_rss_mb():.0f}")
                table.add_row(str(size), f"{count:,}", *row)
                CONSOLE.print(f"{size}x{size} {count:>7,}: forward {fwd:7.1f} ms, fwd+bwd {fwd_bwd:7.1f} ms (CPU {cpu:7.1f} ms)")
        CONSOLE.print(table)

    def _time_case(self, size: int, count: int) -> tuple[float, float, float, int]:
        scene = synthetic_scene(count)
        focal = 1.1 * size
        Ks = torch.tensor([[[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]]])
        base_view = torch.eye(4)[None]

        def run(backward: bool) -> tuple[float, float, int]:
            viewmats = base_view.clone().requires_grad_(backward)
            start, start_cpu = time.perf_counter(), time.process_time()
            out, alpha, meta = rasterization(
                viewmats=viewmats, Ks=Ks, width=size, height=size, render_mode=self.render_mode, **scene
            )
            if backward:
                (out.sum() + alpha.sum()).backward()
            return (time.perf_counter() - start) * 1000.0, (time.process_time() - start_cpu) * 1000.0, int(meta["flatten_ids"].numel())

        results = {}
        for backward in (False, True):
            run(backward)  # warm-up
            times = [run(backward)[:2] for _ in range(self.repeats)]
            results[backward] = statistics.median(t[0] for t in times)
            cpu = statistics.median(t[1] for t in times)
        return results[False], results[True], cpu, run(False)[2]


def entrypoint() -> None:
    """Console script `gsloc-render-bench`."""
    run_cli(tyro.cli(RenderBench).main)


if __name__ == "__main__":
    entrypoint()
