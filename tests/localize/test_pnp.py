"""The pnp localizer's geometric pieces on synthetic data (the whole method runs in test_localizers and test_bench)."""

from __future__ import annotations

import torch

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c
from nerfstudio_gsloc.localize.absolute_pose import refine_on_tight_inliers
from nerfstudio_gsloc.localize.pnp import _depth_edge_mask
from nerfstudio_gsloc.localize.pose import perturb_pose
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


def _project(points: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    w2c = opengl_c2w_to_opencv_w2c(c2w.double())
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    return (cam[:, :2] / cam[:, 2:]) * torch.stack([K[0, 0], K[1, 1]]) + torch.stack([K[0, 2], K[1, 2]])


def test_refinement_on_tight_inliers_ignores_outliers_and_recovers_the_pose():
    gen = torch.Generator().manual_seed(0)
    K = torch.tensor([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]], dtype=torch.float64)
    gt = torch.eye(4, dtype=torch.float64)[:3]  # OpenGL camera at the origin looking down -z
    points = torch.rand(300, 3, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0]) - torch.tensor([1.0, 1.0, 4.0])
    kpts = _project(points, gt, K) + 0.1 * torch.randn(300, 2, generator=gen, dtype=torch.float64)
    kpts[:60] += 20.0 * torch.randn(60, 2, generator=gen, dtype=torch.float64)  # 20 % gross outliers
    start = perturb_pose(gt[None], 0.5, 0.01, gen)[0]
    refined, inliers = refine_on_tight_inliers(points, kpts, K, start, px=2.0, min_inliers=12, rounds=3)
    assert 200 <= inliers <= 245
    assert float(rotation_error_deg(refined[None], gt[None])[0]) < 0.02
    assert float(translation_error(refined[None], gt[None])[0]) < 4e-3  # from 0.01 (depth is the weak axis)
    # Too few inliers at the threshold: the starting pose comes back unchanged.
    same, count = refine_on_tight_inliers(points[:10], kpts[:10], K, start, px=2.0, min_inliers=12, fallback_inliers=7)
    assert torch.equal(same, start) and count == 7


def test_depth_edge_mask_marks_discontinuities_only():
    depth = torch.full((8, 8), 2.0)
    depth[:, 4:] = 5.0  # a step between columns 3 and 4
    depth[0, 0] = 0.0  # missing depth
    edges = _depth_edge_mask(depth, 0.05)
    assert edges[:, 3].all() and edges[:, 4].all()
    assert not edges[2:, 1].any() and not edges[:, 6].any()
    assert edges[0, 1] and edges[1, 1]  # next to the missing pixel


def test_the_pnp_map_uses_the_protocols_camera_distance_scale():
    """PnPBaseline's prior-view distances are in the benchmark protocols' unit (one function for both); a capture
    whose training cameras all sit at the origin (rotation only) falls back to scene units instead of failing."""
    from nerfstudio_gsloc.localize.features import Features
    from nerfstudio_gsloc.localize.pnp import PnPBaseline, PnPLocalizerConfig
    from nerfstudio_gsloc.localize.retrieval import RetrievalIndex
    from nerfstudio_gsloc.localize.scene_map import MapView, camera_distance_scale

    def index(centres):
        views = []
        for centre in centres:
            c2w = torch.eye(4)[:3].clone()
            c2w[:, 3] = torch.tensor(centre)
            views.append(MapView(Features(torch.zeros(0, 2), torch.zeros(0, 128), torch.zeros(0)), torch.zeros(0, 3), c2w))
        return RetrievalIndex(views, torch.zeros(1, 128), torch.zeros(len(views), 128))

    centres = [(0.0, 0.0, 1.0), (0.0, 2.0, 0.0), (3.0, 0.0, 0.0), (0.0, 0.0, 4.0)]  # an even count: 2.5, not 2 or 3
    baseline = PnPBaseline(index(centres), PnPLocalizerConfig())
    assert baseline.camera_scale == camera_distance_scale(torch.stack([v.c2w for v in baseline.map])) == 2.5
    assert PnPBaseline(index([(0.0, 0.0, 0.0)] * 3), PnPLocalizerConfig()).camera_scale == 1.0
