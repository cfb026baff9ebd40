"""The pose-inversion loop: refine query camera poses by rendering a Gaussian scene and descending a loss.

For a batch of queries of the same image size, each query ``i`` gets a
:class:`~nerfstudio_gsloc.localize.pose.PoseCorrection` on its initial camera-to-world pose, and all active
queries are rendered together in one ``render_splat_model`` call per iteration. The schedule has stages:

1. **matching** (wide basin, iComMa-style): every ``rematch_every`` iterations the current pose is rendered at
   full resolution, query and render are matched (SIFT by default), render keypoints are lifted to 3D with the
   rendered depth and, when PnP + RANSAC finds enough inliers, the pose *jumps* to the PnP solution (optional).
   Queries without a PnP pose descend the robust reprojection loss of their matches with Adam in between
   (no rendering needed). A query whose first round finds no PnP pose first *looks around*: it matches renders
   of its pose turned up/down/left/right by ``search_deg`` and takes the best.
2. **refinement** down a coarse-to-fine image pyramid (e.g. 1/4, 1/2, full resolution): K and the image size
   are scaled, the query is downsampled, and the loss is photometric (L1 + D-SSIM over rendered alpha) plus
   depth (L1 + Sobel edges) for queries with depth, plus an optional small matching term. Queries localized
   by PnP skip the coarse levels (they are already in the fine basin). Learning rates scale with the level's
   pixel size, and rotations turn the camera about a pivot at the scene's median depth, which keeps rotation
   and translation from producing the same image motion (about the camera centre both mostly shift it).

Stopping: in the final stage a query stops when its pose update stays below ``rot_tol_deg`` and
``trans_tol`` for ``patience`` iterations (earlier stages end early when all queries are that still); the
pose with the lowest final-stage loss is kept. A non-finite loss or pose, a camera that leaves the scene
(rendered coverage below ``min_coverage``) or one that runs too far from its start marks that query
``failed`` with the reason, and the other queries of its batch continue.

Shapes: ``B`` queries in a batch, ``H x W`` full resolution, ``h x w`` the current pyramid level.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import cv2
import torch
import torch.nn.functional as F
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from torch import Tensor, nn

from nerfstudio_gsloc.localize.losses import depth_loss, photometric_loss, reprojection_loss
from nerfstudio_gsloc.localize.matching import Matcher, PnPResult, lift_keypoints, pnp_ransac
from nerfstudio_gsloc.localize.pose import PoseCorrection
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.rendering import RenderedViews, render_splat_model

STATUS_CONVERGED = "converged"
STATUS_MAX_ITERATIONS = "max_iterations"
STATUS_FAILED = "failed"


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Which loss terms are used, and their weights (multiplied by the stage weights of the schedule)."""

    photometric: bool = True
    """L1 + D-SSIM between render and query over rendered alpha (and the query mask)."""
    photometric_weight: float = 1.0
    """Weight of the photometric term."""
    ssim_weight: float = 0.5
    """Share of D-SSIM in the photometric term (structure is less sensitive than L1 to a model's colour errors)."""
    color_correction: bool = False
    """Optimise a per-query affine colour transform of the render (exposure/white-balance differences)."""
    matching: bool = True
    """Huber reprojection loss of matched render points lifted to 3D (needs a matcher)."""
    matching_weight: float = 1.0
    """Weight of the reprojection term (its stage weights scale it further)."""
    huber_delta_px: float = 2.0
    """Huber threshold of the reprojection loss, full-resolution pixels."""
    depth: bool = True
    """L1 depth + Sobel depth-edge loss, for queries that have depth."""
    depth_weight: float = 0.1
    """Depth L1 is in scene units; trained models' depth is least reliable at occlusion edges, so the default
    keeps this term small next to the photometric one."""
    depth_edge_weight: float = 1.0
    """Weight of the Sobel depth-edge part inside the depth term."""
    alpha_threshold: float = 0.5
    """Pixels whose rendered alpha is below this are ignored by photometric and depth terms."""


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


@dataclass
class Stage:
    """One stage of the schedule (internal, built from :class:`ScheduleConfig`)."""

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


# ----------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class QueryResult:
    """Outcome of localizing one query (poses in the scene frame).

    Attributes:
        c2w: ``[3, 4]`` refined OpenGL camera-to-world pose (the best final-stage pose).
        c2w_init: ``[3, 4]`` initial pose.
        status: ``converged`` (update below tolerance), ``max_iterations`` (ran out of iterations) or ``failed``.
        reason: why it failed or stopped (empty for a normal convergence), plus a note when the matching stage
            found no PnP pose for it (then only the narrow-basin photometric/depth terms refined it).
        loss: loss of the returned pose (final-stage loss; NaN if that stage was never reached).
        iterations: optimisation steps taken.
        match_inliers: inliers of the last matching round (PnP inliers, or valid matches when PnP failed).
        seconds: wall time attributed to this query (batch time shared among the queries active in it).
        rot_err_deg, trans_err: errors against the ground truth (scene units) when it is known.
        trace: one dict per iteration (see :data:`TRACE_FIELDS`).
    """

    name: str
    index: int
    c2w: Tensor
    c2w_init: Tensor
    status: str
    reason: str
    loss: float
    iterations: int
    match_inliers: int
    seconds: float
    rot_err_deg: Optional[float] = None
    trans_err: Optional[float] = None
    trace: List[Dict[str, object]] = field(default_factory=list)


#: Columns of a trace row.
TRACE_FIELDS = (
    "query", "index", "iteration", "stage", "scale", "loss", "loss_matching", "loss_photometric", "loss_depth",
    "num_matches", "rot_err_deg", "trans_err", "event",
)


# ----------------------------------------------------------------------------------------------------------
# helpers
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


def group_queries(queries: Sequence[Query], batch_size: int) -> List[List[int]]:
    """Indices of queries grouped by (size, background) and chunked into batches of at most ``batch_size``.

    Order within a group follows the input order, so results are deterministic.
    """
    groups: Dict[Tuple, List[int]] = {}
    for i, query in enumerate(queries):
        background = None if query.background is None else tuple(float(v) for v in query.background.tolist())
        groups.setdefault((query.width, query.height, background), []).append(i)
    batches: List[List[int]] = []
    for members in groups.values():
        for start in range(0, len(members), max(1, int(batch_size))):
            batches.append(members[start : start + max(1, int(batch_size))])
    return batches


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients to a model's parameters (only the poses are optimised)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _pose_change(c2w_a: Tensor, c2w_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Rotation (degrees) and centre distance between two batches of ``[B, 3, 4]`` poses."""
    return rotation_error_deg(c2w_a, c2w_b).float(), translation_error(c2w_a, c2w_b).float()


# ----------------------------------------------------------------------------------------------------------
# the optimiser
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _MatchState:
    """Matches of one query from its latest matching round (world points and query pixels, full resolution)."""

    points_world: Tensor  # [m, 3]
    kpts_query: Tensor  # [m, 2]
    num_inliers: int = 0


class PoseOptimizer:
    """Refines poses of queries against a splatfacto-style model (see the module docstring).

    Args:
        model: a model accepted by :func:`render_splat_model` (its parameters are frozen while it runs).
        losses, schedule, optim: configuration.
        matcher: a :class:`Matcher`, required when the schedule has a matching term.
        seed: base seed of the RANSAC sampling (per query: ``seed + query.index``).
    """

    def __init__(
        self,
        model: nn.Module,
        losses: LossConfig,
        schedule: ScheduleConfig,
        optim: OptimConfig,
        matcher: Optional[Matcher] = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.losses = losses
        self.schedule = schedule
        self.optim = optim
        self.stages = build_stages(losses, schedule, optim)
        if any(s.matching_weight > 0 for s in self.stages) and matcher is None:
            raise ValueError("a matcher is required when the schedule uses the matching loss")
        self.matcher = matcher
        self.seed = int(seed)

    @property
    def max_iterations(self) -> int:
        """Largest number of steps a query can take."""
        return sum(stage.iterations for stage in self.stages)

    @property
    def device(self) -> torch.device:
        return self.model.means.device

    def run(
        self,
        queries: Sequence[Query],
        initial_c2w: Sequence[Tensor],
        on_result: Optional[Callable[[QueryResult], None]] = None,
        on_step: Optional[Callable[[int], None]] = None,
    ) -> List[QueryResult]:
        """Localize ``queries`` from ``initial_c2w`` (one ``[3, 4]`` scene-frame pose each).

        Args:
            queries: the queries.
            initial_c2w: initial OpenGL camera-to-world poses, scene frame.
            on_result: called with each :class:`QueryResult` as soon as its batch finishes.
            on_step: called after every iteration with the number of queries still active.

        Returns:
            results in the order of ``queries``.
        """
        if len(queries) != len(initial_c2w):
            raise ValueError(f"{len(queries)} queries but {len(initial_c2w)} initial poses")
        results: List[Optional[QueryResult]] = [None] * len(queries)
        was_training = self.model.training
        self.model.eval()
        try:
            with frozen_parameters(self.model):
                for batch in group_queries(queries, self.optim.batch_size):
                    batch_results = _BatchRun(self, [queries[i] for i in batch], [initial_c2w[i] for i in batch]).run(on_step)
                    for i, result in zip(batch, batch_results):
                        results[i] = result
                        if on_result is not None:
                            on_result(result)
        finally:
            self.model.train(was_training)
        return [r for r in results if r is not None]


class _BatchRun:
    """State and loop of one batch of same-size queries."""

    def __init__(self, owner: PoseOptimizer, queries: List[Query], initial_c2w: List[Tensor]) -> None:
        self.o = owner
        self.queries = queries
        self.B = len(queries)
        device = owner.device
        self.device = device
        self.width, self.height = queries[0].width, queries[0].height
        self.base = torch.stack([c[:3, :4].float() for c in initial_c2w]).to(device)  # [B, 3, 4]
        self.c2w_init = self.base.clone()
        self.Ks = torch.stack([q.K.float() for q in queries]).to(device)  # [B, 3, 3]
        self.images = torch.stack([q.image.float() for q in queries]).to(device)  # [B, H, W, 3]
        self.has_depth = [q.depth is not None for q in queries]
        self.depths: Optional[Tensor] = None
        if any(self.has_depth):
            zeros = torch.zeros(self.height, self.width)
            self.depths = torch.stack([q.depth if q.depth is not None else zeros for q in queries])[..., None].to(device)
        self.masks: Optional[Tensor] = None
        if any(q.mask is not None for q in queries):
            ones = torch.ones(self.height, self.width, dtype=torch.bool)
            self.masks = torch.stack([q.mask if q.mask is not None else ones for q in queries])[..., None].to(device)
        bg = queries[0].background
        self.background = None if bg is None else bg.float().to(device)
        self.gt = [None if q.gt_c2w is None else q.gt_c2w[:3, :4].float().to(device) for q in queries]

        self.correction = PoseCorrection(self.B).to(device)
        self.pivot: Optional[Tensor] = None  # [B, 3] world points the rotation turns about (None: camera centres)
        self.color: Optional[nn.Parameter] = None
        if owner.losses.color_correction and owner.losses.photometric:
            eye = torch.eye(3, 4, device=device)
            self.color = nn.Parameter(eye.repeat(self.B, 1, 1))
        self.active = [True] * self.B
        self.status = [STATUS_MAX_ITERATIONS] * self.B
        self.reason = ["stopped at the iteration limit before the pose update fell below tolerance"] * self.B
        self.best_loss = [math.inf] * self.B
        self.best_c2w = self.base.clone()
        self.iterations = [0] * self.B
        self.seconds = [0.0] * self.B
        self.matches: List[Optional[_MatchState]] = [None] * self.B
        self.last_inliers = [0] * self.B
        self.pnp_localized = [False] * self.B  # the last matching-stage round found a PnP pose
        self.searched = [False] * self.B  # the look-around search was tried
        self.still = [0] * self.B  # consecutive iterations with a small update
        self.traces: List[List[Dict[str, object]]] = [[] for _ in range(self.B)]
        for i in range(self.B):
            if not bool(torch.isfinite(self.base[i]).all()):
                self.fail(i, "non-finite initial pose")

    # -- small helpers -------------------------------------------------------------------------------------

    def current_c2w(self) -> Tensor:
        """``[B, 3, 4]`` current poses (differentiable).

        With a pivot, the rotation turns the camera about the pivot point instead of its centre: the centre
        moves by ``(dR - I)(c - p)`` with ``dR`` the world-frame rotation of the correction.
        """
        c2w = self.correction(self.base)
        if self.pivot is None:
            return c2w
        d_rot = c2w[:, :, :3] @ self.base[:, :, :3].transpose(1, 2)
        eye = torch.eye(3, device=c2w.device, dtype=c2w.dtype)
        offset = (d_rot - eye) @ (self.base[:, :, 3:4] - self.pivot[:, :, None])
        return torch.cat([c2w[:, :, :3], c2w[:, :, 3:4] + offset], dim=-1)

    def active_ids(self) -> List[int]:
        return [i for i in range(self.B) if self.active[i]]

    def fail(self, i: int, reason: str) -> None:
        self.active[i] = False
        self.status[i] = STATUS_FAILED
        self.reason[i] = reason

    def render(self, ids: List[int], c2w: Tensor, scale: int) -> Tuple[RenderedViews, Tensor, int, int]:
        """Render the queries ``ids`` at pyramid ``scale`` in one call; returns views, ``Ks_level``, ``w``, ``h``."""
        Ks, w, h = scale_intrinsics(self.Ks[ids], self.width, self.height, scale)
        views = render_splat_model(self.o.model, c2w, Ks, w, h, background=self.background)
        return views, Ks, w, h

    def make_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        groups = [
            {"params": [self.correction.rotation], "lr": stage.rotation_lr, "base_lr": stage.rotation_lr},
            {"params": [self.correction.translation], "lr": stage.translation_lr, "base_lr": stage.translation_lr},
        ]
        if self.color is not None and stage.photometric_weight > 0:
            lr = self.o.optim.color_lr
            groups.append({"params": [self.color], "lr": lr, "base_lr": lr})
        return torch.optim.Adam(groups)

    def rebase(self, i: int, c2w: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Make ``c2w`` the new base pose of query ``i`` (zero correction, fresh Adam moments for that row)."""
        with torch.no_grad():
            self.base[i] = c2w.to(self.base)
            self.correction.rotation[i] = 0.0
            self.correction.translation[i] = 0.0
        for param in (self.correction.rotation, self.correction.translation):
            state = optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][i] = 0.0

    # -- matching --------------------------------------------------------------------------------------------

    def _match_view(self, i: int, rgb: Tensor, depth: Tensor, alpha: Tensor, c2w: Tensor) -> Tuple[Tensor, Tensor, Optional[PnPResult]]:
        """Match query ``i`` with one full-resolution render and lift the render's keypoints to 3D.

        Args:
            rgb, depth, alpha: ``[H, W, 3]``, ``[H, W, 1]``, ``[H, W, 1]`` render of pose ``c2w [3, 4]``.

        Returns:
            ``points_world [m, 3]`` and ``kpts_query [m, 2]`` of the valid matches, and the PnP + RANSAC result
            (``None`` with fewer than ``min_matches`` matches).
        """
        assert self.o.matcher is not None
        sched = self.o.schedule
        matches = self.o.matcher.match(self.images[i], rgb)
        kq, kr = matches.kpts0.to(self.device), matches.kpts1.to(self.device)
        points, valid = lift_keypoints(kr, depth, self.Ks[i], c2w, alpha=alpha, alpha_threshold=self.o.losses.alpha_threshold)
        if self.masks is not None and len(kq):
            col = kq[:, 0].floor().long().clamp(0, self.width - 1)
            row = kq[:, 1].floor().long().clamp(0, self.height - 1)
            valid = valid & self.masks[i, row, col, 0]
        points, kq = points[valid], kq[valid]
        if points.shape[0] < sched.min_matches:
            return points, kq, None
        cv2.setRNGSeed(self.o.seed + self.queries[i].index)  # RANSAC reproducible per query
        pnp = pnp_ransac(points, kq, self.Ks[i], reproj_px=sched.pnp_reproj_px, min_inliers=sched.pnp_min_inliers)
        return points, kq, pnp

    def _search(self, i: int, c2w: Tensor) -> Optional[Tuple[Tensor, Tensor, PnPResult]]:
        """Look around: match query ``i`` against renders of its pose turned by a grid of pitch/yaw offsets.

        The grid has ``search_rings`` rings of ``search_deg`` steps about the camera's x and y axes (8 views for
        one ring). Returns the matches and PnP result of the view with the most inliers, or ``None``.
        """
        sched = self.o.schedule
        rings, step = int(sched.search_rings), math.radians(sched.search_deg)
        offsets = [(a * step, b * step) for a in range(-rings, rings + 1) for b in range(-rings, rings + 1) if (a, b) != (0, 0)]
        if not offsets:
            return None
        vectors = torch.tensor([[pitch, yaw, 0.0] for pitch, yaw in offsets], dtype=torch.float64)
        rots = c2w[None, :, :3].double() @ axis_angle_to_rotation_matrix(vectors)
        candidates = torch.cat([rots, c2w[None, :, 3:4].double().expand(len(offsets), 3, 1)], dim=-1).float()
        best: Optional[Tuple[Tensor, Tensor, PnPResult]] = None
        chunk = max(1, self.o.optim.batch_size)
        for start in range(0, len(offsets), chunk):
            poses = candidates[start : start + chunk]
            Ks = self.Ks[i : i + 1].expand(poses.shape[0], 3, 3)
            views = render_splat_model(self.o.model, poses, Ks, self.width, self.height, background=self.background)
            for k in range(poses.shape[0]):
                points, kq, pnp = self._match_view(i, views.rgb[k], views.depth[k], views.alpha[k], poses[k])
                if pnp is not None and pnp.c2w is not None and (best is None or pnp.num_inliers > best[2].num_inliers):
                    best = (points, kq, pnp)
        return best

    def match_round(self, ids: List[int], stage: Stage, optimizer: torch.optim.Optimizer, views: Optional[RenderedViews]) -> Dict[int, str]:
        """Recompute matches of the queries ``ids`` against a full-resolution render of their current poses.

        In the matching stage a query whose first round finds no PnP pose also tries the look-around search
        (:meth:`_search`) once.

        Args:
            views: full-resolution renders of ``ids`` to reuse, or ``None`` to render them here.

        Returns:
            ``{query: event}`` for the trace (``"rematch"``, ``"pnp_jump"`` or ``"search_jump"``).
        """
        events: Dict[int, str] = {}
        with torch.no_grad():
            c2w = self.current_c2w()[ids].detach()
            if views is None:
                views, _, _, _ = self.render(ids, c2w, 1)
            for j, i in enumerate(ids):
                started = time.perf_counter()
                points, kq, pnp = self._match_view(i, views.rgb[j], views.depth[j], views.alpha[j], c2w[j])
                event = "rematch"
                no_pose = pnp is None or pnp.c2w is None
                if stage.pnp_jump and no_pose and self.o.schedule.search_deg > 0 and not self.searched[i]:
                    self.searched[i] = True
                    found = self._search(i, c2w[j])
                    if found is not None:
                        points, kq, pnp = found
                        event = "search"
                if pnp is None:
                    self.matches[i] = None
                    self.last_inliers[i] = int(points.shape[0])
                else:
                    if stage.pnp_jump:
                        self.pnp_localized[i] = pnp.c2w is not None
                    if pnp.c2w is not None:
                        inl = pnp.inliers.to(self.device)
                        points, kq = points[inl], kq[inl]
                        self.last_inliers[i] = pnp.num_inliers
                        if stage.pnp_jump and self._jump_allowed(i, pnp.c2w.to(self.device)):
                            self.rebase(i, pnp.c2w.to(self.device), optimizer)
                            event = "search_jump" if event == "search" else "pnp_jump"
                    else:
                        self.last_inliers[i] = int(points.shape[0])
                    self.matches[i] = _MatchState(points, kq, self.last_inliers[i])
                events[i] = event
                self.seconds[i] += time.perf_counter() - started
        return events

    def _jump_allowed(self, i: int, c2w: Tensor) -> bool:
        """A PnP pose is only taken when it stays within the divergence bounds around the initial pose."""
        rot, trans = _pose_change(c2w[None], self.c2w_init[i : i + 1])
        return bool(rot[0] <= self.o.optim.max_rotation_deg and trans[0] <= self.o.optim.max_translation)

    def matching_loss(self, ids: List[int], c2w: Tensor) -> Tuple[Tensor, Dict[int, int]]:
        """``[len(ids)]`` Huber reprojection loss of each query's current matches through ``c2w [len(ids), 3, 4]``."""
        points, kpts, index, counts = [], [], [], {}
        for j, i in enumerate(ids):
            state = self.matches[i]
            counts[i] = 0 if state is None else int(state.points_world.shape[0])
            if state is not None and counts[i] > 0:
                points.append(state.points_world)
                kpts.append(state.kpts_query)
                index.append(torch.full((counts[i],), j, dtype=torch.long, device=self.device))
        if not points:
            return torch.zeros(len(ids), device=self.device) + 0.0 * c2w.sum(), counts
        loss = reprojection_loss(
            torch.cat(points), torch.cat(kpts), torch.cat(index), c2w, self.Ks[ids], num_queries=len(ids),
            huber_delta_px=self.o.losses.huber_delta_px,
        )
        return loss, counts

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self, on_step: Optional[Callable[[int], None]]) -> List[QueryResult]:
        # Row 0 of every trace is the initial pose (no loss yet), so plots show the whole descent.
        ids = self.active_ids()
        nan = torch.full((len(ids),), float("nan"))
        init_stage = Stage("init", 0, None, 0.0, 0.0, 0.0, 0.0, 0.0, False, False)
        self._record(init_stage, ids, nan, nan, nan, nan, {}, self.base[ids], {i: "init" for i in ids})
        for stage in self.o.stages:
            if not any(self.active):
                break
            if stage.scale is None:
                self.run_matching_stage(stage, on_step)
            else:
                self.run_refine_stage(stage, on_step)
        return self.results()

    def _timed(self, ids: List[int], started: float) -> None:
        """Share the wall time since ``started`` equally among ``ids``."""
        elapsed = time.perf_counter() - started
        for i in ids:
            self.seconds[i] += elapsed / max(1, len(ids))

    def _set_lr(self, optimizer: torch.optim.Optimizer, stage: Stage, it: int) -> None:
        """Exponential decay from the stage's learning rates to ``lr_final_ratio`` of them."""
        decay = self.o.optim.lr_final_ratio ** (it / max(1, stage.iterations - 1))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * decay

    def run_matching_stage(self, stage: Stage, on_step: Optional[Callable[[int], None]]) -> None:
        """Rounds of (render, match, PnP jump), with reprojection-loss steps for queries that did not jump.

        A query that jumped sits at the least-squares optimum of its inliers, so it waits for the next round;
        it is *settled* (skips later rounds) once a jump moves it less than ``pnp_settle_deg``/``pnp_settle_trans``.
        """
        sched = self.o.schedule
        every = max(1, sched.rematch_every)
        optimizer = self.make_optimizer(stage)
        settled = [False] * self.B
        for start in range(0, stage.iterations, every):
            ids = [i for i in self.active_ids() if not settled[i]]
            if not ids:
                break
            started = time.perf_counter()
            before = self.current_c2w().detach()
            events = self.match_round(ids, stage, optimizer, None)
            after = self.current_c2w().detach()
            rot_jump, trans_jump = _pose_change(after[ids], before[ids])
            jumped = [i for i in ids if events.get(i) in ("pnp_jump", "search_jump")]
            for j, i in enumerate(ids):
                self.iterations[i] += 1
                if i in jumped and float(rot_jump[j]) < sched.pnp_settle_deg and float(trans_jump[j]) < sched.pnp_settle_trans:
                    settled[i] = True
                if self.matches[i] is None:
                    # Too few matches: no gradient moves it, so another round would see the same render.
                    settled[i] = True
            # One trace row per matched query, at its pose after the round.
            with torch.no_grad():
                loss, counts = self.matching_loss(ids, after[ids])
            zero = torch.zeros_like(loss)
            self._record(stage, ids, loss * stage.matching_weight, loss, zero, zero, counts, after[ids], events)
            self._timed(ids, started)
            if on_step is not None:
                on_step(sum(self.active))
            movers = [i for i in ids if i not in jumped and self.matches[i] is not None]
            for it in range(start, min(start + every, stage.iterations)):
                movers = [i for i in movers if self.active[i]]
                if not movers:
                    break
                started = time.perf_counter()
                self._set_lr(optimizer, stage, it)
                self.step(stage, it, movers, optimizer)
                self._timed(movers, started)
                if on_step is not None:
                    on_step(sum(self.active))

    def start_stage(self, stage: Stage) -> None:
        """Fold the correction into the base poses and, for pivot rotation, place each pivot at the median
        rendered depth along the optical axis (rendered at the stage's scale)."""
        with torch.no_grad():
            current = self.current_c2w().detach()
            self.base.copy_(current)
            self.correction.rotation.zero_()
            self.correction.translation.zero_()
            self.pivot = None
            if self.o.optim.rotate_about != "pivot":
                return
            ids = self.stage_members(stage)
            views, _, _, _ = self.render(ids, current[ids], stage.scale or 1)
            pivot = current[:, :, 3].clone()
            for j, i in enumerate(ids):
                depth = views.depth[j][views.alpha[j] >= self.o.losses.alpha_threshold]
                if depth.numel() > 0:
                    forward = -current[i, :, 2]  # OpenGL cameras look along -z
                    pivot[i] = current[i, :, 3] + depth.median() * forward
            self.pivot = pivot

    def stage_members(self, stage: Stage) -> List[int]:
        """Active queries that take part in ``stage`` (PnP-localized queries skip coarse levels by default)."""
        coarse = stage.scale is not None and stage.scale > 1 and not stage.final
        skip = coarse and not self.o.schedule.coarse_after_pnp
        return [i for i in self.active_ids() if not (skip and self.pnp_localized[i])]

    def run_refine_stage(self, stage: Stage, on_step: Optional[Callable[[int], None]]) -> None:
        """Photometric/depth (and optional matching) steps at one pyramid level."""
        if not self.stage_members(stage):
            return
        self.start_stage(stage)
        optimizer = self.make_optimizer(stage)
        patience = self.o.optim.patience
        for i in range(self.B):
            self.still[i] = 0
        for it in range(stage.iterations):
            ids = self.stage_members(stage)
            if not ids:
                break
            started = time.perf_counter()
            self._set_lr(optimizer, stage, it)
            rematch = stage.matching_weight > 0 and it % max(1, self.o.schedule.rematch_every) == 0
            self.step(stage, it, ids, optimizer, rematch=rematch)
            self._timed(ids, started)
            if on_step is not None:
                on_step(sum(self.active))
            # Earlier levels end as soon as every active query has stopped moving.
            if not stage.final and all(self.still[i] >= patience for i in self.stage_members(stage)):
                break

    def step(self, stage: Stage, it: int, ids: List[int], optimizer: torch.optim.Optimizer, rematch: bool = False) -> None:
        """One optimisation step of ``stage`` for the queries ``ids`` (rendered together when the stage renders)."""
        losses_cfg, optim_cfg = self.o.losses, self.o.optim
        n = len(ids)
        views = None
        w, h = self.width, self.height
        needs_render = stage.scale is not None and (stage.photometric_weight > 0 or stage.depth_weight > 0)
        c2w = self.current_c2w()[ids]
        if needs_render:
            views, _, w, h = self.render(ids, c2w, stage.scale)

        events: Dict[int, str] = {}
        if rematch:
            reuse = None
            if views is not None and (w, h) == (self.width, self.height):
                reuse = RenderedViews(views.rgb.detach(), views.depth.detach(), views.alpha.detach())
            events = self.match_round(ids, stage, optimizer, reuse)

        zero = torch.zeros(n, device=self.device)
        loss_match, loss_photo, loss_depth = zero, zero, zero
        counts: Dict[int, int] = {i: 0 for i in ids}
        if stage.matching_weight > 0:
            loss_match, counts = self.matching_loss(ids, c2w)
        coverage = None
        if views is not None:
            query_rgb = downsample(self.images[ids], w, h)
            masks = None if self.masks is None else downsample(self.masks[ids].float(), w, h) > 0.5
            valid = views.alpha >= losses_cfg.alpha_threshold
            if masks is not None:
                valid = valid & masks
            coverage = valid.float().mean(dim=(1, 2, 3))
            if stage.photometric_weight > 0:
                color = None if self.color is None else self.color[ids]
                loss_photo = photometric_loss(
                    views.rgb, query_rgb, views.alpha, masks, ssim_weight=losses_cfg.ssim_weight,
                    alpha_threshold=losses_cfg.alpha_threshold, color_affine=color,
                )
            if stage.depth_weight > 0 and self.depths is not None:
                query_depth = downsample_depth(self.depths[ids], w, h)
                if masks is not None:
                    query_depth = torch.where(masks, query_depth, torch.zeros_like(query_depth))
                loss_depth = depth_loss(
                    views.depth, query_depth, views.alpha, edge_weight=losses_cfg.depth_edge_weight,
                    alpha_threshold=losses_cfg.alpha_threshold,
                )
        total = stage.matching_weight * loss_match + stage.photometric_weight * loss_photo + stage.depth_weight * loss_depth

        # Per-query health checks before the step: a bad query is dropped, the others go on.
        finite = torch.isfinite(total) & torch.isfinite(c2w.detach()).flatten(1).all(dim=1)
        keep = []
        for j, i in enumerate(ids):
            if not bool(finite[j]):
                self.fail(i, f"non-finite loss or pose at {stage.name} iteration {it}")
            elif coverage is not None and float(coverage[j]) < optim_cfg.min_coverage:
                self.fail(i, f"camera lost sight of the scene at {stage.name} iteration {it} (coverage {float(coverage[j]):.4f})")
            else:
                keep.append(j)
        self._record(stage, ids, total.detach(), loss_match.detach(), loss_photo.detach(), loss_depth.detach(), counts,
                     c2w.detach(), events)
        if stage.final:
            for j in keep:
                i = ids[j]
                if float(total[j].detach()) < self.best_loss[i]:
                    self.best_loss[i] = float(total[j].detach())
                    self.best_c2w[i] = c2w[j].detach()
        if not keep:
            return

        optimizer.zero_grad(set_to_none=True)
        total[keep].sum().backward()
        params = [self.correction.rotation, self.correction.translation] + ([self.color] if self.color is not None else [])
        stepping = {ids[j] for j in keep}
        frozen_rows = [i for i in range(self.B) if i not in stepping]
        saved = [p.detach()[frozen_rows].clone() for p in params]
        optimizer.step()
        with torch.no_grad():
            # Adam moves rows through momentum even without gradient: put the other queries back.
            for p, s in zip(params, saved):
                p[frozen_rows] = s
            new_c2w = self.current_c2w()[ids]
        rot_step, trans_step = _pose_change(new_c2w, c2w.detach())
        rot_total, trans_total = _pose_change(new_c2w, self.c2w_init[ids])
        for j in keep:
            i = ids[j]
            self.iterations[i] += 1
            if not bool(torch.isfinite(new_c2w[j]).all()):
                self.fail(i, f"non-finite pose after {stage.name} iteration {it}")
                continue
            if float(rot_total[j]) > optim_cfg.max_rotation_deg or float(trans_total[j]) > optim_cfg.max_translation:
                self.fail(
                    i,
                    f"diverged at {stage.name} iteration {it}: {float(rot_total[j]):.1f} deg / "
                    f"{float(trans_total[j]):.3f} units from the initial pose",
                )
                continue
            small = float(rot_step[j]) < optim_cfg.rot_tol_deg and float(trans_step[j]) < optim_cfg.trans_tol
            self.still[i] = self.still[i] + 1 if small else 0
            if stage.final and self.still[i] >= optim_cfg.patience:
                self.active[i] = False
                self.status[i] = STATUS_CONVERGED
                self.reason[i] = ""

    def _record(self, stage: Stage, ids: List[int], total: Tensor, lm: Tensor, lp: Tensor, ld: Tensor,
                counts: Dict[int, int], c2w: Tensor, events: Dict[int, str]) -> None:
        """Append one trace row per query in ``ids`` (errors only for queries with ground truth)."""
        for j, i in enumerate(ids):
            rot = trans = None
            gt = self.gt[i]
            if gt is not None:
                r, t = _pose_change(c2w[j : j + 1], gt[None])
                rot, trans = float(r[0]), float(t[0])
            self.traces[i].append(
                {
                    "query": self.queries[i].name,
                    "index": self.queries[i].index,
                    "iteration": len(self.traces[i]),
                    "stage": stage.name,
                    "scale": stage.scale if stage.scale is not None else 1,
                    "loss": float(total[j]),
                    "loss_matching": float(lm[j]),
                    "loss_photometric": float(lp[j]),
                    "loss_depth": float(ld[j]),
                    "num_matches": counts.get(i, 0),
                    "rot_err_deg": rot,
                    "trans_err": trans,
                    "event": events.get(i, ""),
                }
            )

    def results(self) -> List[QueryResult]:
        out = []
        last = self.current_c2w().detach()
        for i, query in enumerate(self.queries):
            reached_final = math.isfinite(self.best_loss[i])
            # Without a final-stage loss (failure before it) report the last finite pose.
            c2w = self.best_c2w[i] if reached_final else last[i]
            if not bool(torch.isfinite(c2w).all()):
                c2w = self.base[i]
            rot = trans = None
            if self.gt[i] is not None:
                r, t = _pose_change(c2w[None], self.gt[i][None])
                rot, trans = float(r[0]), float(t[0])
            reason = self.reason[i]
            uses_matching = any(stage.pnp_jump for stage in self.o.stages)
            if uses_matching and not self.pnp_localized[i] and self.status[i] != STATUS_FAILED:
                # Worth knowing: without a PnP pose only the (narrow-basin) photometric terms moved this query.
                note = "no PnP pose from feature matches; refined by the photometric/depth terms only"
                reason = f"{reason}; {note}" if reason else note
            out.append(
                QueryResult(
                    name=query.name,
                    index=query.index,
                    c2w=c2w.detach().cpu().clone(),
                    c2w_init=self.c2w_init[i].cpu().clone(),
                    status=self.status[i],
                    reason=reason,
                    loss=self.best_loss[i] if reached_final else float("nan"),
                    iterations=self.iterations[i],
                    match_inliers=int(self.last_inliers[i]),
                    seconds=self.seconds[i],
                    rot_err_deg=rot,
                    trans_err=trans,
                    trace=self.traces[i],
                )
            )
        return out
