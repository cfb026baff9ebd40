"""The ``icomma`` localizer: iComMa's loss (Sun et al., arXiv 2312.09031) on the shared optimisation loop.

``loss = lambda * L_match + (1 - lambda) * L_compare`` with ``L_compare`` the MSE between render and query and
``L_match`` the mean squared distance, in image-normalised coordinates, between matched keypoints of query and
render, the gradient flowing through the *render-side keypoint positions* (through the matcher into the rendered
image and on to the pose). Once a query's ``L_match`` falls below a threshold its matching term is switched off
for good; until then it cannot stop at convergence.

Those two things are all that differ from the other gradient methods: the optimisation is the
:class:`~nerfstudio_gsloc.localize.optimizer.PoseOptimizer` loop with one full-resolution stage (its learning-rate
decay, divergence guards, convergence rule and best-pose choice, ranked by ``L_compare``). LoFTR weights cannot be
downloaded here, so the default matcher is kornia's differentiable SIFT (sub-pixel DoG extrema are a
differentiable function of the image); a local LoFTR checkpoint can be given instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import kornia
import torch
from torch import Tensor, nn

from nerfstudio_gsloc.localize.features import Features, SiftFeatures
from nerfstudio_gsloc.localize.localizer import LocalizerConfig, OptimizingLocalizer
from nerfstudio_gsloc.localize.matching import LoftrMatcher, MatcherConfig, resize_image
from nerfstudio_gsloc.localize.objective import LossConfig, LossTerms
from nerfstudio_gsloc.localize.optimizer import PoseOptimizer
from nerfstudio_gsloc.localize.schedule import OptimConfig, ScheduleConfig, Stage
from nerfstudio_gsloc.localize.state import BatchState
from nerfstudio_gsloc.rendering import RenderedViews


def _icomma_matcher_default() -> MatcherConfig:
    # kornia's DoG pyramid already doubles the image; no extra upsampling keeps the per-iteration cost down.
    return MatcherConfig(kind="sift", upsample=1.0, max_keypoints=1024, ratio_threshold=0.8)


def _icomma_optim_default() -> OptimConfig:
    # iComMa's Adam rates; its rotation is about the camera centre; the decay reaches about what iComMa's
    # 0.6 ** (k / 50) reaches after its matching phase.
    return OptimConfig(rotation_lr=0.01, translation_lr=0.01, lr_final_ratio=0.2, rotate_about="centre")


@dataclass
class IComMaConfig(LocalizerConfig):
    """Settings of the ``icomma`` method (iComMa's loss and switch-off; the shared loop's optimiser settings)."""

    _target: Type = field(default_factory=lambda: IComMaLocalizer)
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
    max_iterations: int = 200
    """Iteration budget per query (Adam at 0.01 rad per step needs about 70 steps just to undo 40 degrees)."""
    optim: OptimConfig = field(default_factory=_icomma_optim_default)
    """Learning rates (``rotation_lr``/``translation_lr`` at full resolution), decay, stopping rule, divergence
    guards and batching of the shared loop."""


class IComMaSiftMatcher:
    """Differentiable matching with kornia SIFT: the query's features are computed once per query; each iteration
    detects SIFT on the render *with* the autograd graph and matches descriptors (mutual nearest neighbours +
    Lowe ratio, no gradient)."""

    name = "kornia SIFT (differentiable sub-pixel keypoints)"

    def __init__(self, config: MatcherConfig) -> None:
        self.features = SiftFeatures(config)
        self._query_feats: Dict[Tuple[str, int], Features] = {}

    def __call__(self, key: Tuple[str, int], query_image: Tensor, render: Tensor) -> Tuple[Tensor, Tensor]:
        """Match ``query_image [H, W, 3]`` (constant, cached under ``key``) with ``render [H, W, 3]`` (carries the graph).

        Returns:
            ``(kpts_query [M, 2], kpts_render [M, 2])``, the latter differentiable w.r.t. ``render``.
        """
        if key not in self._query_feats:
            self._query_feats[key] = self.features.detect(query_image)
        query_feats = self._query_feats[key]
        render_feats = self.features.detect(render, differentiable=True)
        idx, _ = self.features.match(query_feats, render_feats)
        return query_feats.kpts[idx[:, 0]].to(render.device), render_feats.kpts[idx[:, 1]]


class IComMaLoftrMatcher:
    """Differentiable matching with kornia LoFTR from a local checkpoint (iComMa's own matcher): LoFTR's fine-level
    keypoints are a spatial expectation over a heat map, so the render-side keypoints are differentiable."""

    name = "kornia LoFTR"

    def __init__(self, config: MatcherConfig) -> None:
        self.config = config
        self.loftr = LoftrMatcher(config)  # loads the weights (GslocError when the file is missing or wrong)

    def _gray(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        img = image.to(self.loftr.device, torch.float32).permute(2, 0, 1)[None]
        gray, sx, sy = resize_image(kornia.color.rgb_to_grayscale(img.clamp(0.0, 1.0)), self.config.upsample)
        return gray, torch.tensor([sx, sy], device=self.loftr.device)

    def __call__(self, key: Tuple[str, int], query_image: Tensor, render: Tensor) -> Tuple[Tensor, Tensor]:
        """See :meth:`IComMaSiftMatcher.__call__`."""
        gray_q, scale_q = self._gray(query_image.detach())
        gray_r, scale_r = self._gray(render)
        out = self.loftr.loftr({"image0": gray_q, "image1": gray_r})
        keep = out["confidence"] >= self.config.min_confidence
        # LoFTR puts pixel centres at +0.5 already; only the resize is undone.
        kq = (out["keypoints0"][keep] / scale_q).detach()
        kr = out["keypoints1"][keep] / scale_r
        return kq.to(render.device), kr.to(render.device)


def make_icomma_matcher(config: IComMaConfig):
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
        width, height: image size; coordinates are divided by it.
        min_matches: fewer matches gives ``None`` (no matching term this iteration).

    Returns:
        scalar ``mean((dx / W)^2 + (dy / H)^2)``, or ``None``.
    """
    if kpts_render.shape[0] < max(1, min_matches):
        return None
    scale = torch.tensor([1.0 / width, 1.0 / height], device=kpts_render.device, dtype=kpts_render.dtype)
    diff = (kpts_render - kpts_query.detach().to(kpts_render)) * scale
    return (diff**2).sum(dim=-1).mean()


class IComMaObjective:
    """iComMa's loss and its per-query switch-off, as an objective of the shared loop."""

    def __init__(self, config: IComMaConfig, matcher) -> None:
        self.config = config
        self.matcher = matcher

    def __call__(self, batch: BatchState, stage: Stage, ids: List[int], c2w: Tensor, views: Optional[RenderedViews],
                 width: int, height: int) -> LossTerms:
        assert views is not None, "the icomma stage renders every iteration"
        cfg = self.config
        compare = ((views.rgb - batch.images[ids]) ** 2).mean(dim=(1, 2, 3))  # L_compare (MSE), [n]
        totals, matching, counts, converging = [], [], {}, []
        for j, i in enumerate(ids):
            state = batch.states[i]
            total, loss_match, counts[i] = compare[j], torch.zeros((), device=batch.device), 0
            if state.matching_on and cfg.match_weight > 0:
                key = (state.query.name, state.query.index)
                kpts_query, kpts_render = self.matcher(key, batch.images[i], views.rgb[j])
                counts[i] = int(kpts_query.shape[0])
                match = icomma_matching_loss(kpts_query, kpts_render, width, height, cfg.min_matches)
                if match is not None:
                    loss_match = match
                    total = cfg.match_weight * match + (1.0 - cfg.match_weight) * compare[j]
                    if float(match.detach()) < cfg.switch_off_threshold:
                        state.matching_on, state.switched_off_at = False, state.iterations
            totals.append(total)
            matching.append(loss_match)
            converging.append(not (state.matching_on and cfg.match_weight > 0))
        valid = (views.alpha >= 0.5).float().mean(dim=(1, 2, 3))
        zero = torch.zeros(len(ids), device=batch.device)
        return LossTerms(torch.stack(totals), torch.stack(matching), compare, zero, counts, coverage=valid,
                         score=compare, converging=converging)


class IComMaLocalizer(OptimizingLocalizer):
    """``icomma`` behind the common interface (see the module docstring)."""

    def __init__(self, config: IComMaConfig, model: nn.Module, pipeline: Any = None, seed: int = 0) -> None:
        super().__init__(config, model, pipeline, seed)
        self.matcher = make_icomma_matcher(config)
        self.notes["icomma_matcher"] = self.matcher.name
        optim = config.optim
        stage = Stage("icomma", int(config.max_iterations), 1, 0.0, 1.0, 0.0, optim.rotation_lr, optim.translation_lr,
                      False, True)
        losses = LossConfig(matching=False, depth=False)
        self.optimizer = PoseOptimizer(
            model, losses, ScheduleConfig(), optim, seed=seed, stages=[stage],
            objective=IComMaObjective(config, self.matcher), notes=self._notes,
        )

    def _notes(self, batch: BatchState) -> List[str]:
        if self.config.match_weight <= 0:
            return [""] * batch.B
        return [
            "matching never switched off" if s.switched_off_at is None else f"matching switched off at iteration {s.switched_off_at}"
            for s in batch.states
        ]
