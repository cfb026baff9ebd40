"""The one result type of every localizer, and its statuses.

Every localizer (gsloc, photometric, depth, icomma, pnp, ...) returns one :class:`LocalizationResult` per query,
so that ``ns-localize``, ``gsloc-bench``, the poses.json writer, the metrics and the viewer read the same record.
Poses are OpenGL camera-to-world ``[3, 4]`` matrices in the scene (dataparser) frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform

from nerfstudio_gsloc.metrics import (  # noqa: F401  (re-exported: the statuses a localizer reports)
    FAILURE_STATUSES,
    STATUS_CONVERGED,
    STATUS_FAILED,
    STATUS_MAX_ITERATIONS,
    STATUS_REJECTED,
    is_failure,
    rotation_error_deg,
    translation_error,
)
from nerfstudio_gsloc.poses_file import PoseRecord, pose_to_original

if TYPE_CHECKING:
    from nerfstudio_gsloc.localize.queries import Query

# The statuses and the failure convention live with the metrics (the bottom of the package), so that every
# summary counts a result the same way; ``skipped`` is a localizer's own: the method does not apply to the query.
STATUS_SKIPPED = "skipped"
"""The method does not apply to this query (e.g. the depth method on a query without depth); not a trial."""

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
        candidates: other poses the method reached on the way, ``(name, [3, 4] c2w)`` (e.g. each PnP jump), for the
            final choice between hypotheses (:func:`~nerfstudio_gsloc.localize.verification.select_pose`).
        depth_aligned: whether gsloc's alignment to the capture's depth images was kept (``None``: none ran;
            :mod:`~nerfstudio_gsloc.localize.depth_registration`).
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
    candidates: List[Tuple[str, Tensor]] = field(default_factory=list)
    depth_aligned: Optional[bool] = None

    @property
    def failed(self) -> bool:
        """True when the result counts as a failure whatever its pose."""
        return is_failure(self.status)

    @property
    def skipped(self) -> bool:
        """True when the method did not apply to the query."""
        return self.status == STATUS_SKIPPED

    def add_note(self, note: str) -> None:
        """Put ``note`` in front of the reason (the latest stage's word first)."""
        self.reason = f"{note}; {self.reason}" if self.reason else note

    def move_to(self, c2w: Tensor, note: str, gt_c2w: Optional[Tensor] = None) -> None:
        """Return ``c2w [3, 4]`` instead of the current pose (a later stage chose or refined it): ``note`` goes in
        front of the reason, and the errors follow the pose when the ground truth ``gt_c2w`` is known."""
        self.c2w = c2w[:3, :4].to(self.c2w.dtype)
        self.add_note(note)
        if gt_c2w is not None:
            gt = gt_c2w[None, :3, :4].double()
            self.rot_err_deg = float(rotation_error_deg(c2w[None, :3, :4].double(), gt)[0])
            self.trans_err = float(translation_error(c2w[None, :3, :4].double(), gt)[0])


ResultCallback = Optional[Callable[[int, LocalizationResult], None]]
"""Called with ``(position in the input, result)`` as soon as a query is finished (not when its batch is: e.g. to
save it)."""
StepCallback = Optional[Callable[[int], None]]
"""Called after every optimisation iteration with the number of queries still being optimised."""


def pose_record(result: LocalizationResult, query: "Query", frame: FrameTransform, method: str,
                trial: Optional[int] = None) -> PoseRecord:
    """The poses.json record of a result (poses moved to the dataset's original frame with ``frame``).

    A non-finite pose becomes "no pose"; a ``skipped`` result is written as a failure without a pose (the method
    produced nothing for that query). ``trial`` is the benchmark trial id (``None`` for ``ns-localize``).
    """
    def original(c2w: Optional[Tensor]) -> Optional[Tensor]:
        return pose_to_original(frame, c2w)

    return PoseRecord(
        image=query.name, image_path=Path(query.image_path), index=query.index, method=method, trial=trial,
        status=STATUS_FAILED if result.skipped else result.status, reason=result.reason,
        c2w=None if result.skipped else original(result.c2w), c2w_init=original(result.c2w_init),
        c2w_gt=original(query.gt_c2w), loss=result.loss, confidence=result.confidence, iterations=result.iterations,
        inliers=result.inliers, seconds=result.seconds,
    )
