"""The pose-inversion loop: refine query camera poses by rendering a Gaussian scene and descending a loss.

Pose inversion has five parts, each in its own module:

* the **schedule** (:mod:`~nerfstudio_gsloc.localize.schedule`): stages, pyramid levels, learning-rate decay;
* the **objective** (:mod:`~nerfstudio_gsloc.localize.objective`): which loss terms, assembled per iteration
  (gsloc's matching term and its PnP jumps are in :mod:`~nerfstudio_gsloc.localize.matching_stage`);
* the **per-query state** (:mod:`~nerfstudio_gsloc.localize.state`): one record per query with its own
  parameters and optimiser;
* the **batch loop** (:mod:`~nerfstudio_gsloc.localize.batch_loop`): one batch's stages, each query's health
  checks, steps and convergence;
* the **optimizer** (this module): holds the configuration, the objective and the matching term, freezes the
  model, and cuts the queries into batches of the same size and background (all active queries of a batch are
  rendered together in one ``render_splat_model`` call per iteration).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nerfstudio_gsloc.localize.batch_loop import BatchLoop
from nerfstudio_gsloc.localize.live import PosesCallback, PosesThrottle, step_with_poses
from nerfstudio_gsloc.localize.matching import Matcher
from nerfstudio_gsloc.localize.matching_stage import MatchingTerm
from nerfstudio_gsloc.localize.objective import LossConfig, LossTerms, PoseObjective
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import LocalizationResult, ResultCallback, StepCallback
from nerfstudio_gsloc.localize.schedule import OptimConfig, ScheduleConfig, Stage, build_stages
from nerfstudio_gsloc.localize.state import BatchState, MatchState
from nerfstudio_gsloc.rendering import RenderedViews

#: An objective: ``(batch, stage, ids, c2w [n, 3, 4], views or None, w, h) -> LossTerms``.
Objective = Callable[[BatchState, Stage, List[int], Tensor, Optional[RenderedViews], int, int], LossTerms]

__all__ = ["Objective", "PoseOptimizer", "ResultCallback", "StepCallback", "frozen_parameters", "group_queries"]


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
    """Temporarily stop gradients to a model's parameters (only the poses are optimised) and put it in eval mode."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    was_training = module.training
    module.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        module.train(was_training)


class PoseOptimizer:
    """Refines poses of queries against a splatfacto-style model (see the module docstring).

    Args:
        model: a model accepted by :func:`render_splat_model` (its parameters are frozen while it runs).
        losses, schedule, optim: configuration.
        matcher: a :class:`Matcher`, required when the schedule has a matching term.
        seed: base seed of the RANSAC sampling (per query: ``seed + query.index``).
        stages: the stages to run (default: built from the configs by :func:`build_stages`).
        objective: the loss of each iteration (default: :class:`PoseObjective` of ``losses``).
        notes: ``(batch) -> one note per query`` appended to the results' reasons (e.g. iComMa's switch-off).
    """

    def __init__(
        self,
        model: nn.Module,
        losses: LossConfig,
        schedule: ScheduleConfig,
        optim: OptimConfig,
        matcher: Optional[Matcher] = None,
        seed: int = 0,
        stages: Optional[List[Stage]] = None,
        objective: Optional[Objective] = None,
        notes: Optional[Callable[[BatchState], List[str]]] = None,
    ) -> None:
        self.model = model
        self.losses = losses
        self.schedule = schedule
        self.optim = optim
        self.stages = stages if stages is not None else build_stages(losses, schedule, optim)
        needs_matcher = any(s.matching_weight > 0 for s in self.stages)
        if needs_matcher and matcher is None:
            raise ValueError("a matcher is required when the schedule uses the matching loss")
        self.matching = MatchingTerm(model, matcher, losses, schedule, optim, seed) if needs_matcher else None
        self.objective: Objective = objective if objective is not None else PoseObjective(losses, self.matching)
        self.notes = notes

    @property
    def max_iterations(self) -> int:
        """Largest number of steps a query can take."""
        return sum(stage.iterations for stage in self.stages)

    @property
    def device(self) -> torch.device:
        return self.model.means.device

    def run(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor], on_result: ResultCallback = None,
            on_step: StepCallback = None, anchors: Optional[Sequence[Optional[MatchState]]] = None,
            on_poses: PosesCallback = None) -> List[LocalizationResult]:
        """Localize ``queries`` from ``initial_c2w`` (one ``[3, 4]`` scene-frame OpenGL camera-to-world pose each).

        ``anchors`` (one per query or ``None``) are fixed 2D-3D matches whose reprojection error joins the
        refinement objective (weight ``losses.anchor_weight``); an anchored query starts localized (it skips the
        matching stage and the coarse levels). ``on_poses`` (optional) is called now and then with the active
        queries' current poses (:mod:`~nerfstudio_gsloc.localize.live`); without it nothing else is done.

        Returns:
            results in the order of ``queries``.
        """
        if len(queries) != len(initial_c2w):
            raise ValueError(f"{len(queries)} queries but {len(initial_c2w)} initial poses")
        results: List[Optional[LocalizationResult]] = [None] * len(queries)
        throttle = PosesThrottle()
        with frozen_parameters(self.model):
            for members in group_queries(queries, self.optim.batch_size):
                color = self.losses.color_correction and self.losses.photometric
                batch = BatchState([queries[i] for i in members], [initial_c2w[i] for i in members], self.device, color,
                                   None if anchors is None else [anchors[i] for i in members])

                def finished(k: int, result: LocalizationResult, members=members) -> None:
                    results[members[k]] = result
                    if on_result is not None:
                        on_result(members[k], result)

                step = on_step if on_poses is None else step_with_poses(on_step, on_poses, batch, members, throttle)
                BatchLoop(self, batch, finished).run(step)
        return [r for r in results if r is not None]
