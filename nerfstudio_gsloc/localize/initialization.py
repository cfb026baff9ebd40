"""Initial poses of queries: the prior from the query file, a seeded perturbation of the ground truth, or
retrieval + PnP against the trained scene (no prior at all).

``retrieval`` (:func:`retrieval_initial_poses`) runs the ``pnp`` localizer's ``retrieval`` route on each query:
the VLAD shortlist of the run's retrieval index (:mod:`nerfstudio_gsloc.localize.retrieval`) re-ranked by SIFT
matches, pooled 2D-3D matches, RANSAC PnP and Levenberg-Marquardt. A query for which it finds no pose gets no
initial pose, and :func:`localize_from_initial_poses` reports it as ``failed`` with the reason instead of running
the method on it. ``auto`` takes each query's prior when it has one, else retrieval. ``regression`` is the scene
regressor's one-shot pose (:func:`nerfstudio_gsloc.localize.regression.regression_initial_poses`).

``perturb`` is the evaluation protocol of iNeRF-style papers: the ground-truth camera is rotated by exactly
``angle_deg`` about a random axis through its centre and moved by exactly ``translation`` scene units in a
random direction. Each query draws from its own generator seeded by ``(seed, query.index)``, so its initial
pose does not depend on batching, on ``--max-queries`` or on which queries a resumed run skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.pose import perturb_pose
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import STATUS_FAILED, LocalizationResult

if TYPE_CHECKING:
    from nerfstudio_gsloc.localize.live import PosesCallback
    from nerfstudio_gsloc.localize.localizer import Localizer, StepCallback
    from nerfstudio_gsloc.localize.pnp import PnPBaseline, PnPOutcome

InitMethod = Literal["prior", "perturb"]
"""What :func:`initial_poses` takes (poses that need no model)."""
InitMode = Literal["auto", "prior", "perturb", "retrieval", "regression"]
"""What ``ns-localize --init`` takes."""


def query_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for query ``index`` under base ``seed`` (independent streams via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def check_initialization(queries: Sequence[Query], method: InitMethod) -> None:
    """Raise :class:`GslocError` (before any work) when ``method`` cannot initialise every query."""
    if method == "prior":
        missing = [q.name for q in queries if q.prior_c2w is None]
        if missing:
            raise GslocError(
                f"--init prior needs a prior pose (prior_transform_matrix) for every query; missing for {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
    elif method == "perturb":
        missing = [q.name for q in queries if q.gt_c2w is None]
        if missing:
            raise GslocError(
                f"--init perturb needs a ground-truth pose (transform_matrix) for every query; missing for {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
    else:
        raise GslocError(f"unknown initialisation {method!r}; use prior, perturb, retrieval, regression or auto")


def initial_poses(
    queries: Sequence[Query],
    method: InitMethod,
    angle_deg: float = 10.0,
    translation: float = 0.1,
    seed: int = 0,
) -> List[Tensor]:
    """Initial scene-frame OpenGL camera-to-world poses of the queries.

    Args:
        queries: the queries (``prior_c2w`` / ``gt_c2w`` in the scene frame).
        method: ``"prior"`` (the query's prior pose) or ``"perturb"`` (ground truth, perturbed).
        angle_deg: perturbation rotation angle in degrees (``perturb`` only).
        translation: perturbation translation length in scene units (``perturb`` only).
        seed: base seed; query ``q`` uses :func:`query_generator` ``(seed, q.index)``.

    Returns:
        one ``[3, 4]`` float32 pose per query.
    """
    check_initialization(queries, method)
    if angle_deg < 0 or translation < 0:
        raise GslocError("perturbation angle and translation must be >= 0")
    poses: List[Tensor] = []
    for query in queries:
        if method == "prior":
            assert query.prior_c2w is not None
            poses.append(query.prior_c2w[:3, :4].float().clone())
        else:
            assert query.gt_c2w is not None
            generator = query_generator(seed, query.index)
            # Perturb in float64 so the requested angle/length are exact before the cast.
            perturbed = perturb_pose(query.gt_c2w[None, :3, :4].double(), angle_deg, translation, generator)
            poses.append(perturbed[0].float())
    return poses


# ----------------------------------------------------------------------------------------------------------
# retrieval (no prior)
# ----------------------------------------------------------------------------------------------------------


def no_pose() -> Tensor:
    """The ``[3, 4]`` all-NaN pose that stands for "no pose" (a method that reads it would fail loudly)."""
    return torch.full((3, 4), math.nan)


@dataclass
class InitialPose:
    """The initial pose of one query and where it came from.

    Attributes:
        c2w: ``[3, 4]`` OpenGL camera-to-world pose (scene frame), or ``None`` when retrieval found none.
        source: ``prior``, ``perturb``, ``retrieval`` or ``regression``.
        reason: why there is no pose (``None`` pose), or how retrieval found it.
        seconds: time spent finding it (retrieval, regression; 0 otherwise), charged to the query's result.
        outcome: the retrieval PnP outcome (inlier correspondences, views), ``None`` for other sources.
    """

    c2w: Optional[Tensor]
    source: str
    reason: str = ""
    seconds: float = 0.0
    outcome: Optional["PnPOutcome"] = field(default=None, repr=False)


def query_init_sources(queries: Sequence[Query], mode: str) -> List[str]:
    """Per query, the source of its initial pose under ``--init mode`` (``auto``: prior if it has one, else
    retrieval); raises :class:`GslocError` when ``prior``/``perturb`` cannot serve every query."""
    if mode == "auto":
        return ["prior" if q.prior_c2w is not None else "retrieval" for q in queries]
    if mode in ("retrieval", "regression"):
        return [mode] * len(queries)
    check_initialization(queries, mode)  # type: ignore[arg-type]
    return [mode] * len(queries)


def retrieval_initial_poses(queries: Sequence[Query], baseline: "PnPBaseline", seed: int = 0,
                            on_query: Optional[Callable[[int], None]] = None) -> List[InitialPose]:
    """Initial poses by retrieval + PnP (no prior is read).

    Args:
        queries: the queries.
        baseline: a ``pnp`` map with ``selection="retrieval"`` (``PnPLocalizer(...).build_map()``).
        seed: RANSAC seed base (query ``q`` uses ``seed + q.index``).
        on_query: called with the position of each query once it is done (progress).

    Returns:
        one :class:`InitialPose` per query; ``c2w is None`` with the reason where no pose was found.
    """
    if baseline.config.selection != "retrieval":
        raise GslocError("retrieval initialisation needs a pnp map with selection=retrieval")
    out: List[InitialPose] = []
    with torch.no_grad():
        for position, query in enumerate(queries):
            outcome = baseline.localize(query.image, query.K, seed=seed + query.index)
            if outcome.c2w is None:
                out.append(InitialPose(None, "retrieval", f"retrieval found no pose: {outcome.reason}", outcome.seconds,
                                       outcome))
            else:
                reason = f"retrieval: {outcome.num_inliers} PnP inliers of {outcome.num_matches} matches"
                out.append(InitialPose(outcome.c2w.float().cpu(), "retrieval", reason, outcome.seconds, outcome))
            if on_query is not None:
                on_query(position)
    return out


def failed_initialization(query: Query, init: InitialPose) -> LocalizationResult:
    """The ``failed`` result of a query without an initial pose (no pose, the initialiser's reason, confidence 0)."""
    return LocalizationResult(name=query.name, index=query.index, c2w=no_pose(), c2w_init=no_pose(),
                              status=STATUS_FAILED, reason=init.reason, seconds=init.seconds,
                              inliers=0 if init.outcome is None else init.outcome.num_inliers, confidence=0.0)


def localize_from_initial_poses(localizer: "Localizer", queries: Sequence[Query], inits: Sequence[InitialPose],
                                on_result: Optional[Callable[[int, LocalizationResult], None]] = None,
                                on_step: "StepCallback" = None, on_poses: "PosesCallback" = None) -> List[LocalizationResult]:
    """Run ``localizer`` on the queries that have an initial pose; the others fail with their reason.

    The time an initialiser spent on a query (retrieval) is added to its result's ``seconds``.

    Returns:
        one result per query, in order (``on_result`` is called with positions in ``queries``).
    """
    results: List[Optional[LocalizationResult]] = [None] * len(queries)
    todo = [p for p, init in enumerate(inits) if init.c2w is not None]
    for p, init in enumerate(inits):
        if init.c2w is None:
            results[p] = failed_initialization(queries[p], init)
            if on_result is not None:
                on_result(p, results[p])

    def forward(k: int, result: LocalizationResult) -> None:
        p = todo[k]
        result.seconds += inits[p].seconds
        results[p] = result
        if on_result is not None:
            on_result(p, result)

    if todo:
        forward_poses = None
        if on_poses is not None:
            def forward_poses(poses: Dict[int, Tensor]) -> None:
                on_poses({todo[k]: c2w for k, c2w in poses.items()})

        watch = {} if forward_poses is None else {"on_poses": forward_poses}  # an observer only when asked
        localizer.localize([queries[p] for p in todo], [inits[p].c2w for p in todo], on_result=forward, on_step=on_step,
                           **watch)
    return [r for r in results if r is not None]
