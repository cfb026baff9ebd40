"""Per-query state of the pose optimiser: one record per query, and the batch that renders them together.

Each :class:`QueryState` owns its pose parameters (``rotation``, ``translation`` and optionally an affine
``color``) and its own Adam optimiser. A query that is not stepped in an iteration (finished, failed, waiting
for the next matching round, or sitting out a coarse level) simply is not stepped: nothing of the other queries
is touched and no optimiser internals are edited. Moving a query to a new base pose (a PnP jump) gives it a
fresh optimiser.

:class:`BatchState` holds the queries of one batch (same image size and background) with their stacked images,
intrinsics, depths and masks, computes the batch's current poses in one differentiable call, and writes the
trace rows and the final :class:`~nerfstudio_gsloc.localize.result.LocalizationResult` s.

Shapes: ``B`` queries in the batch, ``H x W`` full resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.localize.pose import apply_pivoted_correction
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import (
    STATUS_CONVERGED,
    STATUS_FAILED,
    STATUS_MAX_ITERATIONS,
    LocalizationResult,
)
from nerfstudio_gsloc.localize.schedule import Stage, decayed_lr, downsample, downsample_depth


def pose_change(c2w_a: Tensor, c2w_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Rotation (degrees) and centre distance between two batches of ``[B, 3, 4]`` poses."""
    return rotation_error_deg(c2w_a, c2w_b).float(), translation_error(c2w_a, c2w_b).float()


@dataclass
class MatchState:
    """Matches of one query from its latest matching round (world points and query pixels, full resolution)."""

    points_world: Tensor  # [m, 3]
    kpts_query: Tensor  # [m, 2]
    num_inliers: int = 0


@dataclass
class QueryState:
    """Everything the optimiser knows about one query while it runs.

    Attributes:
        query: the query.
        base: ``[3, 4]`` pose the correction applies to (re-based at stage starts and PnP jumps).
        c2w_init: ``[3, 4]`` the initial pose (divergence bounds are measured from it).
        rotation, translation: ``[3]`` the correction (see :func:`~nerfstudio_gsloc.localize.pose.apply_correction`).
        color: ``[3, 4]`` affine colour correction of the render, when enabled.
        optimizer: Adam over this query's parameters for the current stage.
        pivot: ``[3]`` point the rotation turns about in refinement stages (``None``: the camera centre).
        active: still being optimised.
        status, reason: see :class:`~nerfstudio_gsloc.localize.result.LocalizationResult`.
        best_loss, best_c2w: lowest final-stage score and its pose.
        iterations, seconds: steps taken and wall time attributed.
        matches, inliers: latest matching round.
        pnp_localized: the last matching-stage round found a PnP pose; searched: the look-around was tried;
        settled: skips the remaining matching rounds; still: consecutive iterations with a small update;
        matching_on: the matching term is on (iComMa switches it off for good); switched_off_at: when.
        anchor: fixed 2D-3D matches (e.g. the map's PnP inliers) whose reprojection error joins the refinement
            objective, so the pose cannot drift from the geometric consensus; a query with an anchor starts at
            its PnP pose and skips the matching stage.
        candidates: poses reached on the way (``(name, c2w)``), kept for the final choice between hypotheses.
        trace: one dict per iteration.
    """

    query: Query
    base: Tensor
    c2w_init: Tensor
    gt: Optional[Tensor]
    rotation: nn.Parameter
    translation: nn.Parameter
    color: Optional[nn.Parameter] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    pivot: Optional[Tensor] = None
    active: bool = True
    status: str = STATUS_MAX_ITERATIONS
    reason: str = "stopped at the iteration limit before the pose update fell below tolerance"
    best_loss: float = math.inf
    best_c2w: Optional[Tensor] = None
    iterations: int = 0
    seconds: float = 0.0
    matches: Optional[MatchState] = None
    inliers: int = 0
    pnp_localized: bool = False
    searched: bool = False
    settled: bool = False
    still: int = 0
    matching_on: bool = True
    switched_off_at: Optional[int] = None
    anchor: Optional[MatchState] = None
    candidates: List[Tuple[str, Tensor]] = field(default_factory=list)
    trace: List[Dict[str, object]] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.active, self.status, self.reason = False, STATUS_FAILED, reason

    def converge(self) -> None:
        self.active, self.status, self.reason = False, STATUS_CONVERGED, ""

    def new_optimizer(self, stage: Stage, color_lr: Optional[float]) -> None:
        """A fresh Adam for ``stage`` (``base_lr`` of each group is its undecayed rate)."""
        groups = [
            {"params": [self.rotation], "lr": stage.rotation_lr, "base_lr": stage.rotation_lr},
            {"params": [self.translation], "lr": stage.translation_lr, "base_lr": stage.translation_lr},
        ]
        if self.color is not None and color_lr is not None:
            groups.append({"params": [self.color], "lr": color_lr, "base_lr": color_lr})
        self.optimizer = torch.optim.Adam(groups)

    def set_lr(self, stage: Stage, iteration: int, final_ratio: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = decayed_lr(group["base_lr"], stage, iteration, final_ratio)


class BatchState:
    """The queries of one batch (same size and background) and their stacked inputs on the model's device.

    Args:
        queries: the batch's queries.
        initial_c2w: one ``[3, 4]`` scene-frame start pose each.
        device: the model's device.
        color_correction: give each query an affine colour correction.
        anchors: per query, fixed matches for the reprojection anchor (see :class:`QueryState`) or ``None``.
    """

    def __init__(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor], device: torch.device,
                 color_correction: bool = False, anchors: Optional[Sequence[Optional[MatchState]]] = None) -> None:
        self.B = len(queries)
        self.device = device
        self.width, self.height = queries[0].width, queries[0].height
        self.Ks = torch.stack([q.K.float() for q in queries]).to(device)  # [B, 3, 3]
        self.images = torch.stack([q.image.float() for q in queries]).to(device)  # [B, H, W, 3]
        self.depths: Optional[Tensor] = None  # [B, H, W, 1], zeros for queries without depth
        if any(q.depth is not None for q in queries):
            zeros = torch.zeros(self.height, self.width)
            self.depths = torch.stack([q.depth if q.depth is not None else zeros for q in queries])[..., None].to(device)
        self.masks: Optional[Tensor] = None  # [B, H, W, 1] bool
        if any(q.mask is not None for q in queries):
            ones = torch.ones(self.height, self.width, dtype=torch.bool)
            self.masks = torch.stack([q.mask if q.mask is not None else ones for q in queries])[..., None].to(device)
        bg = queries[0].background
        self.background = None if bg is None else bg.float().to(device)
        self.states: List[QueryState] = []
        for query, c2w in zip(queries, initial_c2w):
            base = c2w[:3, :4].float().to(device)
            state = QueryState(
                query=query, base=base, c2w_init=base.clone(), best_c2w=base.clone(),
                gt=None if query.gt_c2w is None else query.gt_c2w[:3, :4].float().to(device),
                rotation=nn.Parameter(torch.zeros(3, device=device)),
                translation=nn.Parameter(torch.zeros(3, device=device)),
                color=nn.Parameter(torch.eye(3, 4, device=device)) if color_correction else None,
            )
            if not bool(torch.isfinite(base).all()):
                state.fail("non-finite initial pose")
            anchor = None if anchors is None else anchors[len(self.states)]
            if anchor is not None:
                state.anchor = MatchState(anchor.points_world.float().to(device), anchor.kpts_query.float().to(device),
                                          anchor.num_inliers)
                state.pnp_localized, state.inliers = True, anchor.num_inliers
            self.states.append(state)

    # -- poses -----------------------------------------------------------------------------------------------

    def current_c2w(self) -> Tensor:
        """``[B, 3, 4]`` current poses (differentiable w.r.t. every query's correction).

        With pivots, the rotation turns the camera about the pivot point instead of its centre: the centre
        moves by ``(dR - I)(c - p)`` with ``dR`` the world-frame rotation of the correction.
        """
        base = torch.stack([s.base for s in self.states])
        rotation = torch.stack([s.rotation for s in self.states])
        translation = torch.stack([s.translation for s in self.states])
        pivot = None if self.states[0].pivot is None else torch.stack([s.pivot for s in self.states])
        return apply_pivoted_correction(base, rotation, translation, pivot)

    def rebase(self, i: int, c2w: Tensor, stage: Stage) -> None:
        """Make ``c2w [3, 4]`` the new base pose of query ``i`` (zero correction, a fresh optimiser)."""
        state = self.states[i]
        with torch.no_grad():
            state.base = c2w.to(state.base).clone()
            state.rotation.zero_()
            state.translation.zero_()
        state.new_optimizer(stage, None)

    def fold_corrections(self) -> Tensor:
        """Fold every correction into its base pose (zero corrections, no pivots); returns the ``[B, 3, 4]`` poses."""
        with torch.no_grad():
            current = self.current_c2w().detach()
            for state, c2w in zip(self.states, current):
                state.base = c2w.clone()
                state.rotation.zero_()
                state.translation.zero_()
                state.pivot = None
        return current

    def colors(self, ids: List[int]) -> Optional[Tensor]:
        """``[n, 3, 4]`` affine colour corrections of ``ids`` (``None`` without colour correction)."""
        if self.states[0].color is None:
            return None
        return torch.stack([self.states[i].color for i in ids])

    # -- inputs at a pyramid level ---------------------------------------------------------------------------

    def level_images(self, ids: List[int], width: int, height: int) -> Tuple[Tensor, Optional[Tensor]]:
        """Query images ``[n, h, w, 3]`` and masks ``[n, h, w, 1]`` (or ``None``) of ``ids`` at ``width x height``."""
        rgb = downsample(self.images[ids], width, height)
        masks = None if self.masks is None else downsample(self.masks[ids].float(), width, height) > 0.5
        return rgb, masks

    def level_depths(self, ids: List[int], width: int, height: int, masks: Optional[Tensor]) -> Tensor:
        """Query depths ``[n, h, w, 1]`` of ``ids`` at ``width x height`` (0 = no depth, also outside ``masks``)."""
        assert self.depths is not None
        depth = downsample_depth(self.depths[ids], width, height)
        if masks is not None:
            depth = torch.where(masks, depth, torch.zeros_like(depth))
        return depth

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def active_ids(self) -> List[int]:
        return [i for i, s in enumerate(self.states) if s.active]

    def num_active(self) -> int:
        return sum(s.active for s in self.states)

    def share_time(self, ids: List[int], started: float) -> None:
        """Share the wall time since ``started`` equally among ``ids``."""
        elapsed = time.perf_counter() - started
        for i in ids:
            self.states[i].seconds += elapsed / max(1, len(ids))

    def record(self, stage: Stage, ids: List[int], total: Tensor, lm: Tensor, lp: Tensor, ld: Tensor,
               counts: Dict[int, int], c2w: Tensor, events: Dict[int, str]) -> None:
        """Append one trace row per query in ``ids`` at poses ``c2w [n, 3, 4]`` (errors when the truth is known)."""
        for j, i in enumerate(ids):
            state = self.states[i]
            rot = trans = None
            if state.gt is not None:
                r, t = pose_change(c2w[j : j + 1], state.gt[None])
                rot, trans = float(r[0]), float(t[0])
            state.trace.append(
                {
                    "query": state.query.name, "index": state.query.index, "iteration": len(state.trace),
                    "stage": stage.name, "scale": stage.scale if stage.scale is not None else 1,
                    "loss": float(total[j]), "loss_matching": float(lm[j]), "loss_photometric": float(lp[j]),
                    "loss_depth": float(ld[j]), "num_matches": counts.get(i, 0), "rot_err_deg": rot,
                    "trans_err": trans, "event": events.get(i, ""),
                }
            )

    def results(self, no_pnp_note: bool, notes: Optional[List[str]] = None) -> List[LocalizationResult]:
        """One result per query (see :meth:`result`); ``notes``: an extra note per query, or ``None``."""
        return [self.result(i, no_pnp_note, None if notes is None else notes[i]) for i in range(self.B)]

    def result(self, i: int, no_pnp_note: bool, note: Optional[str] = None) -> LocalizationResult:
        """The result of query ``i``: the best final-stage pose (else the last finite pose, else the base pose).

        Final once the query is inactive (converged or failed): an inactive query's pose no longer changes.

        Args:
            no_pnp_note: add a note when no PnP jump localized the query (the schedule had a matching stage).
            note: an extra note (e.g. iComMa's switch-off), or ``None``.
        """
        state = self.states[i]
        reached_final = math.isfinite(state.best_loss)
        c2w = state.best_c2w if reached_final else self.current_c2w().detach()[i]
        if not bool(torch.isfinite(c2w).all()):
            c2w = state.base
        rot = trans = None
        if state.gt is not None:
            r, t = pose_change(c2w[None], state.gt[None])
            rot, trans = float(r[0]), float(t[0])
        reason = state.reason
        extra = []
        if no_pnp_note and not state.pnp_localized and state.status != STATUS_FAILED:
            # Worth knowing: without a PnP pose only the (narrow-basin) photometric terms moved this query.
            extra.append("no PnP pose from feature matches; refined by the photometric/depth terms only")
        if note and state.status != STATUS_FAILED:
            extra.append(note)
        for text in extra:
            reason = f"{reason}; {text}" if reason else text
        return LocalizationResult(
            name=state.query.name, index=state.query.index, c2w=c2w.detach().cpu().clone(),
            c2w_init=state.c2w_init.cpu().clone(), status=state.status, reason=reason,
            iterations=state.iterations, seconds=state.seconds, inliers=int(state.inliers),
            loss=state.best_loss if reached_final else float("nan"), rot_err_deg=rot, trans_err=trans,
            trace=state.trace, candidates=[(name, pose.detach().cpu().clone()) for name, pose in state.candidates],
        )
