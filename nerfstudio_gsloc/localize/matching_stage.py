"""The matching term of gsloc's objective: matching rounds, PnP jumps, the look-around search, the reprojection loss.

A *matching round* renders the current poses at full resolution, matches each query with its render (SIFT by
default), lifts the render's keypoints to 3D with the rendered depth and runs PnP + RANSAC. In the matching
stage a query whose PnP pose has enough inliers *jumps* to it (when it stays within the divergence bounds); a
query whose first round finds no PnP pose first *looks around*: it matches renders of its pose turned
up/down/left/right by ``search_deg`` and takes the best. Between rounds the inlier matches give each query a
Huber reprojection loss (:meth:`MatchingTerm.loss`), which needs no render.

Keypoints are ``(x, y)`` full-resolution pixels with centres at ``+0.5``; points are in the scene frame.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Tuple

import cv2
import torch
from torch import Tensor, nn

from nerfstudio_gsloc.localize.absolute_pose import PnPResult, lift_keypoints, pnp_ransac
from nerfstudio_gsloc.localize.losses import reprojection_loss
from nerfstudio_gsloc.localize.matching import Matcher
from nerfstudio_gsloc.localize.objective import LossConfig
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from nerfstudio_gsloc.localize.schedule import OptimConfig, ScheduleConfig, Stage
from nerfstudio_gsloc.localize.state import BatchState, MatchState, pose_change
from nerfstudio_gsloc.rendering import RenderedViews, render_splat_model


class MatchingTerm:
    """Matching rounds and the reprojection loss of a batch's queries.

    Args:
        model: the scene model (renders for matching and the look-around search).
        matcher: the 2D-2D matcher.
        losses, schedule, optim: configuration (alpha threshold and Huber delta; PnP and search settings;
            divergence bounds and the search's render batch size).
        seed: base RANSAC seed (per query: ``seed + query.index``).
    """

    def __init__(self, model: nn.Module, matcher: Matcher, losses: LossConfig, schedule: ScheduleConfig,
                 optim: OptimConfig, seed: int = 0) -> None:
        self.model = model
        self.matcher = matcher
        self.losses = losses
        self.schedule = schedule
        self.optim = optim
        self.seed = int(seed)

    def match_view(self, batch: BatchState, i: int, rgb: Tensor, depth: Tensor, alpha: Tensor, c2w: Tensor
                   ) -> Tuple[Tensor, Tensor, Optional[PnPResult]]:
        """Match query ``i`` with one full-resolution render and lift the render's keypoints to 3D.

        Args:
            rgb, depth, alpha: ``[H, W, 3]``, ``[H, W, 1]``, ``[H, W, 1]`` render of pose ``c2w [3, 4]``.

        Returns:
            ``points_world [m, 3]`` and ``kpts_query [m, 2]`` of the valid matches, and the PnP + RANSAC result
            (``None`` with fewer than ``min_matches`` matches).
        """
        sched = self.schedule
        matches = self.matcher.match(batch.images[i], rgb)
        kq, kr = matches.kpts0.to(batch.device), matches.kpts1.to(batch.device)
        points, valid = lift_keypoints(kr, depth, batch.Ks[i], c2w, alpha=alpha, alpha_threshold=self.losses.alpha_threshold)
        if batch.masks is not None and len(kq):
            col = kq[:, 0].floor().long().clamp(0, batch.width - 1)
            row = kq[:, 1].floor().long().clamp(0, batch.height - 1)
            valid = valid & batch.masks[i, row, col, 0]
        points, kq = points[valid], kq[valid]
        if points.shape[0] < sched.min_matches:
            return points, kq, None
        cv2.setRNGSeed(self.seed + batch.states[i].query.index)  # RANSAC reproducible per query
        pnp = pnp_ransac(points, kq, batch.Ks[i], reproj_px=sched.pnp_reproj_px, min_inliers=sched.pnp_min_inliers)
        return points, kq, pnp

    def search(self, batch: BatchState, i: int, c2w: Tensor) -> Optional[Tuple[Tensor, Tensor, PnPResult]]:
        """Look around: match query ``i`` against renders of its pose turned by a grid of pitch/yaw offsets.

        The grid has ``search_rings`` rings of ``search_deg`` steps about the camera's x and y axes (8 views for
        one ring). Returns the matches and PnP result of the view with the most inliers, or ``None``.
        """
        rings, step = int(self.schedule.search_rings), math.radians(self.schedule.search_deg)
        offsets = [(a * step, b * step) for a in range(-rings, rings + 1) for b in range(-rings, rings + 1) if (a, b) != (0, 0)]
        if not offsets:
            return None
        vectors = torch.tensor([[pitch, yaw, 0.0] for pitch, yaw in offsets], dtype=torch.float64)
        rots = c2w[None, :, :3].double() @ axis_angle_to_rotation_matrix(vectors)
        candidates = torch.cat([rots, c2w[None, :, 3:4].double().expand(len(offsets), 3, 1)], dim=-1).float()
        best: Optional[Tuple[Tensor, Tensor, PnPResult]] = None
        chunk = max(1, self.optim.batch_size)
        for start in range(0, len(offsets), chunk):
            poses = candidates[start : start + chunk]
            Ks = batch.Ks[i : i + 1].expand(poses.shape[0], 3, 3)
            views = render_splat_model(self.model, poses, Ks, batch.width, batch.height, background=batch.background)
            for k in range(poses.shape[0]):
                points, kq, pnp = self.match_view(batch, i, views.rgb[k], views.depth[k], views.alpha[k], poses[k])
                if pnp is not None and pnp.c2w is not None and (best is None or pnp.num_inliers > best[2].num_inliers):
                    best = (points, kq, pnp)
        return best

    def jump_allowed(self, batch: BatchState, i: int, c2w: Tensor) -> bool:
        """A PnP pose is only taken when it stays within the divergence bounds around the initial pose."""
        rot, trans = pose_change(c2w[None], batch.states[i].c2w_init[None])
        return bool(rot[0] <= self.optim.max_rotation_deg and trans[0] <= self.optim.max_translation)

    def match_round(self, batch: BatchState, ids: List[int], stage: Stage, views: Optional[RenderedViews]) -> Dict[int, str]:
        """Recompute matches of the queries ``ids`` against a full-resolution render of their current poses.

        In a stage with PnP jumps a query whose first round finds no PnP pose also tries the look-around search
        (:meth:`search`) once, and a query with an allowed PnP pose is re-based on it (a fresh optimiser).

        Args:
            views: full-resolution renders of ``ids`` to reuse, or ``None`` to render them here.

        Returns:
            ``{query: event}`` for the trace (``"rematch"``, ``"pnp_jump"`` or ``"search_jump"``).
        """
        events: Dict[int, str] = {}
        with torch.no_grad():
            c2w = batch.current_c2w()[ids].detach()
            if views is None:
                Ks = batch.Ks[ids]
                views = render_splat_model(self.model, c2w, Ks, batch.width, batch.height, background=batch.background)
            for j, i in enumerate(ids):
                state = batch.states[i]
                started = time.perf_counter()
                points, kq, pnp = self.match_view(batch, i, views.rgb[j], views.depth[j], views.alpha[j], c2w[j])
                event = "rematch"
                no_pose = pnp is None or pnp.c2w is None
                if stage.pnp_jump and no_pose and self.schedule.search_deg > 0 and not state.searched:
                    state.searched = True
                    found = self.search(batch, i, c2w[j])
                    if found is not None:
                        points, kq, pnp = found
                        event = "search"
                if pnp is None:
                    state.matches = None
                    state.inliers = int(points.shape[0])
                else:
                    if stage.pnp_jump:
                        state.pnp_localized = pnp.c2w is not None
                    if pnp.c2w is not None:
                        inl = pnp.inliers.to(batch.device)
                        points, kq = points[inl], kq[inl]
                        state.inliers = pnp.num_inliers
                        if stage.pnp_jump and self.jump_allowed(batch, i, pnp.c2w.to(batch.device)):
                            batch.rebase(i, pnp.c2w.to(batch.device), stage)
                            event = "search_jump" if event == "search" else "pnp_jump"
                            state.candidates.append((f"render PnP {len(state.candidates) + 1}", pnp.c2w.detach().cpu()))
                    else:
                        state.inliers = int(points.shape[0])
                    state.matches = MatchState(points, kq, state.inliers)
                events[i] = event
                state.seconds += time.perf_counter() - started
        return events

    def loss(self, batch: BatchState, ids: List[int], c2w: Tensor) -> Tuple[Tensor, Dict[int, int]]:
        """``[n]`` Huber reprojection loss of each query's current matches through ``c2w [n, 3, 4]``, and the
        number of matches per query."""
        points, kpts, index, counts = [], [], [], {}
        for j, i in enumerate(ids):
            state = batch.states[i].matches
            counts[i] = 0 if state is None else int(state.points_world.shape[0])
            if state is not None and counts[i] > 0:
                points.append(state.points_world)
                kpts.append(state.kpts_query)
                index.append(torch.full((counts[i],), j, dtype=torch.long, device=batch.device))
        if not points:
            return torch.zeros(len(ids), device=batch.device) + 0.0 * c2w.sum(), counts
        loss = reprojection_loss(
            torch.cat(points), torch.cat(kpts), torch.cat(index), c2w, batch.Ks[ids], num_queries=len(ids),
            huber_delta_px=self.losses.huber_delta_px,
        )
        return loss, counts
