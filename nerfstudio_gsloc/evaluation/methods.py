"""The localization methods a benchmark compares, each run on the same trials (same queries, same initial poses).

Registry (:data:`METHODS`):

* ``gsloc``: the full default of ``ns-localize`` (:class:`~nerfstudio_gsloc.localize.pipeline.PoseInversionConfig`):
  matching stage with PnP jumps, then photometric (+ depth) refinement down an image pyramid.
* ``photometric``: the same schedule with only the photometric term (L1 + D-SSIM over rendered alpha): the
  iNeRF regime of render-and-compare.
* ``icomma``: the iComMa formulation (Sun et al., arXiv 2312.09031) run by :func:`icomma_localize`:
  ``lambda * L_match + (1 - lambda) * L_compare`` with ``L_compare`` the MSE between render and query and
  ``L_match`` the mean squared distance, in image-normalised coordinates, between matched keypoints of query and
  render, the gradient flowing through the *render-side keypoint positions* (through the matcher into the
  rendered image and on to the pose). Once ``L_match`` falls below a threshold the matching term is switched off
  for good and the learning rate decays. LoFTR weights cannot be downloaded here, so the matcher is kornia's
  differentiable SIFT (sub-pixel DoG extrema are a differentiable function of the image).
* ``depth``: the same schedule as ``gsloc`` with only the depth term (L1 + Sobel depth edges, GSplatLoc), for
  queries with depth; queries without depth are skipped.
* ``pnp``: the classical structure-based pipeline of :mod:`nerfstudio_gsloc.evaluation.baselines`.

Every method is a function ``(context, queries, trials, on_trial) -> List[TrialResult]``; poses are OpenGL
camera-to-world ``[3, 4]`` in the scene frame.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import kornia

import torch
from torch import Tensor, nn

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation.baselines import (
    Features,
    PnPBaseline,
    PnPBaselineConfig,
    SiftFeatures,
    TrainingView,
)
from nerfstudio_gsloc.evaluation.protocols import Trial
from nerfstudio_gsloc.localize.matching import LoftrMatcher, MatcherConfig, _resize
from nerfstudio_gsloc.localize.optimizer import STATUS_CONVERGED, STATUS_FAILED, STATUS_MAX_ITERATIONS, frozen_parameters
from nerfstudio_gsloc.localize.pipeline import PoseInversion, PoseInversionConfig
from nerfstudio_gsloc.localize.pose import PoseCorrection
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.rendering import render_splat_model

STATUS_SKIPPED = "skipped"
STATUS_OK = "ok"


@dataclass
class TrialResult:
    """What one method produced for one trial.

    Attributes:
        c2w: ``[3, 4]`` estimated pose (scene frame; for ``failed`` gradient trials the last finite pose, kept for
            the record), ``None`` when the method produced none.
        status: ``converged`` / ``max_iterations`` / ``failed`` (gradient methods), ``ok`` / ``failed`` (pnp),
            ``skipped`` (the method does not apply, e.g. ``depth`` without query depth).
        reason: why it failed or was skipped.
        seconds: wall time spent on this trial.
        iterations: optimisation steps (0 for pnp).
    """

    c2w: Optional[Tensor]
    status: str
    reason: str
    seconds: float
    iterations: int

    @property
    def failed(self) -> bool:
        """True when the trial counts as a failure whatever its pose (the method gave up or produced none)."""
        return self.status == STATUS_FAILED or self.c2w is None


# ----------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------


def _icomma_matcher_default() -> MatcherConfig:
    # kornia's DoG pyramid already doubles the image; no extra upsampling keeps the per-iteration cost down.
    return MatcherConfig(kind="sift", upsample=1.0, max_keypoints=1024, ratio_threshold=0.8)


@dataclass
class IComMaConfig:
    """Settings of the ``icomma`` method (iComMa's loss, schedule and switch-off; kornia SIFT as the matcher)."""

    matcher: MatcherConfig = field(default_factory=_icomma_matcher_default)
    """Matcher settings (upsampling, SIFT ratio test / LoFTR confidence)."""
    loftr_weights_path: Optional[Path] = None
    """A local LoFTR checkpoint: iComMa's own matcher, used instead of SIFT when given (never downloaded)."""
    match_weight: float = 0.8
    """``lambda``: loss = lambda * L_match + (1 - lambda) * L_compare while matching is on."""
    switch_off_threshold: float = 1e-3
    """Matching is switched off for good once L_match (mean squared distance in image-normalised coordinates,
    x / W and y / H) falls below this."""
    min_matches: int = 10
    """Iterations with fewer matches use the comparing loss only."""
    rotation_lr: float = 0.01
    """Adam learning rate of the rotation (radians)."""
    translation_lr: float = 0.01
    """Adam learning rate of the translation (scene units)."""
    lr_decay: float = 0.6
    """After the switch-off the learning rate is multiplied by ``lr_decay ** (k / lr_decay_steps)``."""
    lr_decay_steps: int = 50
    max_iterations: int = 200
    """Iteration budget per trial (Adam at 0.01 rad per step needs about 70 steps just to undo 40 degrees)."""
    rot_tol_deg: float = 0.002
    """Stop (converged) when the step stays below this rotation ..."""
    trans_tol: float = 2e-4
    """... and this translation (scene units) ..."""
    patience: int = 5
    """... for this many iterations (only after the switch-off)."""
    max_rotation_deg: float = 90.0
    """Divergence guard: rotation away from the initial pose."""
    max_translation: float = 2.0
    """Divergence guard: centre distance from the initial pose (scene units)."""


@dataclass
class SingleLossBudget:
    """Iterations and learning rates of the single-loss baselines (``photometric``, ``depth``).

    Without a matching stage these methods have to walk the whole initial error by gradient steps, so they get
    an iNeRF-sized budget (Adam at 0.01 rad per step at the coarsest level, about 300 steps) instead of the
    short refinement levels that ``gsloc`` runs after its matching stage has already closed the gap.
    """

    pyramid_iterations: Tuple[int, ...] = (100, 100, 100)
    """Maximum iterations per pyramid level (same levels as gsloc's ``schedule.pyramid_scales``)."""
    rotation_lr: float = 2.5e-3
    """Full-resolution rotation learning rate (radians); a level downscaled by ``s`` uses ``s`` times this."""
    translation_lr: float = 2.5e-3
    """Full-resolution translation learning rate (scene units), scaled like ``rotation_lr``."""


@dataclass
class MethodSettings:
    """Settings of every method (``--method-settings.*`` on the command line)."""

    gsloc: PoseInversionConfig = field(default_factory=PoseInversionConfig)
    """``gsloc`` as ns-localize runs it; ``photometric`` and ``depth`` use its losses and pyramid with one loss
    each and the budget of ``single_loss``."""
    single_loss: SingleLossBudget = field(default_factory=SingleLossBudget)
    """Iterations and learning rates of ``photometric`` and ``depth``."""
    icomma: IComMaConfig = field(default_factory=IComMaConfig)
    pnp: PnPBaselineConfig = field(default_factory=PnPBaselineConfig)


@dataclass
class MethodContext:
    """What the methods share within one benchmark run.

    Attributes:
        model: the trained splatfacto-style model.
        settings: the methods' settings.
        camera_scale: the scene's camera-distance scale (for ``pnp``'s prior-based view selection).
        training_views: loads the training views (called at most once, by ``pnp``).
        on_progress: optional ``(description)`` callback for long set-up steps.
        notes: facts a method reports for the results' metadata (e.g. ``pnp_map_seconds``).
    """

    model: nn.Module
    settings: MethodSettings
    camera_scale: float
    training_views: Callable[[], List[TrainingView]]
    on_progress: Optional[Callable[[str], None]] = None
    notes: Dict[str, object] = field(default_factory=dict)


TrialCallback = Optional[Callable[[int, TrialResult], None]]
"""Called with ``(trial position, result)`` as soon as a trial finishes."""


# ----------------------------------------------------------------------------------------------------------
# gradient methods built on ns-localize's PoseInversion
# ----------------------------------------------------------------------------------------------------------


def _single_loss_config(settings: "MethodSettings", photometric: bool, depth: bool) -> PoseInversionConfig:
    """gsloc's config with one loss term, no matching stage and the single-loss budget."""
    base, budget = settings.gsloc, settings.single_loss
    losses = dataclasses.replace(base.losses, photometric=photometric, matching=False, depth=depth)
    schedule = dataclasses.replace(base.schedule, pyramid_iterations=tuple(budget.pyramid_iterations))
    optim = dataclasses.replace(base.optim, rotation_lr=budget.rotation_lr, translation_lr=budget.translation_lr)
    return dataclasses.replace(base, losses=losses, schedule=schedule, optim=optim)


def photometric_config(settings: "MethodSettings") -> PoseInversionConfig:
    """Photometric loss only (no matching stage, no depth): the iNeRF regime."""
    return _single_loss_config(settings, photometric=True, depth=False)


def depth_config(settings: "MethodSettings") -> PoseInversionConfig:
    """Depth loss only (L1 + Sobel edges): the GSplatLoc regime."""
    return _single_loss_config(settings, photometric=False, depth=True)


def _run_pose_inversion(
    config: PoseInversionConfig, context: MethodContext, queries: Sequence[Query], trials: Sequence[Trial],
    on_trial: TrialCallback, positions: Optional[List[int]] = None,
) -> Dict[int, TrialResult]:
    """Run :class:`PoseInversion` on the trials (each trial = its query started from the trial's pose).

    Returns:
        ``{trial position: result}``.
    """
    positions = list(range(len(trials))) if positions is None else positions
    if not positions:
        return {}
    inverter = PoseInversion(config, context.model)
    out: Dict[int, TrialResult] = {}
    # One localize() call per optimiser batch, so results (and the progress bar) arrive as batches finish.
    chunk = max(1, int(config.optim.batch_size))
    for start in range(0, len(positions), chunk):
        part = positions[start : start + chunk]
        results = inverter.localize([queries[trials[p].query] for p in part], [trials[p].c2w_init for p in part])
        for p, result in zip(part, results):
            trial_result = TrialResult(
                c2w=result.c2w.float(),
                status=result.status,
                reason=result.reason,
                seconds=float(result.seconds),
                iterations=int(result.iterations),
            )
            out[p] = trial_result
            if on_trial is not None:
                on_trial(p, trial_result)
    return out


def _gradient_method(make_config: Callable[[MethodSettings], PoseInversionConfig], needs_depth: bool = False):
    def run(context: MethodContext, queries: Sequence[Query], trials: Sequence[Trial], on_trial: TrialCallback = None) -> List[TrialResult]:
        config = make_config(context.settings)
        results: Dict[int, TrialResult] = {}
        usable = []
        for p, trial in enumerate(trials):
            if needs_depth and queries[trial.query].depth is None:
                results[p] = TrialResult(None, STATUS_SKIPPED, "query has no depth", 0.0, 0)
                if on_trial is not None:
                    on_trial(p, results[p])
            else:
                usable.append(p)
        results.update(_run_pose_inversion(config, context, queries, trials, on_trial, usable))
        return [results[p] for p in range(len(trials))]

    return run


run_gsloc = _gradient_method(lambda settings: settings.gsloc)
run_photometric = _gradient_method(photometric_config)
run_depth = _gradient_method(depth_config, needs_depth=True)


# ----------------------------------------------------------------------------------------------------------
# iComMa
# ----------------------------------------------------------------------------------------------------------


class IComMaSiftMatcher:
    """Differentiable matching for iComMa with kornia SIFT.

    The query's features are computed once; each iteration detects SIFT on the render *with* the autograd graph,
    matches descriptors (mutual nearest neighbours + Lowe ratio, no gradient) and returns the matched render
    keypoints, whose sub-pixel positions depend differentiably on the rendered pixels.
    """

    name = "kornia SIFT (differentiable sub-pixel keypoints)"

    def __init__(self, config: MatcherConfig) -> None:
        self.features = SiftFeatures(config)
        self._query_key: Optional[int] = None
        self._query_feats: Optional[Features] = None

    def __call__(self, query_image: Tensor, render: Tensor) -> Tuple[Tensor, Tensor]:
        """Match ``query_image [H, W, 3]`` (constant) with ``render [H, W, 3]`` (carries the graph).

        Returns:
            ``(kpts_query [M, 2], kpts_render [M, 2])``, the latter differentiable w.r.t. ``render``.
        """
        if self._query_key != id(query_image):
            self._query_key, self._query_feats = id(query_image), self.features.detect(query_image)
        render_feats = self.features.detect(render, differentiable=True)
        idx, _ = self.features.match(self._query_feats, render_feats)
        return self._query_feats.kpts[idx[:, 0]].to(render.device), render_feats.kpts[idx[:, 1]]


class IComMaLoftrMatcher:
    """Differentiable matching for iComMa with kornia LoFTR from a local checkpoint (iComMa's own matcher).

    LoFTR's fine-level keypoints are a spatial expectation over a heat map, so the render-side keypoints are
    differentiable w.r.t. the rendered image.
    """

    name = "kornia LoFTR"

    def __init__(self, config: MatcherConfig) -> None:
        self.config = config
        self.loftr = LoftrMatcher(config)  # loads the weights (GslocError when the file is missing or wrong)

    def _gray(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        img = image.to(self.loftr.device, torch.float32).permute(2, 0, 1)[None]
        gray, sx, sy = _resize(kornia.color.rgb_to_grayscale(img.clamp(0.0, 1.0)), self.config.upsample)
        return gray, torch.tensor([sx, sy], device=self.loftr.device)

    def __call__(self, query_image: Tensor, render: Tensor) -> Tuple[Tensor, Tensor]:
        """See :meth:`IComMaSiftMatcher.__call__`."""
        gray_q, scale_q = self._gray(query_image.detach())
        gray_r, scale_r = self._gray(render)
        out = self.loftr.loftr({"image0": gray_q, "image1": gray_r})
        keep = out["confidence"] >= self.config.min_confidence
        # LoFTR puts pixel centres at +0.5 already; only the resize is undone.
        kq = (out["keypoints0"][keep] / scale_q).detach()
        kr = out["keypoints1"][keep] / scale_r
        return kq.to(render.device), kr.to(render.device)


def make_icomma_matcher(config: "IComMaConfig"):
    """LoFTR when ``config.loftr_weights_path`` names a file, else kornia SIFT."""
    if config.loftr_weights_path is not None:
        loftr = dataclasses.replace(config.matcher, kind="loftr", weights_path=config.loftr_weights_path)
        return IComMaLoftrMatcher(loftr)
    return IComMaSiftMatcher(config.matcher)


def icomma_matching_loss(kpts_query: Tensor, kpts_render: Tensor, width: int, height: int, min_matches: int) -> Optional[Tensor]:
    """iComMa's matching loss: mean squared distance of matched keypoints in image-normalised coordinates.

    Args:
        kpts_query: ``[M, 2]`` query keypoints (constants).
        kpts_render: ``[M, 2]`` matched render keypoints (carry the gradient to the render and the pose).
        width, height: image size; coordinates are divided by it (iComMa normalises by the image size too).
        min_matches: fewer matches gives ``None`` (no matching term this iteration).

    Returns:
        scalar ``mean((dx / W)^2 + (dy / H)^2)``, or ``None``.
    """
    if kpts_render.shape[0] < max(1, min_matches):
        return None
    scale = torch.tensor([1.0 / width, 1.0 / height], device=kpts_render.device, dtype=kpts_render.dtype)
    diff = (kpts_render - kpts_query.detach().to(kpts_render)) * scale
    return (diff**2).sum(dim=-1).mean()


def icomma_localize(model: nn.Module, query: Query, c2w_init: Tensor, config: IComMaConfig, matcher=None) -> TrialResult:
    """Localize one query with iComMa's formulation (see the module docstring).

    Args:
        model: the trained model (its parameters must not require grad; see ``frozen_parameters``).
        query: the query (image ``[H, W, 3]``, ``K [3, 3]``; ground truth unused).
        c2w_init: ``[3, 4]`` initial pose (scene frame).
        config: settings.
        matcher: an :class:`IComMaSiftMatcher` / :class:`IComMaLoftrMatcher` to reuse (built when ``None``).

    Returns:
        :class:`TrialResult`: the pose of the last iteration (iComMa keeps the final pose), status ``converged`` when
        the update stayed below tolerance after the switch-off, ``max_iterations`` otherwise, ``failed`` on NaN or
        divergence.
    """
    started = time.perf_counter()
    matcher = matcher if matcher is not None else make_icomma_matcher(config)
    device = model.means.device
    base = c2w_init[:3, :4].float()[None].to(device)
    correction = PoseCorrection(1).to(device)
    optimizer = torch.optim.Adam(
        [
            {"params": [correction.rotation], "lr": config.rotation_lr, "base_lr": config.rotation_lr},
            {"params": [correction.translation], "lr": config.translation_lr, "base_lr": config.translation_lr},
        ]
    )
    image = query.image.float().to(device)[None]
    K = query.K.float().to(device)[None]
    background = None if query.background is None else query.background.float().to(device)
    query_image = query.image.float().to(device)
    matching_on = config.match_weight > 0
    switched_at: Optional[int] = None
    matching_iters = 0
    still = 0
    status, reason = STATUS_MAX_ITERATIONS, "stopped at the iteration limit"
    iterations = 0
    c2w = base
    for k in range(config.max_iterations):
        c2w = correction(base)
        views = render_splat_model(model, c2w, K, query.width, query.height, background=background)
        loss = ((views.rgb - image) ** 2).mean()  # the comparing loss (MSE)
        if matching_on:
            matching_iters += 1
            kpts_query, kpts_render = matcher(query_image, views.rgb[0])
            loss_match = icomma_matching_loss(kpts_query, kpts_render, query.width, query.height, config.min_matches)
            if loss_match is not None:
                loss = config.match_weight * loss_match + (1.0 - config.match_weight) * loss
                if float(loss_match.detach()) < config.switch_off_threshold:
                    matching_on = False
                    switched_at = k
        else:
            decay = config.lr_decay ** ((k - matching_iters + 1) / max(1, config.lr_decay_steps))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * decay
        if not bool(torch.isfinite(loss)):
            status, reason = STATUS_FAILED, f"non-finite loss at iteration {k}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iterations += 1
        with torch.no_grad():
            new = correction(base)
            if not bool(torch.isfinite(new).all()):
                status, reason = STATUS_FAILED, f"non-finite pose at iteration {k}"
                break
            rot_total = float(rotation_error_deg(new, base)[0])
            trans_total = float(translation_error(new, base)[0])
            if rot_total > config.max_rotation_deg or trans_total > config.max_translation:
                status, reason = STATUS_FAILED, f"diverged at iteration {k}: {rot_total:.1f} deg / {trans_total:.3f} from the start"
                break
            small = float(rotation_error_deg(new, c2w)[0]) < config.rot_tol_deg and float(translation_error(new, c2w)[0]) < config.trans_tol
            still = still + 1 if (small and not matching_on) else 0
            if still >= config.patience:
                status, reason = STATUS_CONVERGED, ""
                break
    with torch.no_grad():
        final = correction(base)[0].detach().cpu()
    if status != STATUS_FAILED and config.match_weight > 0:
        note = f"matching switched off at iteration {switched_at}" if switched_at is not None else "matching never switched off"
        reason = f"{reason}; {note}" if reason else note
    return TrialResult(final, status, reason, time.perf_counter() - started, iterations)


def run_icomma(context: MethodContext, queries: Sequence[Query], trials: Sequence[Trial], on_trial: TrialCallback = None) -> List[TrialResult]:
    """iComMa on every trial (one trial at a time; each iteration detects SIFT on the render)."""
    config = context.settings.icomma
    matcher = make_icomma_matcher(config)
    context.notes["icomma_matcher"] = matcher.name
    results = []
    was_training = context.model.training
    context.model.eval()
    try:
        with frozen_parameters(context.model):
            for p, trial in enumerate(trials):
                result = icomma_localize(context.model, queries[trial.query], trial.c2w_init, config, matcher)
                results.append(result)
                if on_trial is not None:
                    on_trial(p, result)
    finally:
        context.model.train(was_training)
    return results


# ----------------------------------------------------------------------------------------------------------
# the pnp baseline
# ----------------------------------------------------------------------------------------------------------


def run_pnp(context: MethodContext, queries: Sequence[Query], trials: Sequence[Trial], on_trial: TrialCallback = None) -> List[TrialResult]:
    """The structure-based baseline on every trial (the map of the training views is built once, not timed per trial)."""
    config = context.settings.pnp
    if context.on_progress is not None:
        context.on_progress("pnp: mapping the training views")
    baseline = PnPBaseline(context.model, context.training_views(), config)
    context.notes["pnp_map_seconds"] = round(baseline.map_seconds, 2)
    context.notes["pnp_map_points"] = sum(len(view.features) for view in baseline.map)
    results = []
    for p, trial in enumerate(trials):
        query = queries[trial.query]
        outcome = baseline.localize(
            query.image, query.K, prior_c2w=trial.c2w_init, scale=context.camera_scale, seed=trial.seed
        )
        if outcome.c2w is None:
            result = TrialResult(None, STATUS_FAILED, outcome.reason, outcome.seconds, 0)
        else:
            result = TrialResult(outcome.c2w, STATUS_OK, f"{outcome.num_inliers} inliers of {outcome.num_matches}", outcome.seconds, 0)
        results.append(result)
        if on_trial is not None:
            on_trial(p, result)
    return results


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MethodSpec:
    """A benchmarked method: its runner and a one-line description for the results."""

    name: str
    run: Callable[..., List[TrialResult]]
    description: str


METHODS: Dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("gsloc", run_gsloc, "ns-localize default: SIFT matching + PnP jumps, then photometric/depth pyramid"),
        MethodSpec("photometric", run_photometric, "photometric L1 + D-SSIM only down the same pyramid, iNeRF-sized budget (about 300 Adam steps, 0.01 rad at the coarsest level)"),
        MethodSpec(
            "icomma", run_icomma,
            "iComMa: 0.8 x matching (mean squared keypoint distance, gradient through the render keypoints) + 0.2 x MSE, "
            "matching switched off below 1e-3",
        ),
        MethodSpec("depth", run_depth, "depth L1 + Sobel edges only (GSplatLoc), same budget as photometric, queries with depth"),
        MethodSpec(
            "pnp", run_pnp,
            "classical: SIFT (2x upsampled) matched to the 10 training images with most matches, 3D points from the "
            "depth rendered at the training poses, RANSAC PnP + Levenberg-Marquardt on tight inliers (no gradient step)",
        ),
    )
}


def check_methods(names: Sequence[str]) -> List[str]:
    """Validate method names (in order, without duplicates).

    Raises:
        GslocError: unknown or no method.
    """
    if not names:
        raise GslocError("no method given (choose from " + ", ".join(METHODS) + ")")
    out: List[str] = []
    for name in names:
        if name not in METHODS:
            raise GslocError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
        if name not in out:
            out.append(name)
    return out
