"""Levenberg-Marquardt for the final refinement level: a few well-aimed steps instead of many Adam steps.

Adam moves a pose by about its learning rate per step whatever the curvature, so from a pose that PnP already
put within a few hundredths of a degree it still takes the whole decay schedule (about 50 renders with their
backward pass) before its steps fall under the stopping tolerance. Near the optimum the render is a smooth
function of the 6 pose parameters, so a Gauss-Newton model of the loss is accurate, and Levenberg-Marquardt
reaches the minimum in a handful of steps.

One iteration for a query:

1. render its current pose (forward only, batched over the queries) and take the Jacobian of the residuals with
   respect to the 6 pose parameters (rotation about the stage's pivot, centre translation) from that render: its
   image and depth gradients times each pixel's motion (``optim.lm_jacobian render-gradient``, the default, see
   :mod:`~nerfstudio_gsloc.localize.image_jacobian`), or (``finite-difference``) the forward difference of renders
   of the pose moved along each parameter by a step that moves the image by about ``lm_step_px`` pixels;
2. residuals (smooth L1 below ``l1_floor``): colour differences over the pixels the current render covers (alpha and query mask), depth
   differences where the query has depth, and the anchor's reprojection errors; each term is reweighted as in
   iteratively reweighted least squares so that the quadratic model matches the loss gradient-descent uses
   (L1 colour and depth, Huber anchor), with the objective's weights (:mod:`~nerfstudio_gsloc.localize.lm_residuals`);
3. solve ``(J^T W J + lambda diag(J^T W J)) delta = -J^T W r`` and render the trial pose: accepted when the loss is
   lower (``lambda`` shrinks), otherwise ``lambda`` grows and the step is solved again from the same Jacobian.

A finite-difference Jacobian is kept for ``refresh`` accepted steps (chord steps: the trial render gives the new
residuals); a render-gradient one is taken again from each accepted trial's render. A
query converges when an accepted step is below the stopping tolerances (or, with ``lm_gain_tol``, lowered the
loss by less than that fraction), or when no step lowers the loss any more (``lambda`` past its cap, or a rejected
step whose model promised less than ``lm_ftol``, with a fresh or a kept Jacobian). Not modelled: the D-SSIM part
of the photometric term and the depth-edge part of the depth term (both are zero at a perfect fit, and the L1 parts pull towards the same pose).

Shapes: ``n`` queries, ``P = 7`` poses per query for a finite-difference Jacobian (1 otherwise), ``h x w`` the
stage's level.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_gsloc.localize.lm_residuals import LMResiduals
from nerfstudio_gsloc.localize.objective import LossConfig
from nerfstudio_gsloc.localize.pose import apply_pivoted_correction
from nerfstudio_gsloc.localize.schedule import OptimConfig, Stage, scale_intrinsics
from nerfstudio_gsloc.localize.state import BatchState
from nerfstudio_gsloc.rendering import RenderedViews, frustum_subset, render_splat_model

#: ``(c2w [m, 3, 4], Ks [m, 3, 3], w, h) -> views`` (forward only).
RenderFn = Callable[[Tensor, Tensor, int, int], RenderedViews]

_LAMBDA_START, _LAMBDA_MAX = 1e-3, 1e4


def _below(step: Tensor, rot_tol_deg: float, trans_tol: float) -> bool:
    """Whether a pose step ``[6]`` (rotation radians, translation) is under both stopping tolerances."""
    return float(step[:3].norm()) * 180.0 / math.pi < rot_tol_deg and float(step[3:].norm()) < trans_tol


@dataclass
class _Linearisation:
    """One query's residuals ``r [N]``, Jacobian ``J [N, 6]`` and IRLS weights ``W [N]`` at its current pose, with
    the fixed pixel masks and parameter steps they were measured with."""

    r: Tensor
    J: Tensor
    W: Tensor
    mask: Tensor
    depth_mask: Optional[Tensor]
    steps: Tensor
    loss: float
    parts: Tuple[float, float, float]
    age: int = 0
    """Accepted steps since ``J`` was measured (the residuals and weights are always current)."""


class LevenbergMarquardt:
    """Runs the final refinement stage of a batch with Levenberg-Marquardt (see the module docstring).

    Args:
        losses: the objective's terms and weights (only L1 colour, L1 depth and the Huber anchor are modelled).
        step_px: image motion of the finite-difference steps, in pixels of the stage's level.
        render: forward renderer of the model.
        refresh: the Jacobian is measured again after this many accepted steps (or when a step with an older
            Jacobian fails).
        l1_floor: colour / depth residuals below this size count quadratically (smooth L1), so that the IRLS
            weights ``1 / |r|`` stay bounded and the many nearly-fitting pixels do not dominate the step.
        jacobian: ``render-gradient`` (from the current render) or ``finite-difference`` (6 moved renders).
    """

    def __init__(self, losses: LossConfig, step_px: float, render: RenderFn, refresh: int = 4,
                 l1_floor: float = 0.03, jacobian: str = "render-gradient") -> None:
        if jacobian not in ("finite-difference", "render-gradient"):
            raise ValueError(f"unknown Jacobian {jacobian!r}: finite-difference or render-gradient")
        self.losses = losses
        self.step_px = float(step_px)
        self.render = render
        self.jacobian = jacobian
        # a render-gradient Jacobian costs no render: measure it at every accepted step (Gauss-Newton proper)
        self.refresh = 1 if jacobian == "render-gradient" else max(1, int(refresh))
        self.terms = LMResiduals(losses, l1_floor)
        # each query's latest render at its base pose (the accepted trial or the linearisation's centre), so that
        # measuring the Jacobian again at that pose does not render it again
        self._base_views: Dict[int, Tuple[Tensor, RenderedViews]] = {}

    @classmethod
    def for_stage(cls, model, batch: BatchState, stage: Stage, ids: List[int], losses: LossConfig,
                  optim: OptimConfig) -> "LevenbergMarquardt":
        """The solver of ``stage`` for the queries ``ids`` of ``batch``, rendering ``model`` forward only. Its poses
        stay close to the current ones, so only the Gaussians in (a margin around) these views are projected,
        coloured and binned (:func:`~nerfstudio_gsloc.rendering.frustum_subset`)."""
        Ks_level, w, h = scale_intrinsics(batch.Ks, batch.width, batch.height, stage.scale)
        with torch.no_grad():
            current = batch.current_c2w()[ids]
        visible = frustum_subset(model, current, Ks_level[ids], w, h)

        def render(c2w: Tensor, Ks: Tensor, width: int, height: int) -> RenderedViews:
            return render_splat_model(visible, c2w, Ks, width, height, background=batch.background)

        return cls(losses, optim.lm_step_px, render, refresh=optim.lm_refresh, l1_floor=optim.lm_l1_floor,
                   jacobian=optim.lm_jacobian)

    # -- one query's linearisation ---------------------------------------------------------------------------

    def parameter_steps(self, K_level: Tensor, depth: Tensor) -> Tensor:
        """``[6]`` finite-difference steps (rotation radians, translation units) that move the image by about
        ``step_px`` pixels: ``step / f`` for a rotation, ``step * depth / f`` for a translation at the median depth."""
        focal = float(K_level[0, 0])
        rot = self.step_px / focal
        trans = rot * max(float(depth), 1e-3)
        return torch.tensor([rot] * 3 + [trans] * 3, dtype=torch.float64)

    def moved(self, base: Tensor, pivot: Optional[Tensor], xi: Tensor) -> Tensor:
        """Poses ``[P, 3, 4]``: ``base [3, 4]`` moved by each row of ``xi [P, 6]`` (rotation, translation)."""
        P = xi.shape[0]
        xi = xi.to(base)
        return apply_pivoted_correction(base.expand(P, 3, 4), xi[:, :3], xi[:, 3:],
                                        None if pivot is None else pivot.expand(P, 3))

    def solve(self, lin: _Linearisation, lam: float) -> Tuple[Tensor, float]:
        """The damped Gauss-Newton step ``[6]`` in parameter units, and the decrease of the weighted squared
        residuals ``r^T W r`` the linear model predicts for it, as a fraction of their current value."""
        JW = lin.J * lin.W[:, None]
        A = JW.T @ lin.J
        g = JW.T @ lin.r
        damping = lam * torch.diag(torch.diag(A)) + 1e-12 * torch.eye(6, dtype=A.dtype)
        delta = -torch.linalg.solve(A + damping, g)
        # model: (r + J d)^T W (r + J d) = r^T W r + 2 g^T d + d^T A d
        predicted = -(2.0 * float(g @ delta) + float(delta @ A @ delta))
        return delta, predicted / max(float((lin.W * lin.r * lin.r).sum()), 1e-30)

    def run(self, batch: BatchState, stage: Stage, ids: List[int], after_iteration: Callable[[], None],
            check: Callable[[Stage, int, List[int], Tensor], List[int]], max_iterations: int,
            optim: OptimConfig) -> None:
        """Refine the queries ``ids`` of ``batch`` at ``stage`` (its scale, weights) in place: their base poses
        move, the best pose and the trace are kept, and each ends converged, failed or at the iteration limit.

        Args:
            after_iteration: called after each iteration (progress, results of finished queries).
            check: ``(stage, iteration, ids, new_c2w [n, 3, 4])`` fails queries out of bounds (divergence, NaN).
            max_iterations: at most this many iterations (each: one Jacobian, or one retry with more damping).
            optim: ``rot_tol_deg``, ``trans_tol`` (an accepted step smaller than both ends the query: converged)
                and ``min_coverage`` (a render covering less of the image: failed).
        """
        rot_tol_deg, trans_tol, min_coverage = optim.rot_tol_deg, optim.trans_tol, optim.min_coverage
        states = batch.states
        Ks_level, w, h = scale_intrinsics(batch.Ks, batch.width, batch.height, stage.scale)
        lams: Dict[int, float] = {i: _LAMBDA_START for i in ids}
        lins: Dict[int, Optional[_Linearisation]] = {i: None for i in ids}
        for it in range(max_iterations):
            active = [i for i in ids if states[i].active]
            if not active:
                return
            started = time.perf_counter()
            need = [i for i in active if lins[i] is None]
            if need:
                for i, lin in zip(need, self.linearise(batch, stage, need, Ks_level, w, h, min_coverage)):
                    lins[i] = lin
            stepping = [i for i in active if states[i].active and lins[i] is not None]
            if stepping:
                self.try_steps(batch, stage, stepping, lins, lams, Ks_level, w, h, rot_tol_deg, trans_tol, optim.lm_ftol,
                               optim.lm_gain_tol)
                check(stage, it, stepping, torch.stack([states[i].base for i in stepping]))
            batch.share_time(active, started)
            after_iteration()

    def try_steps(self, batch: BatchState, stage: Stage, ids: List[int], lins: Dict[int, Optional[_Linearisation]],
                  lams: Dict[int, float], Ks_level: Tensor, w: int, h: int, rot_tol_deg: float, trans_tol: float,
                  ftol: float = 0.0, gain_tol: float = 0.0) -> None:
        """Solve, render and accept or reject one damped step of each query ``ids`` (one batched render)."""
        states = batch.states
        solved = {i: self.solve(lins[i], lams[i]) for i in ids}
        deltas = {i: delta for i, (delta, _) in solved.items()}
        trial = torch.stack([self.moved(states[i].base, states[i].pivot, deltas[i][None])[0] for i in ids])
        with torch.no_grad():
            views = self.render(trial, Ks_level[ids], w, h)
        for j, i in enumerate(ids):
            lin, state = lins[i], states[i]
            r, scale, parts = self.terms.residuals(batch, stage, i, _select(views, j), trial[j:j + 1], lin.mask,
                                                   lin.depth_mask, w, h)
            loss = float((scale * self.terms.rho(r[0], self.terms.anchor_count(batch, i))).sum())
            state.iterations += 1
            if loss < lin.loss:
                gain = (lin.loss - loss) / max(lin.loss, 1e-30)
                state.base = trial[j].detach().clone()
                self._base_views[i] = (state.base, _select(views, j))
                lams[i] = max(lams[i] / 3.0, 1e-7)
                # Chord step: over a step of a few hundredths of a degree the Jacobian barely changes, so it is
                # kept (the trial's render already gives the new residuals) and measured again every few steps.
                if lin.age + 1 >= self.refresh:
                    lins[i] = None
                else:
                    lin.r, lin.loss, lin.parts, lin.age = r[0], loss, parts, lin.age + 1
                    lin.W = self.terms.irls_weights(r[0], scale, self.terms.anchor_count(batch, i))
                if loss < state.best_loss:
                    state.best_loss, state.best_c2w = loss, state.base.clone()
                if _below(deltas[i], rot_tol_deg, trans_tol) or gain < gain_tol:
                    state.converge()
                event = "lm_step"
            elif lin.age > 0 and solved[i][1] >= ftol:
                # An old Jacobian may be what failed: measure it again before damping more. Not when even it
                # promised almost nothing (noise floor: a new one, 7 renders, would promise as little), which the
                # ``lm_ftol`` rule below ends as for a fresh Jacobian.
                lins[i] = None
                event = "lm_refresh"
                loss, parts = lin.loss, lin.parts
            else:
                lams[i] *= 4.0
                # No step lowers the loss any more, or even this rejected one was under the stopping tolerances
                # (more damping only shortens it), or the model promised almost nothing (``optim.lm_ftol``): at its
                # minimum as far as the render resolves.
                if lams[i] > _LAMBDA_MAX or _below(deltas[i], rot_tol_deg, trans_tol) or solved[i][1] < ftol:
                    state.converge()
                event = "lm_reject"
                loss, parts = lin.loss, lin.parts
            _record(batch, stage, i, state.base, loss, parts, event)

    def linearise(self, batch: BatchState, stage: Stage, ids: List[int], Ks_level: Tensor, w: int, h: int,
                  min_coverage: float) -> List[Optional[_Linearisation]]:
        """Residuals, Jacobians and weights of ``ids`` at their current (base) poses: one render call of the poses
        not rendered there yet (their masks and depths set the steps) and, for a finite-difference Jacobian, one
        of their 6 moved copies. A query whose render covers too little of the image fails (``None``)."""
        states = batch.states
        centre = self._centre_views(batch, ids, Ks_level, w, h)
        poses, steps_all, masks = [], [], []
        for j, i in enumerate(ids):
            valid = centre.alpha[j, ..., 0] >= self.losses.alpha_threshold
            qmask = self.terms.target(batch, i, w, h)[1]
            if qmask is not None:
                valid = valid & qmask
            depth = centre.depth[j, ..., 0][valid]
            steps = self.parameter_steps(Ks_level[i], depth.median() if depth.numel() else 1.0)
            poses.append(self.moved(states[i].base, states[i].pivot, torch.diag(steps)))  # 6 moved poses
            steps_all.append(steps)
            masks.append(valid)
        moved = None
        if self.jacobian == "finite-difference":
            with torch.no_grad():
                moved = self.render(torch.cat(poses), torch.cat([Ks_level[i].expand(6, 3, 3) for i in ids]), w, h)
        out: List[Optional[_Linearisation]] = []
        for j, i in enumerate(ids):
            mask = masks[j]
            if float(mask.float().mean()) < min_coverage:
                states[i].fail(f"camera lost sight of the scene at {stage.name} (coverage {float(mask.float().mean()):.4f})")
                out.append(None)
                continue
            depth_mask = None
            if batch.depths is not None and stage.depth_weight > 0:
                depth_mask = mask & (self.terms.target(batch, i, w, h)[2] > 0)
            if moved is not None:
                sel = _concat(_select(moved, slice(6 * j, 6 * j + 6)), _select(centre, j))  # the 6 moved, then the pose
                pose_rows = torch.cat([poses[j], states[i].base[None]])
            else:
                sel, pose_rows = _select(centre, j), states[i].base[None]
            r, scale, parts = self.terms.residuals(batch, stage, i, sel, pose_rows, mask, depth_mask, w, h)
            if not bool(torch.isfinite(r).all()):
                states[i].fail(f"non-finite residuals at {stage.name} (Levenberg-Marquardt)")
                out.append(None)
                continue
            if moved is not None:
                J = (r[:6] - r[6:7]).T / steps_all[j][None, :]  # [N, 6] forward differences
            else:
                J = self.terms.gradient_jacobian(batch, stage, i, _select(centre, j), poses[j], steps_all[j],
                                                 Ks_level[i], mask, depth_mask)
            r = r[-1]
            anchor_count = self.terms.anchor_count(batch, i)
            W = self.terms.irls_weights(r, scale, anchor_count)
            loss = float((scale * self.terms.rho(r, anchor_count)).sum())
            if loss < states[i].best_loss:  # the starting pose is a candidate too
                states[i].best_loss, states[i].best_c2w = loss, states[i].base.clone()
            out.append(_Linearisation(r, J, W, mask, depth_mask, steps_all[j], loss, parts))
        return out

    def _centre_views(self, batch: BatchState, ids: List[int], Ks_level: Tensor, w: int, h: int) -> RenderedViews:
        """Renders ``[n]`` of ``ids`` at their base poses: the remembered render where the pose is the same, one
        batched render of the others."""
        states = batch.states
        fresh = [i for i in ids if i not in self._base_views or not torch.equal(self._base_views[i][0], states[i].base)]
        if fresh:
            with torch.no_grad():
                views = self.render(torch.stack([states[i].base for i in fresh]), Ks_level[fresh], w, h)
            for j, i in enumerate(fresh):
                self._base_views[i] = (states[i].base.clone(), _select(views, j))
        return _concat(*[self._base_views[i][1] for i in ids])


def _record(batch: BatchState, stage: Stage, i: int, c2w: Tensor, loss: float, parts: Tuple[float, float, float],
            event: str) -> None:
    """One trace row of query ``i`` (parts: anchor, photometric, depth; the anchor goes in the matching column)."""
    row = lambda v: torch.tensor([float(v)])  # noqa: E731
    batch.record(stage, [i], row(loss), row(parts[0]), row(parts[1]), row(parts[2]), {}, c2w[None], {i: event})


def _select(views: RenderedViews, index) -> RenderedViews:
    """The views ``index`` (an int keeps a batch dimension of 1)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return RenderedViews(views.rgb[index], views.depth[index], views.alpha[index])


def _concat(*views: RenderedViews) -> RenderedViews:
    return RenderedViews(torch.cat([v.rgb for v in views]), torch.cat([v.depth for v in views]),
                         torch.cat([v.alpha for v in views]))

