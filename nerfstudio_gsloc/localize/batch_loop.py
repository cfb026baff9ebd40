"""The loop of one batch of queries: its stages, each query's health checks, steps and convergence.

:class:`~nerfstudio_gsloc.localize.optimizer.PoseOptimizer` cuts the queries into batches and holds the
configuration, the objective and the matching term; a :class:`BatchLoop` runs them on one batch. A matching stage
(if any) runs rounds of render, match and PnP jump with reprojection-loss steps in between; then the refinement
levels descend the objective down the pyramid (the final level with Levenberg-Marquardt by default). Queries
localized by PnP skip the coarse levels (they are already in the fine basin).

Stopping: in the final stage a query stops when its pose update stays below ``rot_tol_deg`` and ``trans_tol``
for ``patience`` iterations (earlier stages end early when all queries are that still); the pose with the
lowest final-stage score is kept. A non-finite loss or pose, a camera that leaves the scene (rendered coverage
below ``min_coverage``) or one that runs too far from its start marks that query ``failed`` with the reason, and
the other queries of its batch continue.

Shapes: ``B`` queries in a batch, ``H x W`` full resolution, ``h x w`` the current pyramid level.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

import torch
from torch import Tensor

from nerfstudio_gsloc.localize.levenberg_marquardt import LevenbergMarquardt
from nerfstudio_gsloc.localize.result import LocalizationResult, StepCallback
from nerfstudio_gsloc.localize.schedule import INIT_STAGE, Stage, scale_intrinsics
from nerfstudio_gsloc.localize.state import BatchState, pose_change
from nerfstudio_gsloc.rendering import RenderedViews, render_splat_model

if TYPE_CHECKING:  # the owner's type only: optimizer.py imports this module, not the other way round
    from nerfstudio_gsloc.localize.optimizer import PoseOptimizer

class BatchLoop:
    """The stages of one batch: matching rounds, then refinement steps down the pyramid.

    Args:
        owner: the optimizer whose stages, objective, matching term and settings the loop uses.
        batch: the batch's queries and their states.
        on_finished: called with ``(position in the batch, result)`` once per query, as soon as it is final.
    """

    def __init__(self, owner: "PoseOptimizer", batch: BatchState,
                 on_finished: Callable[[int, LocalizationResult], None]) -> None:
        self.o = owner
        self.batch = batch
        self.states = batch.states
        self.on_finished = on_finished
        self.reported: set = set()

    def run(self, on_step: StepCallback) -> None:
        """Run every stage; each query's result goes to ``on_finished`` as soon as it is final (it converged or
        failed: see :meth:`report_finished`), the others' at the end."""
        # Row 0 of every trace is the initial pose (no loss yet), so plots show the whole descent.
        ids = self.batch.active_ids()
        nan = torch.full((len(ids),), float("nan"))
        c2w = torch.stack([self.states[i].base for i in ids]) if ids else torch.zeros(0, 3, 4)
        self.batch.record(INIT_STAGE, ids, nan, nan, nan, nan, {}, c2w, {i: "init" for i in ids})
        for stage in self.o.stages:
            if not self.batch.num_active():
                break
            if stage.scale is None:
                self.run_matching_stage(stage, on_step)
            else:
                self.run_refine_stage(stage, on_step)
        self.report_finished(everything=True)

    def report_finished(self, everything: bool = False) -> None:
        """Hand the results of queries that stopped (or, with ``everything``, of all queries) to ``on_finished``,
        each once, so a caller saves a query when it is done rather than when its whole batch is."""
        pending = [i for i in range(self.batch.B) if i not in self.reported and (everything or not self.states[i].active)]
        if not pending:
            return
        no_pnp_note = any(stage.pnp_jump for stage in self.o.stages)
        notes = None if self.o.notes is None else self.o.notes(self.batch)
        for i in pending:
            self.reported.add(i)
            self.on_finished(i, self.batch.result(i, no_pnp_note, None if notes is None else notes[i]))

    def after_step(self, on_step: StepCallback) -> None:
        if on_step is not None:
            on_step(self.batch.num_active())
        self.report_finished()

    def new_optimizers(self, stage: Stage) -> None:
        color_lr = self.o.optim.color_lr if stage.photometric_weight > 0 else None
        for state in self.states:
            state.new_optimizer(stage, color_lr)

    def run_matching_stage(self, stage: Stage, on_step: StepCallback) -> None:
        """Rounds of (render, match, PnP jump), with reprojection-loss steps for queries that did not jump.

        A query that jumped sits at the least-squares optimum of its inliers, so it waits for the next round;
        it is *settled* (skips later rounds) once a jump moves it less than ``pnp_settle_deg``/``pnp_settle_trans``.
        """
        assert self.o.matching is not None
        sched, batch = self.o.schedule, self.batch
        every = max(1, sched.rematch_every)
        self.new_optimizers(stage)
        for state in self.states:
            state.settled = state.anchor is not None  # already at a PnP pose of the map's matches
        for start in range(0, stage.iterations, every):
            ids = [i for i in batch.active_ids() if not self.states[i].settled]
            if not ids:
                break
            started = time.perf_counter()
            before = batch.current_c2w().detach()
            events = self.o.matching.match_round(batch, ids, stage, None)
            after = batch.current_c2w().detach()
            rot_jump, trans_jump = pose_change(after[ids], before[ids])
            jumped = [i for i in ids if events.get(i) in ("pnp_jump", "search_jump")]
            for j, i in enumerate(ids):
                state = self.states[i]
                state.iterations += 1
                if i in jumped and float(rot_jump[j]) < sched.pnp_settle_deg and float(trans_jump[j]) < sched.pnp_settle_trans:
                    state.settled = True
                if state.matches is None:
                    # Too few matches: no gradient moves it, so another round would see the same render.
                    state.settled = True
            # One trace row per matched query, at its pose after the round.
            with torch.no_grad():
                loss, counts = self.o.matching.loss(batch, ids, after[ids])
            zero = torch.zeros_like(loss)
            batch.record(stage, ids, loss * stage.matching_weight, loss, zero, zero, counts, after[ids], events)
            batch.share_time(ids, started)
            self.after_step(on_step)
            movers = [i for i in ids if i not in jumped and self.states[i].matches is not None]
            for it in range(start, min(start + every, stage.iterations)):
                movers = [i for i in movers if self.states[i].active]
                if not movers:
                    break
                started = time.perf_counter()
                self.step(stage, it, movers)
                batch.share_time(movers, started)
                self.after_step(on_step)

    def stage_members(self, stage: Stage) -> List[int]:
        """Active queries that take part in ``stage`` (PnP-localized queries skip coarse levels by default)."""
        coarse = stage.scale is not None and stage.scale > 1 and not stage.final
        skip = coarse and not self.o.schedule.coarse_after_pnp
        return [i for i in self.batch.active_ids() if not (skip and self.states[i].pnp_localized)]

    def start_stage(self, stage: Stage) -> None:
        """Fold the corrections into the base poses and, for pivot rotation, place each pivot at the median
        rendered depth along the optical axis (rendered at the stage's scale)."""
        batch = self.batch
        current = batch.fold_corrections()
        if self.o.optim.rotate_about != "pivot":
            return
        ids = self.stage_members(stage)
        with torch.no_grad():
            views = self.render(ids, current[ids], stage.scale or 1)[0]
        for state, c2w in zip(self.states, current):
            state.pivot = c2w[:, 3].clone()
        for j, i in enumerate(ids):
            depth = views.depth[j][views.alpha[j] >= self.o.losses.alpha_threshold]
            if depth.numel() > 0:
                forward = -current[i, :, 2]  # OpenGL cameras look along -z
                self.states[i].pivot = current[i, :, 3] + depth.median() * forward

    def run_refine_stage(self, stage: Stage, on_step: StepCallback) -> None:
        """Steps of the objective at one pyramid level."""
        if not self.stage_members(stage):
            return
        self.start_stage(stage)
        optim = self.o.optim
        # LM models the pose only: with colour correction (an affine optimised beside the pose) Adam stays
        if stage.final and optim.final_solver == "lm" and not self.o.losses.color_correction:
            members = self.stage_members(stage)
            solver = LevenbergMarquardt.for_stage(self.o.model, self.batch, stage, members, self.o.losses, optim)
            solver.run(self.batch, stage, members, lambda: self.after_step(on_step), self.check_bounds,
                       min(optim.lm_iterations, stage.iterations), optim)
            return
        self.new_optimizers(stage)
        patience = self.o.optim.patience
        for state in self.states:
            state.still = 0
        for it in range(stage.iterations):
            ids = self.stage_members(stage)
            if not ids:
                break
            started = time.perf_counter()
            rematch = self.o.matching is not None and stage.matching_weight > 0 and it % max(1, self.o.schedule.rematch_every) == 0
            self.step(stage, it, ids, rematch=rematch)
            self.batch.share_time(ids, started)
            self.after_step(on_step)
            # Earlier levels end as soon as every active query has stopped moving.
            if not stage.final and all(self.states[i].still >= patience for i in self.stage_members(stage)):
                break

    def render(self, ids: List[int], c2w: Tensor, scale: int) -> Tuple[RenderedViews, int, int]:
        """Render the queries ``ids`` at pyramid ``scale`` in one call; returns the views, ``w`` and ``h``."""
        batch = self.batch
        Ks, w, h = scale_intrinsics(batch.Ks[ids], batch.width, batch.height, scale)
        return render_splat_model(self.o.model, c2w, Ks, w, h, background=batch.background), w, h

    def step(self, stage: Stage, it: int, ids: List[int], rematch: bool = False) -> None:
        """One optimisation step of ``stage`` for the queries ``ids`` (rendered together when the stage renders)."""
        batch, optim_cfg = self.batch, self.o.optim
        views = None
        w, h = batch.width, batch.height
        c2w = batch.current_c2w()[ids]
        if stage.renders:
            views, w, h = self.render(ids, c2w, stage.scale)
        events: Dict[int, str] = {}
        if rematch:
            reuse = None
            if views is not None and (w, h) == (batch.width, batch.height):
                reuse = RenderedViews(views.rgb.detach(), views.depth.detach(), views.alpha.detach())
            events = self.o.matching.match_round(batch, ids, stage, reuse)
        terms = self.o.objective(batch, stage, ids, c2w, views, w, h)
        total = terms.total

        # Per-query health checks before the step: a bad query is dropped, the others go on.
        finite = torch.isfinite(total) & torch.isfinite(c2w.detach()).flatten(1).all(dim=1)
        keep = []
        for j, i in enumerate(ids):
            if not bool(finite[j]):
                self.states[i].fail(f"non-finite loss or pose at {stage.name} iteration {it}")
            elif terms.coverage is not None and float(terms.coverage[j]) < optim_cfg.min_coverage:
                self.states[i].fail(
                    f"camera lost sight of the scene at {stage.name} iteration {it} (coverage {float(terms.coverage[j]):.4f})"
                )
            else:
                keep.append(j)
        batch.record(stage, ids, total.detach(), terms.matching.detach(), terms.photometric.detach(),
                     terms.depth.detach(), terms.counts, c2w.detach(), events)
        if stage.final:
            score = total if terms.score is None else terms.score
            for j in keep:
                state = self.states[ids[j]]
                if float(score[j].detach()) < state.best_loss:
                    state.best_loss = float(score[j].detach())
                    state.best_c2w = c2w[j].detach()
        if not keep:
            return

        stepping = [self.states[ids[j]] for j in keep]
        for state in stepping:
            state.optimizer.zero_grad(set_to_none=True)
        total[keep].sum().backward()
        for state in stepping:
            state.set_lr(stage, it, optim_cfg.lr_final_ratio)
            state.optimizer.step()
        with torch.no_grad():
            new_c2w = batch.current_c2w()[ids]
        rot_step, trans_step = pose_change(new_c2w, c2w.detach())
        healthy = set(self.check_bounds(stage, it, [ids[j] for j in keep], new_c2w[keep]))
        for j in keep:
            state = self.states[ids[j]]
            state.iterations += 1
            if ids[j] not in healthy:
                continue
            small = float(rot_step[j]) < optim_cfg.rot_tol_deg and float(trans_step[j]) < optim_cfg.trans_tol
            may_stop = terms.converging is None or terms.converging[j]
            state.still = state.still + 1 if (small and may_stop) else 0
            if stage.final and state.still >= optim_cfg.patience:
                state.converge()

    def check_bounds(self, stage: Stage, it: int, ids: List[int], new_c2w: Tensor) -> List[int]:
        """Fail the queries ``ids`` whose new poses ``new_c2w [n, 3, 4]`` are non-finite or have run further from
        their initial poses than the divergence bounds; returns the others."""
        optim_cfg = self.o.optim
        rot_total, trans_total = pose_change(new_c2w, torch.stack([self.states[i].c2w_init for i in ids]))
        healthy = []
        for j, i in enumerate(ids):
            state = self.states[i]
            if not bool(torch.isfinite(new_c2w[j]).all()):
                state.fail(f"non-finite pose after {stage.name} iteration {it}")
            elif float(rot_total[j]) > optim_cfg.max_rotation_deg or float(trans_total[j]) > optim_cfg.max_translation:
                state.fail(
                    f"diverged at {stage.name} iteration {it}: {float(rot_total[j]):.1f} deg / "
                    f"{float(trans_total[j]):.3f} units from the initial pose"
                )
            else:
                healthy.append(i)
        return healthy
