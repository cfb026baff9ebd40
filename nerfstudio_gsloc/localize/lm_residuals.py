"""The residuals of the Levenberg-Marquardt final level: what is compared, with which weights, and their Jacobian.

One query's residual vector ``r [N]`` stacks, in this order (the solver's rows follow it):

* colour: render minus query over the pixels the render covers (rendered alpha at least
  ``losses.alpha_threshold``, and the query's mask), 3 values per pixel, pixel-major;
* depth: rendered minus query z-depth where the query has depth (RGB-D queries, ``stage.depth_weight > 0``);
* anchor: pixel distances of the map PnP inliers' 3D points projected through the pose to their query keypoints
  (``losses.anchor_weight > 0``).

The loss is ``sum(scale * rho(r))`` with ``scale`` each term's weight divided by its count (so each term is a
mean, as in the gradient-descent objective) and ``rho`` smooth L1 (colour, depth) or Huber (anchor);
:meth:`LMResiduals.irls_weights` turns it into the weighted least squares that LM solves. The render-gradient
Jacobian of these rows comes from one render (:mod:`~nerfstudio_gsloc.localize.image_jacobian`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import project_points
from nerfstudio_gsloc.localize.image_jacobian import render_jacobian
from nerfstudio_gsloc.localize.losses import apply_color_affine, huber, smooth_l1
from nerfstudio_gsloc.localize.objective import LossConfig
from nerfstudio_gsloc.localize.schedule import Stage
from nerfstudio_gsloc.localize.state import BatchState, MatchState
from nerfstudio_gsloc.rendering import RenderedViews


class LMResiduals:
    """Residuals, loss, IRLS weights and render-gradient Jacobian rows of the queries of one LM stage.

    Args:
        losses: the objective's terms and weights (only L1 colour, L1 depth and the Huber anchor are modelled).
        l1_floor: colour / depth residuals below this size count quadratically (smooth L1), so that the IRLS
            weights ``1 / |r|`` stay bounded and the many nearly-fitting pixels do not dominate the step.
    """

    def __init__(self, losses: LossConfig, l1_floor: float = 0.03) -> None:
        self.losses = losses
        self.l1_floor = float(l1_floor)
        self._targets: Dict[int, Tuple[Tensor, Optional[Tensor], Optional[Tensor]]] = {}

    def target(self, batch: BatchState, i: int, w: int, h: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Query ``i``'s image ``[h, w, 3]``, mask ``[h, w]`` (or ``None``) and depth ``[h, w]`` (or ``None``) at
        the stage's level, downsampled once per solver (one solver runs one stage) rather than per render."""
        if i not in self._targets:
            rgb, masks = batch.level_images([i], w, h)
            depth = None if batch.depths is None else batch.level_depths([i], w, h, masks)[0, ..., 0]
            self._targets[i] = (rgb[0], None if masks is None else masks[0, ..., 0], depth)
        return self._targets[i]

    def residuals(self, batch: BatchState, stage: Stage, i: int, views: RenderedViews, c2w: Tensor,
                  mask: Tensor, depth_mask: Optional[Tensor], w: int, h: int) -> Tuple[Tensor, Tensor, Tuple[float, float, float]]:
        """Residuals ``[P, N]`` of query ``i`` at ``P`` poses ``c2w [P, 3, 4]`` rendered as ``views`` and, for the
        last pose, the loss and its ``(anchor, photometric, depth)`` parts; returns ``(r, scale [N], parts)``
        where ``scale`` holds each residual's term weight divided by its count (the loss is ``sum(scale * rho(r))``)."""
        cfg = self.losses
        P = c2w.shape[0]
        rs, scales, kinds = [], [], []
        if stage.photometric_weight > 0:
            query_rgb = self.target(batch, i, w, h)[0]
            diff = (self._compared_rgb(batch, i, views) - query_rgb)[:, mask]  # [P, m, 3]
            count = max(1, int(mask.sum())) * 3
            rs.append(diff.reshape(P, -1))
            scales.append(torch.full((diff[0].numel(),), stage.photometric_weight * (1.0 - cfg.ssim_weight) / count))
            kinds.append("photometric")
        if depth_mask is not None and stage.depth_weight > 0:
            query_depth = self.target(batch, i, w, h)[2]
            diff = views.depth[..., 0][:, depth_mask] - query_depth[depth_mask]
            rs.append(diff)
            scales.append(torch.full((diff.shape[1],), stage.depth_weight / max(1, int(depth_mask.sum()))))
            kinds.append("depth")
        anchor = self._anchor(batch, i)
        if anchor is not None:
            err = _anchor_errors(c2w, batch.Ks[i], anchor.points_world, anchor.kpts_query)
            rs.append(err)
            scales.append(torch.full((err.shape[1],), cfg.anchor_weight / err.shape[1]))
            kinds.append("anchor")
        # the solver's arithmetic runs on the CPU in float64 (a few 10^4 residuals), whatever the model's device
        r = torch.cat(rs, dim=1).double().cpu()
        scale = torch.cat(scales).double()
        parts = {"anchor": 0.0, "photometric": 0.0, "depth": 0.0}
        start = 0
        for part, kind in zip(rs, kinds):
            n = part.shape[1]
            last = r[-1, start:start + n]
            rho = huber(last, cfg.huber_delta_px) if kind == "anchor" else smooth_l1(last, self.l1_floor)
            parts[kind] = float((scale[start:start + n] * rho).sum())
            start += n
        return r, scale, (parts["anchor"], parts["photometric"], parts["depth"])

    @staticmethod
    def _compared_rgb(batch: BatchState, i: int, views: RenderedViews) -> Tensor:
        """``[P, h, w, 3]`` the renders as the colour residuals compare them (query ``i``'s colour transform, if any)."""
        color = batch.colors([i])
        if color is None:
            return views.rgb
        return apply_color_affine(views.rgb, color.detach().expand(views.rgb.shape[0], 3, 4))

    def rho(self, r: Tensor, anchor_count: int) -> Tensor:
        """Per-residual loss: smooth L1 for colour and depth, Huber for the last ``anchor_count`` (anchor) ones."""
        rho = smooth_l1(r, self.l1_floor)
        if anchor_count:
            rho[-anchor_count:] = huber(r[-anchor_count:], self.losses.huber_delta_px)
        return rho

    def irls_weights(self, r: Tensor, scale: Tensor, anchor_count: int) -> Tensor:
        """Weights ``W`` with ``sum(W r^2) / 2`` matching the loss's gradient at ``r``: ``scale / |r|`` for L1 terms,
        the Huber weight for the anchor (the last ``anchor_count`` residuals)."""
        W = scale / r.abs().clamp_min(self.l1_floor)
        if anchor_count:
            a = r[-anchor_count:].abs()
            delta = self.losses.huber_delta_px
            W[-anchor_count:] = scale[-anchor_count:] * torch.where(a <= delta, torch.ones_like(a), delta / a)
        return W

    def gradient_jacobian(self, batch: BatchState, stage: Stage, i: int, view: RenderedViews, moved: Tensor,
                          steps: Tensor, K: Tensor, mask: Tensor, depth_mask: Optional[Tensor]) -> Tensor:
        """``[N, 6]`` Jacobian of query ``i``'s residuals (rows as :meth:`residuals` orders them) from its render
        ``view`` (batch of 1) at the base pose alone: colour and depth rows from the render's gradients and each
        pixel's motion, anchor rows by differencing the reprojection errors at the ``moved [6, 3, 4]`` poses."""
        base = batch.states[i].base
        rgb = self._compared_rgb(batch, i, view)[0] if stage.photometric_weight > 0 else None
        use_depth = depth_mask is not None and stage.depth_weight > 0
        rows = [render_jacobian(base, moved, steps, K, view.depth[0, ..., 0], mask, rgb, depth_mask if use_depth else None)]
        anchor = self._anchor(batch, i)
        if anchor is not None:
            err = _anchor_errors(torch.cat([moved, base[None]]), batch.Ks[i], anchor.points_world, anchor.kpts_query)
            rows.append((err[:6] - err[6:7]).T / steps.to(err)[None, :])
        return torch.cat(rows).double().cpu()

    def anchor_count(self, batch: BatchState, i: int) -> int:
        """How many anchor residuals query ``i`` has (the last ones of its residual vector)."""
        anchor = self._anchor(batch, i)
        return 0 if anchor is None else int(anchor.points_world.shape[0])

    def _anchor(self, batch: BatchState, i: int) -> Optional[MatchState]:
        """Query ``i``'s anchor matches when the anchor term is on and it has any, else ``None``."""
        anchor = batch.states[i].anchor
        if self.losses.anchor_weight <= 0 or anchor is None or anchor.points_world.shape[0] == 0:
            return None
        return anchor


def _anchor_errors(c2w: Tensor, K: Tensor, points: Tensor, kpts: Tensor) -> Tensor:
    """``[P, M]`` pixel distances of ``points [M, 3]`` projected through each of ``c2w [P, 3, 4]`` to ``kpts [M, 2]``
    (finite even behind a camera, unlike :func:`~nerfstudio_gsloc.localize.absolute_pose.reprojection_errors`'s ``inf``:
    LM differences them)."""
    uv, _ = project_points(c2w, K, points)
    return torch.linalg.norm(uv - kpts.double()[None], dim=-1)
