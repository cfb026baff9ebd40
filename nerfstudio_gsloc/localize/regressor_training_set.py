"""The regressor's training data: views with their ground truth on the network's output grid.

:func:`build_training_set` takes the run's training photos at their poses, and views *rendered* from the
Gaussian scene at poses around the training cameras (:func:`~nerfstudio_gsloc.localize.scene_map.jittered_poses`:
orbited about the looked-at point, moved closer or farther, rolled; optionally a share of them between
neighbouring cameras, :func:`~nerfstudio_gsloc.localize.scene_map.between_poses`). For every view the scene also
renders its depth and opacity on the network's output grid (a render at grid resolution samples exactly the cell
centres), which gives each cell's ground-truth camera-frame and scene-frame point. :func:`augment` (brightness,
contrast, per-channel gain, noise) keeps the real photos from being out of distribution for a network that mostly
sees renders.

Poses: OpenCV camera-to-world ``[R | t]`` (x right, y down, z forward) in :class:`TrainingSet`; the views and the
scene keep nerfstudio's OpenGL camera-to-world convention and are converted with
:mod:`nerfstudio_gsloc.camera_conventions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_c2w
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.regressor import STRIDE, RegressorNetConfig, grid_rays, grid_size, resize_image
from nerfstudio_gsloc.localize.regressor_settings import RegressorTrainConfig
from nerfstudio_gsloc.localize.scene_map import TrainingView, between_poses, jittered_poses
from nerfstudio_gsloc.rendering import render_splat_model


@dataclass
class TrainingSet:
    """Views with their ground truth on the network's grid (``V`` views, grid ``h x w``).

    Attributes:
        images: ``[V, 3, H_in, W_in]`` uint8 network inputs.
        cam_points: ``[V, h, w, 3]`` OpenCV camera-frame points of the grid cells.
        scene_points: ``[V, h, w, 3]`` the same points in the scene frame.
        valid: ``[V, h, w]`` bool, cells that hit the scene.
        c2w_cv: ``[V, 3, 4]`` OpenCV camera-to-world poses.
        rays: ``[V, h, w, 3]`` OpenCV rays (``z = 1``) of the cells.
        real: ``[V]`` bool, real training photos.
    """

    images: Tensor
    cam_points: Tensor
    scene_points: Tensor
    valid: Tensor
    c2w_cv: Tensor
    rays: Tensor
    real: Tensor


def input_shape(width: int, height: int, input_size: int) -> Tuple[int, int]:
    """``(H_in, W_in)``: the long side ``input_size``, aspect kept, both multiples of :data:`STRIDE`."""
    scale = input_size / max(width, height)
    return (max(STRIDE, int(round(height * scale / STRIDE)) * STRIDE),
            max(STRIDE, int(round(width * scale / STRIDE)) * STRIDE))


def _grid_truth(model, c2w: Tensor, K: Tensor, width: int, height: int, grid: Tuple[int, int], alpha_threshold: float,
                background_tolerance: float):
    """Render depth/opacity/colour of ``c2w [B, 3, 4]`` on the grid; returns cam points, scene points, valid, rays,
    c2w_cv (see :class:`TrainingSet`)."""
    h, w = grid
    scale = torch.tensor([w / width, h / height, 1.0])[:, None]
    K_grid = K * scale  # pixel centres of the grid render are the cell centres
    with torch.no_grad():
        rendered = render_splat_model(model, c2w, K_grid, w, h)
    depth, alpha = rendered.depth[..., 0].cpu().float(), rendered.alpha[..., 0].cpu().float()
    # A cell that renders as the background colour shows nothing to localize by; on object scenes trained against
    # white, Gaussians painted white behind the object are opaque there and would give it far, arbitrary points.
    background = getattr(model, "background_color", None)
    blank = torch.zeros_like(alpha, dtype=torch.bool)
    if background is not None and background_tolerance > 0:
        blank = ((rendered.rgb.cpu().float() - background.cpu().float()).abs() <= background_tolerance).all(dim=-1)
    rays = torch.stack([grid_rays(K[b], width, height, grid)[1] for b in range(c2w.shape[0])])
    cam = depth[..., None] * rays
    c2w_cv = opengl_c2w_to_opencv_c2w(c2w.cpu().float())[:, :3, :4]
    scene = torch.einsum("bij,bhwj->bhwi", c2w_cv[:, :, :3], cam) + c2w_cv[:, None, None, :, 3]
    valid = (alpha > alpha_threshold) & (depth > 0) & ~blank
    return cam, scene, valid, rays, c2w_cv


def build_training_set(model, views: Sequence[TrainingView], config: RegressorTrainConfig,
                       on_progress: Optional[Callable[[int, int], None]] = None, chunk: int = 8) -> Tuple[TrainingSet, RegressorNetConfig]:
    """Training photos plus ``config.rendered_views`` renders around them, with ground truth on the grid.

    Args:
        model: the trained Gaussian scene (renders depth, opacity and the rendered views' colours).
        views: the training photos (``[H, W, 3]`` images, ``K``, OpenGL ``c2w`` in the scene frame).
        config: settings.
        on_progress: called with ``(done, total)`` views.

    Returns:
        the :class:`TrainingSet` and the network config (input size, scene normalisation from the photos).
    """
    if not views:
        raise GslocError("the run has no training views to train the regressor on")
    height, width = views[0].image.shape[:2]
    in_h, in_w = input_shape(width, height, config.input_size)
    net_config = RegressorNetConfig(input_height=in_h, input_width=in_w, channels=tuple(config.channels),
                                    architecture=config.architecture)
    grid = grid_size(net_config)
    total = len(views) + config.rendered_views
    parts: Dict[str, List[Tensor]] = {k: [] for k in ("images", "cam", "scene", "valid", "c2w", "rays", "real")}

    def add(images: Tensor, c2w: Tensor, K: Tensor, w: int, h: int, real: bool) -> None:
        cam, scene, valid, rays, c2w_cv = _grid_truth(model, c2w, K, w, h, grid, config.alpha_threshold,
                                                      config.background_tolerance)
        parts["images"].append((resize_image(images, in_h, in_w) * 255).round().to(torch.uint8))
        for key, value in (("cam", cam), ("scene", scene), ("valid", valid), ("c2w", c2w_cv), ("rays", rays)):
            parts[key].append(value)
        parts["real"].append(torch.full((c2w.shape[0],), real))
        if on_progress is not None:
            on_progress(sum(len(r) for r in parts["real"]), total)

    for start in range(0, len(views), chunk):
        batch = views[start:start + chunk]
        h, w = batch[0].image.shape[:2]
        if any(v.image.shape[:2] != (h, w) for v in batch):
            raise GslocError("the regressor needs training images of one size")
        add(torch.stack([v.image for v in batch]), torch.stack([v.c2w[:3, :4] for v in batch]),
            torch.stack([v.K for v in batch]), w, h, True)
    real_depth = torch.cat(parts["cam"])[..., 2][torch.cat(parts["valid"])]
    real_scene = torch.cat(parts["scene"])[torch.cat(parts["valid"])]
    if real_depth.numel() < 3:
        raise GslocError("the scene renders (almost) nothing at the training poses: cannot train the regressor")
    center = real_scene.mean(dim=0)
    net_config.center = tuple(float(c) for c in center)
    net_config.scale = float((real_scene - center).norm(dim=-1).pow(2).mean().sqrt())
    net_config.depth_ref = float(real_depth.median())
    net_config.focal_input = float(views[0].K[0, 0]) * in_w / width

    if config.rendered_views > 0:
        generator = torch.Generator().manual_seed(config.seed)
        c2w = torch.stack([v.c2w[:3, :4] for v in views])
        per_view_depth = torch.stack([
            c[..., 2][m].median() if m.any() else torch.tensor(0.0) for c, m in zip(torch.cat(parts["cam"]), torch.cat(parts["valid"]))])
        num_between = round(config.rendered_views * config.between_fraction)
        num_jittered = config.rendered_views - num_between
        per_camera = math.ceil(num_jittered / len(views))
        poses, parents = jittered_poses(c2w, per_view_depth, per_camera, config.orbit_deg, config.distance_range,
                                        config.roll_deg, generator)
        pick = torch.randperm(poses.shape[0], generator=generator)[:num_jittered].sort().values
        between, between_parents = between_poses(c2w, per_view_depth, num_between, config.between_neighbours,
                                                 config.between_overshoot, generator)
        poses, parents = torch.cat([poses[pick], between]), torch.cat([parents[pick], between_parents])
        for start in range(0, poses.shape[0], chunk):
            c2w_b, parent = poses[start:start + chunk], parents[start:start + chunk]
            K = torch.stack([views[int(p)].K for p in parent])
            with torch.no_grad():
                rgb = render_splat_model(model, c2w_b, K, width, height).rgb.cpu().float()
            add(rgb, c2w_b, K, width, height, False)
    data = TrainingSet(torch.cat(parts["images"]), torch.cat(parts["cam"]), torch.cat(parts["scene"]),
                       torch.cat(parts["valid"]), torch.cat(parts["c2w"]), torch.cat(parts["rays"]),
                       torch.cat(parts["real"]))
    return data, net_config


def augment(images: Tensor, config: RegressorTrainConfig, generator: torch.Generator) -> Tensor:
    """Photometric augmentation of ``[B, 3, H, W]`` images in ``[0, 1]`` (brightness, contrast, gain, noise)."""
    b = images.shape[0]

    def factor(strength: float, *shape: int) -> Tensor:
        return 1.0 + strength * (2.0 * torch.rand(b, *shape, generator=generator) - 1.0)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * factor(config.contrast, 1, 1, 1) + mean
    out = out * factor(config.brightness, 1, 1, 1) * factor(config.channel_gain, 3, 1, 1)
    out = out + config.noise * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)
