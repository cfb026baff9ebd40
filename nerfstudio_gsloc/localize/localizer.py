"""The one interface every localization method implements.

A localizer is a config dataclass deriving nerfstudio's ``InstantiateConfig`` (``_target`` + ``setup()``) whose
instance takes a loaded model, a batch of queries and their initial poses, and returns one
:class:`~nerfstudio_gsloc.localize.result.LocalizationResult` per query::

    localizer = config.setup(model=pipeline.model, pipeline=pipeline, seed=0)
    results = localizer.localize(queries, initial_c2w)   # initial_c2w=None: the queries' priors

``ns-localize --method NAME``, ``gsloc-bench`` and any later caller (sequences, workers) make exactly this call;
the methods are listed in :mod:`nerfstudio_gsloc.localize.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Type

from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

from nerfstudio_gsloc.localize.live import PosesCallback
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import STATUS_SKIPPED, LocalizationResult, ResultCallback, StepCallback

if TYPE_CHECKING:
    from nerfstudio_gsloc.localize.optimizer import PoseOptimizer
    from nerfstudio_gsloc.localize.verification import PoseVerifier



@dataclass
class LocalizerConfig(InstantiateConfig):
    """Base config of a localizer; ``setup(model=..., pipeline=..., seed=...)`` builds the :class:`Localizer`."""

    _target: Type = field(default_factory=lambda: Localizer)


class Localizer:
    """Base class of localizers.

    Args:
        config: the localizer's config.
        model: the trained scene model (splatfacto-style parameters; :func:`render_splat_model` accepts it).
        pipeline: the loaded nerfstudio pipeline, for methods that need more than the model (pnp reads the training
            views from its datamanager); ``None`` when only a model is at hand.
        seed: base seed of the method's randomness (per query: ``seed + query.index``).

    Attributes:
        notes: facts a method reports about its run (e.g. the time to build a map), for benchmark metadata.
        verifier: the ground-truth-free check that gives every result its confidence and rejects doubtful poses
            (set by :func:`~nerfstudio_gsloc.localize.registry.make_localizer`; ``None``: no confidence).
    """

    #: Queries without depth get status ``skipped`` when this is set (depth-only methods).
    needs_depth: bool = False

    def __init__(self, config: LocalizerConfig, model: nn.Module, pipeline: Any = None, seed: int = 0) -> None:
        self.config = config
        self.model = model
        self.pipeline = pipeline
        self.seed = int(seed)
        self.notes: Dict[str, object] = {}
        self.verifier: Optional["PoseVerifier"] = None

    @property
    def max_iterations(self) -> int:
        """Largest number of optimisation steps one query can take (0 for closed-form methods)."""
        return 0

    def prepare(self, queries: Optional[Sequence[Query]] = None) -> None:
        """One-off work of the run that :meth:`localize` would otherwise do on its first call for ``queries``
        (``None``: any query), such as gsloc's calibration. A distributed driver calls it before sending work, so
        that the workers read its result from the run's cache instead of each doing it; a tracker, so that the first
        frame's time is the frame's own."""

    def localize(
        self,
        queries: Sequence[Query],
        initial_c2w: Optional[Sequence[Tensor]] = None,
        on_result: ResultCallback = None,
        on_step: StepCallback = None,
        on_poses: PosesCallback = None,
    ) -> List[LocalizationResult]:
        """Localize ``queries``.

        Args:
            queries: the queries (see :mod:`nerfstudio_gsloc.localize.queries`).
            initial_c2w: one ``[3, 4]`` OpenGL camera-to-world start pose per query (scene frame); ``None``: the
                queries' priors (see :mod:`nerfstudio_gsloc.localize.initialization`).
            on_result: called with ``(position, result)`` as soon as a query is finished.
            on_step: called after every iteration with the number of queries still active.
            on_poses: optional observer, called now and then (throttled to a few percent of the run) with
                ``{position: current [3, 4] c2w}`` of the queries still being optimised (methods that optimise;
                see :mod:`nerfstudio_gsloc.localize.live`).

        Returns:
            one result per query, in order.
        """
        if initial_c2w is None:
            from nerfstudio_gsloc.localize.initialization import initial_poses

            initial_c2w = initial_poses(queries, "prior")
        if len(queries) != len(initial_c2w):
            raise ValueError(f"{len(queries)} queries but {len(initial_c2w)} initial poses")
        results: List[Optional[LocalizationResult]] = [None] * len(queries)
        if self.verifier is not None:
            self.verifier.forget()
        todo = []
        for p, (query, c2w) in enumerate(zip(queries, initial_c2w)):
            if self.needs_depth and query.depth is None:
                start = c2w[:3, :4].float().cpu().clone()
                results[p] = LocalizationResult(query.name, query.index, start, start.clone(), STATUS_SKIPPED,
                                                "query has no depth")
                if on_result is not None:
                    on_result(p, results[p])
            else:
                todo.append(p)

        def forward(k: int, result: LocalizationResult) -> None:
            if self.verifier is not None:
                result = self.verifier.review(queries[todo[k]], result)
            results[todo[k]] = result
            if on_result is not None:
                on_result(todo[k], result)

        forward_poses = None
        if on_poses is not None:
            def forward_poses(poses: Dict[int, Tensor]) -> None:
                on_poses({todo[k]: c2w for k, c2w in poses.items()})

        if todo:
            self._localize([queries[p] for p in todo], [initial_c2w[p] for p in todo], forward, on_step, forward_poses)
        return [r for r in results if r is not None]

    def batches(self, queries: Sequence[Query], size: int = 4) -> List[List[int]]:
        """Positions of ``queries`` split into batches that separate :meth:`localize` calls can run, each query
        getting the result it gets in one call on all of them (work units of a distributed run).

        Base: every query is localized on its own (seeds per query), so any split works: chunks of ``size``.
        """
        return [list(range(start, min(start + size, len(queries)))) for start in range(0, len(queries), max(1, size))]

    def _localize(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor], on_result: Callable[[int, LocalizationResult], None],
                  on_step: StepCallback, on_poses: PosesCallback = None) -> None:
        """The method itself: call ``on_result(k, result)`` for every query ``k`` (subclasses implement it;
        ``on_poses``, keyed by ``k`` too, is optional to honour)."""
        raise NotImplementedError


class OptimizingLocalizer(Localizer):
    """A localizer whose work is one run of the shared optimisation loop.

    Subclasses (gsloc/photometric/depth, icomma) build ``self.optimizer``, a
    :class:`~nerfstudio_gsloc.localize.optimizer.PoseOptimizer`, in ``__init__``; they differ only in its
    objective and schedule.
    """

    optimizer: "PoseOptimizer"

    @property
    def max_iterations(self) -> int:
        """Largest number of steps one query can take."""
        return self.optimizer.max_iterations

    def batches(self, queries: Sequence[Query], size: int = 4) -> List[List[int]]:
        """The optimiser's own batches (a batch shares its stages' early ends, so a query's result depends on its
        batch), after the queries :meth:`localize` skips, which form one more batch; ``size`` is not used."""
        from nerfstudio_gsloc.localize.optimizer import group_queries

        skipped = [p for p, q in enumerate(queries) if self.needs_depth and q.depth is None]
        runs = [p for p, q in enumerate(queries) if not (self.needs_depth and q.depth is None)]
        groups = group_queries([queries[p] for p in runs], self.optimizer.optim.batch_size)
        return ([skipped] if skipped else []) + [[runs[k] for k in group] for group in groups]

    def _localize(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor],
                  on_result: Callable[[int, LocalizationResult], None], on_step: StepCallback,
                  on_poses: PosesCallback = None) -> None:
        self.optimizer.run(queries, initial_c2w, on_result=on_result, on_step=on_step, on_poses=on_poses)
