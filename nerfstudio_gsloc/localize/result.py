"""The one result type of every localizer, and its statuses.

Every localizer (gsloc, photometric, depth, icomma, pnp, ...) returns one :class:`LocalizationResult` per query,
so that ``ns-localize``, ``gsloc-bench``, the poses.json writer, the metrics and the viewer read the same record.
Poses are OpenGL camera-to-world ``[3, 4]`` matrices in the scene (dataparser) frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import Tensor

STATUS_CONVERGED = "converged"
"""The method finished normally: the pose update fell below tolerance (gradient methods) or a pose was solved (pnp)."""
STATUS_MAX_ITERATIONS = "max_iterations"
"""A gradient method ran out of iterations before its update fell below tolerance (the pose is still its best)."""
STATUS_FAILED = "failed"
"""No usable pose (non-finite values, divergence, lost the scene, too few matches, ...): counts as a failure."""
STATUS_REJECTED = "rejected"
"""Reserved: a pose that a later confidence check refuses (counts as a failure)."""
STATUS_SKIPPED = "skipped"
"""The method does not apply to this query (e.g. the depth method on a query without depth); not a trial."""

#: Statuses that count as a failure with infinite error in every summary.
FAILURE_STATUSES = (STATUS_FAILED, STATUS_REJECTED)

#: Columns of a trace row (one row per iteration; row 0 is the initial pose).
TRACE_FIELDS = (
    "query", "index", "iteration", "stage", "scale", "loss", "loss_matching", "loss_photometric", "loss_depth",
    "num_matches", "rot_err_deg", "trans_err", "event",
)


@dataclass
class LocalizationResult:
    """Outcome of localizing one query with any localizer.

    Attributes:
        name: the query's name (image file name).
        index: the query's index in its full set (seeds derive from it).
        c2w: ``[3, 4]`` refined OpenGL camera-to-world pose, scene frame. For a failed query the last finite pose
            (or the initial pose when the method produced none), kept for the record only.
        c2w_init: ``[3, 4]`` initial pose the method started from (the prior for methods that use none).
        status: one of ``converged``, ``max_iterations``, ``failed``, ``rejected`` (reserved), ``skipped``.
        reason: why it failed or stopped, or a note on how it was localized (empty for a plain convergence).
        iterations: optimisation steps taken (0 for pnp).
        seconds: wall time attributed to this query (a batch's time is shared among its active queries).
        inliers: matches supporting the pose (PnP inliers, or valid matches when PnP failed; 0 without matching).
        loss: the objective at the returned pose (NaN when unknown or not applicable).
        confidence: how much the pose can be trusted, in ``[0, 1]``; ``None`` until a confidence estimator fills it.
        rot_err_deg, trans_err: errors against the query's ground truth (scene units) when it is known.
        trace: one dict per iteration with the keys of :data:`TRACE_FIELDS` (empty for methods without iterations).
    """

    name: str
    index: int
    c2w: Tensor
    c2w_init: Tensor
    status: str
    reason: str = ""
    iterations: int = 0
    seconds: float = 0.0
    inliers: int = 0
    loss: float = float("nan")
    confidence: Optional[float] = None
    rot_err_deg: Optional[float] = None
    trans_err: Optional[float] = None
    trace: List[Dict[str, object]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when the result counts as a failure whatever its pose."""
        return self.status in FAILURE_STATUSES

    @property
    def skipped(self) -> bool:
        """True when the method did not apply to the query."""
        return self.status == STATUS_SKIPPED
