"""Fixtures of the localization tests: the embedded scene, a Gaussian model fitted directly to it, a trained run.

``point_splat`` is a Gaussian model made without training: every pixel of a few RGB-D training views becomes
one small isotropic Gaussian at its back-projected depth, with the pixel's colour (an exact fit of those
views, good enough to localize nearby views). It is a plain ``nn.Module`` with splatfacto's parameter names,
so ``render_splat_model`` and the optimiser treat it like a trained model. Its frame is the dataset's
original frame (no dataparser normalisation).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c, rigid_inverse

SCENE_VIEWS, SCENE_WIDTH, SCENE_HEIGHT = 24, 64, 48
QUERY_VIEWS, QUERY_WIDTH, QUERY_HEIGHT = 3, 56, 42
#: Training steps of the small gsloc run (about 30 s on 2 cores; fewer make its accuracy depend on the seed).
SMALL_RUN_ITERATIONS = 250


class PointSplat(nn.Module):
    """Splatfacto-named Gaussians: ``means [N,3]``, log ``scales [N,3]``, ``quats [N,4]``, logit ``opacities [N,1]``,
    ``features_dc [N,3]`` (colour logits, ``sh_degree`` 0) and empty ``features_rest [N,0,3]``."""

    def __init__(self, means: torch.Tensor, colors: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__()
        num = means.shape[0]
        self.means = nn.Parameter(means.float())
        self.scales = nn.Parameter(torch.log(sigmas.float())[:, None].repeat(1, 3))
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(num, 1))
        self.opacities = nn.Parameter(torch.full((num, 1), 4.0))
        colors = colors.float().clamp(1e-3, 1.0 - 1e-3)
        self.features_dc = nn.Parameter(torch.log(colors / (1.0 - colors)))
        self.features_rest = nn.Parameter(torch.zeros(num, 0, 3))
        self.config = SimpleNamespace(sh_degree=0, rasterize_mode="classic")
        self.background_color = torch.zeros(3)


def point_splat_from_views(rgb, depth, K, c2w, size_factor: float = 0.5) -> PointSplat:
    """One Gaussian per valid pixel of ``rgb [V,H,W,3]`` / ``depth [V,H,W]`` seen with ``K [V,3,3]``, ``c2w [V,3,4]``."""
    means, colors, sigmas = [], [], []
    for i in range(rgb.shape[0]):
        height, width = depth[i].shape
        v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        z = depth[i]
        valid = z > 0
        cam = torch.stack([(u - K[i, 0, 2]) / K[i, 0, 0] * z, (v - K[i, 1, 2]) / K[i, 1, 1] * z, z], dim=-1)[valid]
        c2w_cv = rigid_inverse(opengl_c2w_to_opencv_w2c(c2w[i]))
        means.append(cam @ c2w_cv[:3, :3].T + c2w_cv[:3, 3])
        colors.append(rgb[i][valid])
        sigmas.append(z[valid] / K[i, 0, 0] * size_factor)  # about half a pixel footprint
    return PointSplat(torch.cat(means), torch.cat(colors), torch.cat(sigmas))


def read_views(transforms: Path, names=None):
    """RGB ``[V,H,W,3]``, depth in metres ``[V,H,W]``, ``K [V,3,3]`` and ``c2w [V,3,4]`` of a scene's frames."""
    meta = json.loads(Path(transforms).read_text())
    root = Path(transforms).parent
    frames = [f for f in meta["frames"] if names is None or f["file_path"] in names]
    rgb, depth, K, c2w = [], [], [], []
    for frame in frames:
        get = lambda key: frame.get(key, meta.get(key))  # noqa: E731
        rgb.append(torch.from_numpy(np.array(Image.open(root / frame["file_path"]).convert("RGB"))).float() / 255.0)
        depth.append(torch.from_numpy(np.array(Image.open(root / frame["depth_file_path"])).astype(np.float32)) * 1e-3)
        K.append(torch.tensor([[get("fl_x"), 0.0, get("cx")], [0.0, get("fl_y"), get("cy")], [0.0, 0.0, 1.0]]))
        c2w.append(torch.tensor(frame["transform_matrix"])[:3])
    return torch.stack(rgb), torch.stack(depth), torch.stack(K).float(), torch.stack(c2w).float()


@pytest.fixture(scope="session")
def embedded_scene(tmp_path_factory):
    """The embedded procedural scene (small) and a set of novel query views of another image size.

    Returns:
        ``SimpleNamespace(dataset=<transforms.json>, queries=<transforms.json>)``.
    """
    from nerfstudio_gsloc.data.procedural_scene import generate_scene, write_query_set

    root = tmp_path_factory.mktemp("embedded_scene")
    dataset = generate_scene(root / "scene", seed=0, num_views=SCENE_VIEWS, width=SCENE_WIDTH, height=SCENE_HEIGHT,
                             show_progress=False)
    queries = write_query_set(root / "queries", seed=1, num_views=QUERY_VIEWS, width=QUERY_WIDTH, height=QUERY_HEIGHT,
                              show_progress=False)
    return SimpleNamespace(dataset=dataset, queries=queries)


@pytest.fixture(scope="session")
def point_splat_views(embedded_scene):
    """The training views the point splat is made of: RGB ``[V,H,W,3]``, depth ``[V,H,W]``, ``K``, ``c2w``."""
    meta = json.loads(Path(embedded_scene.dataset).read_text())
    return read_views(embedded_scene.dataset, set(meta["train_filenames"][::2]))


@pytest.fixture(scope="session")
def point_splat(point_splat_views):
    """A :class:`PointSplat` of the scene's training views (original frame)."""
    return point_splat_from_views(*point_splat_views)


@pytest.fixture(scope="session")
def rendered_queries(point_splat, embedded_scene):
    """The novel query views re-rendered from the point splat itself (colour and depth), so that the objective's
    optimum is exactly the ground-truth pose and the test measures the solver, not the model."""
    from nerfstudio_gsloc.localize.queries import FrameTransform, load_transforms_queries
    from nerfstudio_gsloc.rendering.splat_render import render_splat_model

    queries = load_transforms_queries(embedded_scene.queries, FrameTransform.identity())
    out = []
    for query in queries:
        with torch.no_grad():
            views = render_splat_model(point_splat, query.gt_c2w[None], query.K[None], query.width, query.height)
        out.append(dataclasses.replace(query, image=views.rgb[0].clamp(0, 1), depth=views.depth[0, ..., 0]))
    return out


@pytest.fixture(scope="session")
def small_gsloc_run(tmp_path_factory, embedded_scene):
    """``config.yml`` of a gsloc run trained briefly on the embedded scene (its eval split: 3 views)."""
    from nerfstudio_gsloc.training import TrainPreset, gsloc_run_config, train

    preset = TrainPreset(iterations=SMALL_RUN_ITERATIONS, compress_schedule=True)
    return train(gsloc_run_config(Path(embedded_scene.dataset).parent, tmp_path_factory.mktemp("gsloc_run"), preset, "scene", "test", show_progress=False))


def _refine_only_config(iterations: int = 8, depth: bool = False, **optim):
    """gsloc's config reduced to its full-resolution refinement level (no matcher, no coarse levels; fast), with
    ``optim`` fields overridden."""
    from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig

    config = PoseInversionConfig()
    config.losses.matching = False
    config.losses.depth = depth
    config.schedule.pyramid_scales = (1,)
    config.schedule.pyramid_iterations = (iterations,)
    config.schedule.refine_matching_weight = ()
    for key, value in optim.items():
        setattr(config.optim, key, value)
    return config


@pytest.fixture
def refine_only():
    """``refine_only(iterations=8, depth=False, **optim) -> PoseInversionConfig`` (see :func:`_refine_only_config`)."""
    return _refine_only_config
