"""Training the scene regressor (:mod:`~nerfstudio_gsloc.localize.regressor`) from a trained Gaussian scene.

Data (:func:`build_training_set`): the run's training photos at their poses, and views *rendered* from the
Gaussian scene at poses around the training cameras (:func:`~nerfstudio_gsloc.localize.scene_map.jittered_poses`:
orbited about the looked-at point, moved closer or farther, rolled; optionally a share of them between
neighbouring cameras, :func:`~nerfstudio_gsloc.localize.scene_map.between_poses`). For every view the scene also
renders its depth and opacity on the network's output grid (a render at grid resolution samples exactly the cell
centres), which gives each cell's ground-truth camera-frame and scene-frame point. Photometric augmentation
(brightness, contrast, per-channel gain, noise) keeps the real photos from being out of distribution for a network
that mostly sees renders.

Losses of one batch (cells with opacity above ``alpha_threshold`` are "valid"; distances are divided by the
scene scale ``s`` of the network config, pixel errors by the focal length):

* ``depth``: ``|log d_pred - log d_gt|`` (camera-frame points, which lie on their rays);
* ``scene``: ``||X_pred - X_gt|| / s``;
* ``weight``: binary cross-entropy of the weight logits against validity (background cells get no weight);
* ``consistency``: ``||R_gt P_c,pred + t_gt - X_pred|| / s``, the two predicted point sets agreeing under the
  true pose (the seed paper's consistency term);
* ``reprojection``: angle between each cell's ray and ``X_pred`` seen from the true pose (clamped at 0.2 rad);
* ``pose``: ``||R - R_gt||_F + ||t - t_gt|| / s`` of the differentiable weighted rigid alignment
  (:func:`~nerfstudio_gsloc.localize.rigid_alignment.weighted_rigid_alignment`), ramped in after a warm-up, once
  the point sets are good enough for the alignment's gradient to be informative.

Arithmetic (``precision``): NHWC memory layout, and on CPUs with native bfloat16 the network body's convolutions in
bfloat16 under autocast (heads, losses and alignment in float32), about 1.5x faster per step there.

Poses: OpenCV camera-to-world ``[R | t]`` (x right, y down, z forward) inside this module; inputs and the scene
keep nerfstudio's OpenGL camera-to-world convention and are converted with :mod:`nerfstudio_gsloc.camera_conventions`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_c2w
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.regressor import (
    STRIDE,
    RegressorNetConfig,
    SceneRegressorNet,
    grid_rays,
    grid_size,
    resize_image,
)
from nerfstudio_gsloc.localize.rigid_alignment import weighted_rigid_alignment
from nerfstudio_gsloc.localize.scene_map import TrainingView, between_poses, jittered_poses
from nerfstudio_gsloc.rendering import render_splat_model

LOSS_NAMES = ("depth", "scene", "weight", "consistency", "reprojection", "pose")


def cpu_has_native_bfloat16() -> bool:
    """True when this CPU computes bfloat16 convolutions natively (AVX512-BF16 or AMX), where they run much
    faster than float32 ones; elsewhere oneDNN emulates them, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass
class RegressorTrainConfig:
    """Settings of ``gsloc-train-regressor`` (every field but ``max_minutes`` keys the saved weights)."""

    input_size: int = 128
    """Long side of the network input (rounded to a multiple of 8); the short side keeps the aspect ratio."""
    channels: Tuple[int, int, int] = (32, 64, 128)
    """Network channels at strides 2, 4, 8."""
    steps: int = 3000
    """Optimisation steps (fewer when ``max_minutes`` runs out first)."""
    max_minutes: float = 14.0
    """Wall-clock budget of the whole training, rendering included; the learning rate decays over whichever of
    ``steps`` and this budget ends first."""
    batch_size: int = 12
    real_fraction: float = 0.4
    """Share of each batch drawn from the real training photos (the rest from rendered views)."""
    rendered_views: int = 1500
    """Views rendered around the training cameras before training."""
    orbit_deg: float = 25.0
    distance_range: Tuple[float, float] = (0.8, 1.25)
    roll_deg: float = 20.0
    """Rendered poses: orbit angle ``U[1/3, 1] x orbit_deg``, distance factor, roll (see ``jittered_poses``)."""
    between_fraction: float = 0.0
    """Share of the rendered views placed *between* neighbouring training cameras instead (``between_poses``:
    the capture's own distance and roll), the rest jittered as above."""
    between_neighbours: int = 4
    between_overshoot: float = 0.25
    """``between_poses``: partner among this many nearest cameras, interpolation ``U[-x, 1 + x]``."""
    learning_rate: float = 2e-3
    """Adam's rate, cosine-decayed to 5% of it."""
    pose_weight: float = 10.0
    pose_warmup: float = 0.15
    """The pose loss is off for this fraction of training, then ramps linearly to ``pose_weight`` over as long.
    On lego-200, weight 10 from 15% gave 78% within (10 deg, 0.1) against 70% for weight 4 from 25%; weight 20
    from 10% gave 78% too, with worse medians and point losses."""
    consistency_weight: float = 0.5
    reprojection_weight: float = 0.5
    weight_loss_weight: float = 0.2
    alpha_threshold: float = 0.5
    """Grid cells with rendered opacity above this are valid (have a point) ..."""
    background_tolerance: float = 0.03
    """... unless they render within this of the model's background colour in every channel (0: off)."""
    brightness: float = 0.2
    contrast: float = 0.2
    channel_gain: float = 0.08
    noise: float = 0.02
    """Photometric augmentation: factors ``1 +- U[0, x]`` and Gaussian noise of this standard deviation."""
    seed: int = 0
    """Member ``m`` of an ensemble draws its rendered views, initial weights, batches and augmentation with seed
    ``seed + m``."""
    members: Optional[int] = None
    """Networks trained side by side, each on its own rendered views (an ensemble, one thread group each, so on 2
    cores two members take the wall-clock time of one); inference aligns all their point pairs together. On
    lego-200 two float32 members gave 76-82% within (10 deg, 0.1) in three trainings of 13-14 min on 2 cores, where
    single networks measured 64-78%; three bfloat16 members 80% and 82% in two trainings of 13.8-14 min. 1: a single
    network (with one core, two members share it and each gets half the steps). Default: 3 where the training runs
    in bfloat16 (``precision``), else 2 (three float32 members get two thirds of the steps each: 62%)."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the network body in training. ``bfloat16``: its convolutions under autocast (the heads, the
    losses and the alignment stay float32), about 1.5x faster per training step on CPUs with native bfloat16
    (AVX512-BF16 or AMX: 0.147 s against 0.226 s on this project's machine), emulated and slower on others; ``auto``: bfloat16 where the CPU has it, else float32. Inference is
    float32 either way."""

    def body_dtype(self) -> torch.dtype:
        """The dtype ``precision`` resolves to on this machine."""
        if self.precision == "auto":
            return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
        return torch.bfloat16 if self.precision == "bfloat16" else torch.float32

    def member_count(self) -> int:
        """The number of networks ``members`` resolves to on this machine."""
        if self.members is None:
            return 3 if self.body_dtype() == torch.bfloat16 else 2
        return self.members

    def key(self) -> str:
        """Hash of the settings that change the weights (``max_minutes`` excluded; ``members`` only when above 1
        and the precision only when it resolves to bfloat16, so that weights trained before those options
        existed keep their key)."""
        data = dataclasses.asdict(self)
        data.pop("max_minutes")
        data["members"] = self.member_count()
        if data["members"] == 1:
            data.pop("members")
        data.pop("precision")
        if self.body_dtype() == torch.bfloat16:
            data["precision"] = "bfloat16"
        return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    net_config = RegressorNetConfig(input_height=in_h, input_width=in_w, channels=tuple(config.channels))
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


def batch_losses(net: SceneRegressorNet, data: TrainingSet, idx: Tensor, images: Tensor, pose_weight: float,
                 config: RegressorTrainConfig) -> Tuple[Tensor, Dict[str, float]]:
    """The weighted total loss of one batch and each term's value (see the module docstring)."""
    dtype = config.body_dtype()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        depth, points, logits = net(images)  # the network's heads return float32 (SceneRegressorNet.forward)
    valid, rays = data.valid[idx], data.rays[idx]
    gt_cam, gt_scene, c2w = data.cam_points[idx], data.scene_points[idx], data.c2w_cv[idx]
    s = net.config.scale
    cam = depth[..., None] * rays
    count = valid.sum().clamp_min(1)

    def over_valid(x: Tensor) -> Tensor:
        return (x * valid).sum() / count

    terms: Dict[str, Tensor] = {}
    terms["depth"] = over_valid((depth.clamp_min(1e-6).log() - gt_cam[..., 2].clamp_min(1e-6).log()).abs())
    terms["scene"] = over_valid((points - gt_scene).norm(dim=-1) / s)
    terms["weight"] = F.binary_cross_entropy_with_logits(logits, valid.float())
    R_gt, t_gt = c2w[:, :, :3], c2w[:, :, 3]
    moved = torch.einsum("bij,bhwj->bhwi", R_gt, cam) + t_gt[:, None, None]
    terms["consistency"] = over_valid((moved - points).norm(dim=-1) / s)
    seen = torch.einsum("bji,bhwj->bhwi", R_gt, points - t_gt[:, None, None])  # X_pred in the true camera frame
    ray_dir = F.normalize(rays, dim=-1)
    cosine = (F.normalize(seen, dim=-1) * ray_dir).sum(dim=-1).clamp(-1.0, 1.0)
    terms["reprojection"] = over_valid(torch.sqrt(2.0 - 2.0 * cosine + 1e-12).clamp(max=0.2))  # chord ~ angle
    if pose_weight > 0:
        weights = torch.sigmoid(logits).reshape(logits.shape[0], -1)
        R, t = weighted_rigid_alignment(cam.reshape(cam.shape[0], -1, 3), points.reshape(points.shape[0], -1, 3), weights)
        terms["pose"] = ((R - R_gt).flatten(1).norm(dim=-1) + (t - t_gt).norm(dim=-1) / s).mean()
    else:
        terms["pose"] = torch.zeros(())
    total = (terms["depth"] + terms["scene"] + config.weight_loss_weight * terms["weight"]
             + config.consistency_weight * terms["consistency"] + config.reprojection_weight * terms["reprojection"]
             + pose_weight * terms["pose"])
    return total, {k: float(v.detach()) for k, v in terms.items()}


StepCallback = Callable[[int, int, Dict[str, float]], None]


def member_configs(config: RegressorTrainConfig) -> List[RegressorTrainConfig]:
    """The settings of each network of ``config``'s ensemble: member ``m`` draws its rendered views, initial
    weights, batches and augmentation with seed ``config.seed + m``."""
    count = config.member_count()
    if count < 1:
        raise GslocError(f"--training.members must be at least 1, got {count}")
    return [dataclasses.replace(config, seed=config.seed + m, members=1) for m in range(count)]


def train_members(datasets: Sequence[TrainingSet], net_config: RegressorNetConfig, config: RegressorTrainConfig,
                  budget_seconds: Optional[float] = None,
                  on_step: Optional[Callable[[int], Optional[StepCallback]]] = None) -> Tuple[List[SceneRegressorNet], List[Dict[str, object]]]:
    """Train the ``config.member_count()`` networks of an ensemble at the same time, member ``m`` on ``datasets[m]`` (its
    own rendered views: members that saw different views make less correlated errors) with the settings of
    :func:`member_configs`.

    One member trains in this thread as :func:`train_regressor`; several train in as many Python threads, with
    torch's intra-op threads shared out between them (the convolutions release the GIL, so on 2 cores two
    members run in about the wall-clock time of one). Their initial weights are drawn here, one after the other,
    so a seed gives the same networks whatever the threads' interleaving.

    Args:
        on_step: ``on_step(m)`` is member ``m``'s step callback (see :func:`train_regressor`), or ``None``.

    Returns:
        the trained networks and their summaries, in member order.
    """
    configs = member_configs(config)
    if len(datasets) != len(configs):
        raise ValueError(f"{len(configs)} members need as many training sets, got {len(datasets)}")
    nets = []
    for member in configs:
        torch.manual_seed(member.seed)
        nets.append(SceneRegressorNet(net_config))
    callbacks = [None if on_step is None else on_step(m) for m in range(len(configs))]
    if len(configs) == 1:
        net, summary = train_regressor(datasets[0], net_config, configs[0], budget_seconds, callbacks[0], net=nets[0])
        return [net], [summary]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(configs)))
    try:
        with ThreadPoolExecutor(max_workers=len(configs)) as pool:
            futures = [pool.submit(train_regressor, data, net_config, member, budget_seconds, callback, net)
                       for data, member, callback, net in zip(datasets, configs, callbacks, nets)]
            results = [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)
    return [net for net, _ in results], [summary for _, summary in results]


def train_regressor(data: TrainingSet, net_config: RegressorNetConfig, config: RegressorTrainConfig,
                    budget_seconds: Optional[float] = None, on_step: Optional[StepCallback] = None,
                    net: Optional[SceneRegressorNet] = None) -> Tuple[SceneRegressorNet, Dict[str, object]]:
    """Train a :class:`SceneRegressorNet` on ``data``.

    Args:
        data, net_config: from :func:`build_training_set`.
        config: settings (steps, batch, learning rate, loss weights, augmentation, seed).
        budget_seconds: stop when this much wall time has passed (``None``: ``config.steps`` only).
        on_step: called after every step with ``(step, total steps, running mean of each loss)``.
        net: the network to train (default: a fresh one drawn with ``config.seed``).

    Returns:
        the trained network (eval mode) and a summary: steps done, skipped steps, final loss means.
    """
    if net is None:
        torch.manual_seed(config.seed)
        net = SceneRegressorNet(net_config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    net = net.to(memory_format=torch.channels_last)  # oneDNN's convolutions are ~1.3x faster in NHWC on the CPU
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    real_ids = torch.nonzero(data.real).flatten()
    rendered_ids = torch.nonzero(~data.real).flatten()
    num_real = len(real_ids) if len(rendered_ids) == 0 else max(1, round(config.batch_size * config.real_fraction))
    num_real = min(num_real, config.batch_size)
    started = time.perf_counter()
    running: Dict[str, float] = {}
    skipped, step = 0, 0
    net.train()
    for step in range(1, config.steps + 1):
        progress = step / config.steps
        if budget_seconds is not None:
            elapsed = time.perf_counter() - started
            if elapsed > budget_seconds:
                step -= 1
                break
            progress = max(progress, elapsed / budget_seconds)
        for group in optimizer.param_groups:  # cosine decay to 5% over whichever budget ends first
            group["lr"] = config.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        ramp = (progress - config.pose_warmup) / max(config.pose_warmup, 1e-9)
        pose_weight = config.pose_weight * min(1.0, max(0.0, ramp))
        pick_real = real_ids[torch.randint(len(real_ids), (num_real,), generator=generator)]
        idx = pick_real if num_real == config.batch_size else torch.cat([
            pick_real, rendered_ids[torch.randint(len(rendered_ids), (config.batch_size - num_real,), generator=generator)]])
        images = augment(data.images[idx].float() / 255.0, config, generator).contiguous(memory_format=torch.channels_last)
        loss, terms = batch_losses(net, data, idx, images, pose_weight, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = math.isfinite(float(loss.detach())) and all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters())
        if not finite:  # a degenerate alignment in an early batch: skip it rather than poison the weights
            skipped += 1
            continue
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()
        for key, value in terms.items():
            running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
        if on_step is not None:
            on_step(step, config.steps, running)
    net = net.to(memory_format=torch.contiguous_format).eval()
    summary = {"steps": step, "skipped_steps": skipped, "seconds": time.perf_counter() - started,
               "precision": str(config.body_dtype()).removeprefix("torch."),
               "final_losses": {k: round(v, 5) for k, v in running.items()}}
    return net, summary
