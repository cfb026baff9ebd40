"""Training the scene regressor (:mod:`~nerfstudio_gsloc.localize.regressor`) from a trained Gaussian scene.

The data come from :mod:`~nerfstudio_gsloc.localize.regressor_training_set` (training photos and renders around
them, with ground truth on the network's grid), the settings from
:mod:`~nerfstudio_gsloc.localize.regressor_settings`. This module holds the losses and the optimisation.

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

Depth scale (:func:`calibrate_depth_scale`): after training, one factor on the networks' camera-frame depths,
chosen on the training photos, removes the small scale that the two regressed point sets keep between them.

Arithmetic (``precision``): NHWC memory layout, and on CPUs with native bfloat16 the network body's convolutions in
bfloat16 under autocast (heads, losses and alignment in float32), about 1.5x faster per step there.

Poses: OpenCV camera-to-world ``[R | t]`` (x right, y down, z forward) inside this module; inputs and the scene
keep nerfstudio's OpenGL camera-to-world convention and are converted with :mod:`nerfstudio_gsloc.camera_conventions`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nerfstudio_gsloc.localize.regressor import RegressorNetConfig, SceneRegressor, SceneRegressorNet
from nerfstudio_gsloc.localize.regressor_settings import RegressorTrainConfig, member_configs
from nerfstudio_gsloc.localize.regressor_training_set import TrainingSet, augment
from nerfstudio_gsloc.localize.rigid_alignment import weighted_rigid_alignment
from nerfstudio_gsloc.localize.scene_map import TrainingView


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


#: Factors on the predicted depths that :func:`calibrate_depth_scale` chooses from (0.95 to 1.05, steps of 0.25%).
DEPTH_SCALES = tuple(round(0.95 + 0.0025 * i, 4) for i in range(41))


def calibrate_depth_scale(regressor: SceneRegressor, views: Sequence[TrainingView]) -> Dict[str, float]:
    """The factor on the networks' camera-frame depths that minimises the median camera-centre error of the
    regressor's poses of ``views`` (the training photos, whose poses are known), from :data:`DEPTH_SCALES` (the
    closest to 1 among equals).

    Why: the networks regress depths and scene points separately, and the two point sets keep a small common
    scale between them (on lego-200 the poses put the cameras 0.5-0.8% too close to the scene on average, in
    every training measured; the room's 1.75%). A rigid alignment has no scale to absorb it, so it moves the camera along its axis;
    one factor for all queries removes that bias and leaves the per-query error.

    Returns:
        ``depth_scale``, ``views`` and the median camera-centre error (scene units) at 1 and at the factor.
    """
    if not views:
        return {"depth_scale": 1.0, "views": 0, "median_error_unscaled": math.nan, "median_error": math.nan}
    pairs = [regressor.point_pairs(view.image, view.K, depth_scale=1.0) for view in views]
    src, dst, weights = (torch.stack([pair[i] for pair in pairs]) for i in range(3))
    median_depth = float(torch.tensor([pair[3] for pair in pairs]).median())
    centres = torch.stack([view.c2w[:3, 3] for view in views]).double()
    errors = {}
    for scale in DEPTH_SCALES:
        _, t = regressor.align(src * scale, dst, weights, median_depth)
        errors[scale] = float((t - centres).norm(dim=-1).median())
    best = min(DEPTH_SCALES, key=lambda scale: (errors[scale], abs(scale - 1.0)))
    return {"depth_scale": best, "views": len(views), "median_error_unscaled": round(errors[1.0], 6),
            "median_error": round(errors[best], 6)}


StepCallback = Callable[[int, int, Dict[str, float]], None]

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
