"""The objective of the pose optimiser: which loss terms are on, and how one iteration's loss is assembled.

An objective is called once per iteration on the queries being optimised and returns :class:`LossTerms`: the
per-query total to descend, its parts (for the trace), and the rendered coverage (for the health check). The
loop (:mod:`nerfstudio_gsloc.localize.optimizer`) does not know which terms exist, so a new method is a new
objective, not a new loop. :class:`PoseObjective` is gsloc's: matching (reprojection of matched render points),
photometric (L1 + D-SSIM) and depth (L1 + Sobel edges), each weighted by the stage.

Shapes: ``n`` queries in the call, ``h x w`` the stage's pyramid level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from torch import Tensor

from nerfstudio_gsloc.localize.losses import depth_loss, photometric_loss, reprojection_loss
from nerfstudio_gsloc.rendering import RenderedViews

if TYPE_CHECKING:  # only for annotations: the state and schedule modules import this one
    from nerfstudio_gsloc.localize.matching_stage import MatchingTerm
    from nerfstudio_gsloc.localize.schedule import Stage
    from nerfstudio_gsloc.localize.state import BatchState


@dataclass
class LossConfig:
    """Which loss terms are used, and their weights (multiplied by the stage weights of the schedule)."""

    photometric: bool = True
    """L1 + D-SSIM between render and query over rendered alpha (and the query mask)."""
    photometric_weight: float = 1.0
    """Weight of the photometric term."""
    ssim_weight: float = 0.5
    """Share of D-SSIM in the photometric term (structure is less sensitive than L1 to a model's colour errors)."""
    robust_photometric: float = 0.0
    """Cauchy weighting of the photometric residuals at this many median residuals (0 = off): pixels the model
    renders badly wrong (floaters, reflections) stop pulling the pose (see :func:`photometric_loss`)."""
    color_correction: bool = False
    """Optimise a per-query affine colour transform of the render (exposure/white-balance differences)."""
    matching: bool = True
    """Huber reprojection loss of matched render points lifted to 3D (needs a matcher)."""
    matching_weight: float = 1.0
    """Weight of the reprojection term (its stage weights scale it further)."""
    huber_delta_px: float = 2.0
    """Huber threshold of the reprojection loss, full-resolution pixels."""
    anchor_weight: float = 0.0
    """Weight of the anchor in refinement stages: the Huber reprojection error of the map's PnP inliers (query
    keypoints matched to training photos), for queries that start at that PnP pose. It keeps the photometric
    refinement within the geometric consensus where the model's photometric optimum is off, but on a real capture
    that consensus carries the model's depth errors (fox: median 0.079 deg at 0.3 against 0.021 deg at 0), so it
    is off by default; the choice between hypotheses still rejects a refinement that leaves the consensus."""
    depth: bool = True
    """L1 depth + Sobel depth-edge loss, for queries that have depth."""
    depth_weight: float = 0.1
    """Depth L1 is in scene units; trained models' depth is least reliable at occlusion edges, so the default
    keeps this term small next to the photometric one."""
    depth_edge_weight: float = 1.0
    """Weight of the Sobel depth-edge part inside the depth term."""
    alpha_threshold: float = 0.97
    """Pixels whose rendered alpha is below this are ignored by photometric and depth terms (and keypoints there
    are not lifted to 3D). A model's silhouettes are soft and a little off where its training views disagree, so
    only pixels it renders (nearly) opaque are trusted: on lego-200's 8,000-step model 0.97 instead of 0.5 lowers
    gsloc's median error from 0.031 deg / 0.0023 to 0.028 deg / 0.0020 (README, hypotheses section)."""


@dataclass
class LossTerms:
    """One iteration's loss of ``n`` queries.

    Attributes:
        total: ``[n]`` loss to descend (differentiable w.r.t. the poses).
        matching, photometric, depth: ``[n]`` unweighted parts, for the trace (zeros when a term is off;
            ``matching`` includes the anchor's reprojection error).
        counts: matches used per query position in the batch (for the trace).
        coverage: ``[n]`` fraction of pixels the render covers (``None`` without a render).
        score: ``[n]`` loss that ranks poses of one query for the best-pose choice (default: ``total``).
        converging: ``[n]`` bool, whether a query may stop at convergence now (default: all).
    """

    total: Tensor
    matching: Tensor
    photometric: Tensor
    depth: Tensor
    counts: Dict[int, int]
    coverage: Optional[Tensor] = None
    score: Optional[Tensor] = None
    converging: Optional[List[bool]] = None


class PoseObjective:
    """gsloc's objective: ``w_m * matching + w_p * photometric + w_d * depth`` with the stage's weights.

    Args:
        losses: the terms' switches and settings.
        matching: the matching term (its matches of the latest round), ``None`` when no stage matches.
    """

    def __init__(self, losses: LossConfig, matching: Optional["MatchingTerm"] = None) -> None:
        self.losses = losses
        self.matching = matching

    def __call__(
        self, batch: "BatchState", stage: "Stage", ids: List[int], c2w: Tensor, views: Optional[RenderedViews],
        width: int, height: int,
    ) -> LossTerms:
        """Loss of the queries ``ids`` at poses ``c2w [n, 3, 4]`` with their renders ``views`` at ``width x height``
        (``views`` is ``None`` when the stage does not render)."""
        cfg = self.losses
        zero = torch.zeros(len(ids), device=batch.device)
        loss_match, loss_photo, loss_depth = zero, zero, zero
        counts: Dict[int, int] = {i: 0 for i in ids}
        if stage.matching_weight > 0 and self.matching is not None:
            loss_match, counts = self.matching.loss(batch, ids, c2w)
        loss_anchor = zero
        if stage.scale is not None and cfg.anchor_weight > 0:
            loss_anchor = anchor_loss(batch, ids, c2w, cfg.huber_delta_px)
        coverage = None
        if views is not None:
            query_rgb, masks = batch.level_images(ids, width, height)
            valid = views.alpha >= cfg.alpha_threshold
            if masks is not None:
                valid = valid & masks
            coverage = valid.float().mean(dim=(1, 2, 3))
            if stage.photometric_weight > 0:
                color = batch.colors(ids)
                loss_photo = photometric_loss(
                    views.rgb, query_rgb, views.alpha, masks, ssim_weight=cfg.ssim_weight,
                    alpha_threshold=cfg.alpha_threshold, color_affine=color, robust_scale=cfg.robust_photometric,
                )
            if stage.depth_weight > 0 and batch.depths is not None:
                query_depth = batch.level_depths(ids, width, height, masks)
                loss_depth = depth_loss(
                    views.depth, query_depth, views.alpha, edge_weight=cfg.depth_edge_weight,
                    alpha_threshold=cfg.alpha_threshold,
                )
        total = (stage.matching_weight * loss_match + cfg.anchor_weight * loss_anchor
                 + stage.photometric_weight * loss_photo + stage.depth_weight * loss_depth)
        # The trace's matching column holds both reprojection terms (render matches and anchor), unweighted.
        return LossTerms(total, loss_match + loss_anchor, loss_photo, loss_depth, counts, coverage)


def anchor_loss(batch: "BatchState", ids: List[int], c2w: Tensor, huber_delta_px: float) -> Tensor:
    """``[n]`` mean Huber reprojection error of each query's anchor matches through ``c2w [n, 3, 4]`` (0 without)."""
    points, kpts, index = [], [], []
    for j, i in enumerate(ids):
        anchor = batch.states[i].anchor
        if anchor is not None and anchor.points_world.shape[0] > 0:
            points.append(anchor.points_world)
            kpts.append(anchor.kpts_query)
            index.append(torch.full((anchor.points_world.shape[0],), j, dtype=torch.long, device=batch.device))
    if not points:
        return torch.zeros(len(ids), device=batch.device) + 0.0 * c2w.sum()
    return reprojection_loss(torch.cat(points), torch.cat(kpts), torch.cat(index), c2w, batch.Ks[ids],
                             num_queries=len(ids), huber_delta_px=huber_delta_px)
