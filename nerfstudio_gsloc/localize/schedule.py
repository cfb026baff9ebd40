"""The schedule of the pose optimiser: its stages, the image pyramid, and the learning-rate decay.

A schedule is a list of :class:`Stage` s built from :class:`ScheduleConfig` and :class:`OptimConfig`:

1. **matching** (no per-iteration render): rounds of render, match, PnP jump, with reprojection-loss steps in
   between for queries that did not jump (see :mod:`nerfstudio_gsloc.localize.matching_stage`);
2. **refinement** levels down a coarse-to-fine pyramid (``refine@1/4``, ``refine@1/2``, ``refine@1/1``): the
   image and its intrinsics are downscaled by the level's factor and the learning rates scaled up by it.

Within a stage the learning rates decay exponentially from the stage's values to ``lr_final_ratio`` of them
(:func:`decayed_lr`). Only the last stage is ``final``: there a query stops at convergence and its best pose
is kept.

Shapes: ``B`` queries, ``H x W`` full resolution, ``h x w`` a pyramid level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nerfstudio_gsloc.localize.objective import LossConfig


@dataclass
class ScheduleConfig:
    """Stages of the optimisation. The maximum iteration count is ``matching_iterations + sum(pyramid_iterations)``."""

    matching_iterations: int = 50
    """Iterations of the matching stage: a matching round (render, match, PnP) every ``rematch_every``
    iterations, reprojection-loss steps in between (no render) for queries without a PnP pose."""
    rematch_every: int = 10
    """Recompute matches every k iterations (matching stage, and refinement stages with a matching term)."""
    pnp_jump: bool = True
    """Jump to the PnP + RANSAC pose at each matching round of the matching stage when it has enough inliers."""
    pnp_settle_deg: float = 0.05
    """A query whose PnP jump was smaller than this (degrees) ..."""
    pnp_settle_trans: float = 0.001
    """... and this (scene units) skips the remaining matching rounds."""
    pnp_reproj_px: float = 3.0
    """RANSAC inlier threshold (full-resolution pixels); outliers never enter the reprojection loss."""
    pnp_min_inliers: int = 12
    """Minimum PnP inliers for a jump (and for using the inlier set rather than all matches)."""
    search_deg: float = 15.0
    """When the first matching round finds no PnP pose (e.g. the scene is barely in view), render the query's
    pose turned by this many degrees up/down/left/right (and diagonally) and match those; 0 disables."""
    search_rings: int = 1
    """Rings of the look-around grid (1: 8 views at +-search_deg, 2: 24 views up to +-2 search_deg)."""
    min_matches: int = 8
    """Rounds with fewer valid matches than this give that query no matching term."""
    coarse_after_pnp: bool = False
    """Also run the coarse pyramid levels (scale > 1) for queries that the matching stage localized by PnP;
    by default they wait at the finer levels (they are already in the fine basin, and a coarse image only
    blurs away the precision PnP reached)."""
    pyramid_scales: Tuple[int, ...] = (4, 2, 1)
    """Downscale factor of each refinement level, coarse to fine (1 = full resolution)."""
    pyramid_iterations: Tuple[int, ...] = (15, 15, 60)
    """Maximum iterations of each refinement level (the last one stops per query at convergence)."""
    refine_matching_weight: Tuple[float, ...] = (0.01, 0.0, 0.0)
    """Weight of the matching term in each refinement level (relative to ``matching_weight``)."""


@dataclass
class OptimConfig:
    """Adam settings, stopping rules and divergence guards."""

    matching_rotation_lr: float = 0.01
    """Adam learning rate of the rotation (radians) in the matching stage."""
    matching_translation_lr: float = 0.01
    """Adam learning rate of the translation (scene units) in the matching stage."""
    rotation_lr: float = 5e-4
    """Adam learning rate of the rotation (radians) at the full-resolution level; a level downscaled by ``s``
    uses ``s`` times this (a step of about the same number of its pixels)."""
    translation_lr: float = 5e-4
    """Adam learning rate of the translation (scene units) at full resolution; scaled like ``rotation_lr``."""
    color_lr: float = 2e-2
    """Adam learning rate of the affine colour correction."""
    lr_final_ratio: float = 0.1
    """Learning rates decay exponentially within each stage down to this fraction."""
    rot_tol_deg: float = 0.002
    """Convergence: per-iteration rotation update below this (degrees) ..."""
    trans_tol: float = 2e-4
    """... and translation update below this (scene units) ..."""
    patience: int = 5
    """... for this many consecutive iterations."""
    batch_size: int = 4
    """Queries rendered together in one rasterization call (same image size only)."""
    max_rotation_deg: float = 90.0
    """A query whose pose rotates further than this from its initial pose has diverged."""
    max_translation: float = 2.0
    """A query whose camera centre moves further than this (scene units) from its start has diverged."""
    rotate_about: Literal["pivot", "centre"] = "pivot"
    """Refinement stages rotate the camera about a pivot at the scene's median depth in front of it, which
    separates rotation from translation in image space (about the centre both mostly shift the image)."""
    min_coverage: float = 0.005
    """A query whose render covers less than this fraction of its pixels has left the scene (failed)."""
    final_solver: Literal["adam", "lm"] = "lm"
    """Solver of the final (full-resolution) level: ``adam`` steps of the whole objective, or ``lm``:
    Levenberg-Marquardt on the L1 colour / L1 depth / anchor residuals, a few steps from a pose already in the
    basin (:mod:`~nerfstudio_gsloc.localize.levenberg_marquardt`). With ``losses.color_correction`` the final level
    stays on Adam (LM does not model the colour transform)."""
    lm_iterations: int = 15
    """Most Levenberg-Marquardt iterations of the final level (each renders one trial pose per query); the
    schedule's iterations of that level cap it too."""
    lm_jacobian: Literal["render-gradient", "finite-difference"] = "render-gradient"
    """How ``lm`` measures the Jacobian of the residuals: ``render-gradient`` takes it from the current render alone,
    its image (and depth) gradient times the motion of each pixel's surface point
    (:mod:`~nerfstudio_gsloc.localize.image_jacobian`), at every accepted step; ``finite-difference`` renders the
    pose moved along each of the 6 parameters (6 more renders; kept for ``lm_refresh`` steps). Lego's whole test
    split: the same medians, 94% instead of 96% at (1 deg, 0.01), 1.1x less time; the room: 1.7x less time, 0.030
    deg instead of 0.023; fox: 0.084 deg instead of 0.100 (README, "A Jacobian from one render")."""
    lm_refresh: int = 4
    """``finite-difference``: the Jacobian is measured again after this many accepted steps, or when a step with an
    older one fails."""
    lm_step_px: float = 0.5
    """Image motion (pixels of the level) of the finite-difference steps of the Jacobian (for ``render-gradient``:
    the steps along which the pixel motion is differenced; the anchor's rows are differenced along them too)."""
    lm_ftol: float = 5e-3
    """A rejected Levenberg-Marquardt step whose Gauss-Newton model promised less than this fraction of the loss
    ends the query (converged): the model's optimum is that close and the render cannot confirm it. Without it a
    query at its noise floor spent 6-10 renders growing the damping from ~1e-4 (where it does not change the step)
    until a step of a few thousandths of a degree was accepted (measured on the room sequence). This holds for a
    Jacobian kept from earlier steps too: measuring it again (6 renders) near the floor promised as little (lego
    8k and room ``inerf``: the same errors, 13% and 29% less time per query; README, hypotheses section)."""
    lm_gain_tol: float = 0.0
    """An accepted Levenberg-Marquardt step that lowered the loss by less than this fraction ends the query
    (converged); 0: off. The ``sequence-lm`` tracking preset sets 0.005: a frame the motion model predicted within a
    hair of its optimum otherwise crawls on in steps gaining 0.2-0.3% each (a render apiece), which moved the room
    path's poses by tenths of a millimetre and cost a third of the time per frame (README, "Tracking")."""
    lm_l1_floor: float = 0.03
    """Colour and depth residuals under this size count quadratically in ``lm`` (smooth L1): with a floor near
    zero the IRLS weights of nearly-fitting pixels explode and the steps get timid (measured on fox: 0.03 beats
    0.001 in both error and time)."""


@dataclass
class Stage:
    """One stage of the schedule (built by :func:`build_stages`)."""

    name: str
    iterations: int
    scale: Optional[int]
    """Pyramid downscale of the per-iteration render; ``None``: no per-iteration render (matching stage)."""
    matching_weight: float
    photometric_weight: float
    depth_weight: float
    rotation_lr: float
    translation_lr: float
    pnp_jump: bool
    final: bool

    @property
    def renders(self) -> bool:
        """Whether each iteration renders the queries (a refinement level with an image or depth term)."""
        return self.scale is not None and (self.photometric_weight > 0 or self.depth_weight > 0)


#: The pseudo-stage of trace row 0 (the initial pose, before any step).
INIT_STAGE = Stage("init", 0, None, 0.0, 0.0, 0.0, 0.0, 0.0, False, False)


def build_stages(losses: LossConfig, schedule: ScheduleConfig, optim: OptimConfig) -> List[Stage]:
    """Turn the configs into the list of stages (stages without iterations or without any loss are dropped).

    Raises:
        ValueError: inconsistent pyramid settings.
    """
    if len(schedule.pyramid_scales) != len(schedule.pyramid_iterations):
        raise ValueError("pyramid_scales and pyramid_iterations must have the same length")
    if len(schedule.refine_matching_weight) not in (0, len(schedule.pyramid_scales)):
        raise ValueError("refine_matching_weight must be empty or have one weight per pyramid level")
    if any(int(s) < 1 for s in schedule.pyramid_scales):
        raise ValueError("pyramid scales must be >= 1")
    match_w = losses.matching_weight if losses.matching else 0.0
    photo_w = losses.photometric_weight if losses.photometric else 0.0
    depth_w = losses.depth_weight if losses.depth else 0.0
    stages: List[Stage] = []
    if match_w > 0 and schedule.matching_iterations > 0:
        stages.append(
            Stage(
                "matching", int(schedule.matching_iterations), None, match_w, 0.0, 0.0,
                optim.matching_rotation_lr, optim.matching_translation_lr, schedule.pnp_jump, False,
            )
        )
    for level, (scale, iters) in enumerate(zip(schedule.pyramid_scales, schedule.pyramid_iterations)):
        level_match = schedule.refine_matching_weight[level] if schedule.refine_matching_weight else 0.0
        stage = Stage(
            f"refine@1/{int(scale)}", int(iters), int(scale), match_w * level_match, photo_w, depth_w,
            optim.rotation_lr * scale, optim.translation_lr * scale, False, False,
        )
        if stage.iterations > 0 and (stage.matching_weight > 0 or stage.photometric_weight > 0 or stage.depth_weight > 0):
            stages.append(stage)
    if not stages:
        raise ValueError("the schedule has no stage with iterations and a loss term")
    stages[-1].final = True
    return stages


def decayed_lr(base_lr: float, stage: Stage, iteration: int, final_ratio: float) -> float:
    """Learning rate at ``iteration`` of ``stage``: exponential decay from ``base_lr`` to ``final_ratio * base_lr``."""
    return base_lr * final_ratio ** (iteration / max(1, stage.iterations - 1))


# ----------------------------------------------------------------------------------------------------------
# pyramid levels
# ----------------------------------------------------------------------------------------------------------


def scale_intrinsics(Ks: Tensor, width: int, height: int, scale: int) -> Tuple[Tensor, int, int]:
    """Intrinsics and size of a pyramid level.

    With pixel centres at +0.5, a continuous image coordinate ``x`` maps to ``x * w / W``, so ``fx`` and ``cx``
    scale by the same exact factor ``w / W`` (likewise for y).

    Args:
        Ks: ``[B, 3, 3]`` full-resolution intrinsics.
        width, height: full-resolution size ``W``, ``H``.
        scale: downscale factor (1 = unchanged).

    Returns:
        ``Ks_level [B, 3, 3]``, ``w``, ``h``.
    """
    if scale == 1:
        return Ks, width, height
    w, h = max(1, int(round(width / scale))), max(1, int(round(height / scale)))
    factors = torch.tensor([w / width, h / height, 1.0], dtype=Ks.dtype, device=Ks.device)
    return Ks * factors[None, :, None], w, h


def downsample(images: Tensor, width: int, height: int) -> Tensor:
    """Area-average ``[B, H, W, C]`` images to ``[B, h, w, C]`` (antialiased bilinear for non-integer factors)."""
    if images.shape[1:3] == (height, width):
        return images
    x = images.permute(0, 3, 1, 2)
    if images.shape[1] % height == 0 and images.shape[2] % width == 0:
        x = F.adaptive_avg_pool2d(x, (height, width))
    else:
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1)


def downsample_depth(depth: Tensor, width: int, height: int) -> Tensor:
    """Downsample ``[B, H, W, 1]`` depth averaging only valid (``> 0``) pixels; cells less than half valid become 0."""
    if depth.shape[1:3] == (height, width):
        return depth
    valid = (depth > 0).to(depth.dtype)
    total = downsample(depth * valid, width, height)
    weight = downsample(valid, width, height)
    return torch.where(weight >= 0.5, total / weight.clamp_min(1e-6), torch.zeros_like(total))
