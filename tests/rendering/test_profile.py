"""The stage profiler of scripts/profile_query.py charges forward and backward time to the right stages."""

from __future__ import annotations

import sys

import torch

from nerfstudio_gsloc.rendering import rasterization
from nerfstudio_gsloc.scripts.profile_query import StageProfiler
from nerfstudio_gsloc.scripts.render_bench import synthetic_scene


def test_stage_profiler_times_render_stages_and_uninstalls():
    scene = synthetic_scene(2000)
    Ks = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]])
    viewmats = torch.eye(4)[None].requires_grad_(True)
    rasterization_module = sys.modules["nerfstudio_gsloc.rendering.rasterization"]
    original = rasterization_module.rasterize_to_pixels
    profiler = StageProfiler()
    profiler.install()
    try:
        assert rasterization_module.rasterize_to_pixels is not original
        for _ in range(3):
            out, alpha, _ = rasterization(viewmats=viewmats, Ks=Ks, width=32, height=32, **scene)
            (out.sum() + alpha.sum()).backward()
    finally:
        profiler.uninstall()
    assert rasterization_module.rasterize_to_pixels is original
    assert torch.Tensor.backward.__name__ == "backward" and "profile" not in torch.Tensor.backward.__module__
    for stage in ("projection", "binning", "compositing"):
        assert profiler.calls[stage] == 3 and profiler.forward[stage] > 0, stage
    for stage in ("projection", "compositing"):
        assert profiler.backward[stage] > 0, stage
    assert profiler.backward.get("binning", 0.0) == 0.0  # no gradient through the tile lists
    stages = [row[0] for row in profiler.rows(1.0, 1.0, 3, "render")]
    assert [s for s in stages if s in ("projection", "binning", "compositing")] == ["projection", "binning", "compositing"]
    assert stages[-1] == "total wall-clock per render"


def test_stage_profiler_charges_nothing_while_disabled():
    """Work outside the profiled window (a localizer's set-up before its queries) is not charged to any stage:
    the per-query totals do not contain it either, and charging it made "other" negative."""
    scene = synthetic_scene(500)
    Ks = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]])
    profiler = StageProfiler(enabled=False)
    profiler.install()
    try:
        with torch.no_grad():
            rasterization(viewmats=torch.eye(4)[None], Ks=Ks, width=32, height=32, **scene)
            assert not profiler.calls and not profiler.forward
            profiler.enabled = True
            rasterization(viewmats=torch.eye(4)[None], Ks=Ks, width=32, height=32, **scene)
    finally:
        profiler.uninstall()
    assert profiler.calls["compositing"] == 1 and profiler.forward["compositing"] > 0
