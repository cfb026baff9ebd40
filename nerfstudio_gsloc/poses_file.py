"""``poses.json``: the localization results that ``ns-localize`` and ``gsloc-bench`` write and ``gsloc-view`` reads.

Schema (``version`` 2)::

    {
      "format": "gsloc-poses",
      "version": 2,
      "convention": "OpenGL camera-to-world 4x4 (nerfstudio transforms.json), dataset's original frame",
      "frame": {"transform": <3x4>, "scale": <float>, "source": <str>},
      "queries": {"kind": "eval_split"} | {"kind": "transforms", "path": <absolute path of a transforms.json>}
                 | {"kind": "images", "path": <absolute path of an image folder>} | null,
      "settings": {...},
      "results": [<record>, ...]
    }

* ``frame``: the run's map original -> scene frame (``c2w_scene = scale * transform @ c2w_original``, see
  :class:`~nerfstudio_gsloc.camera_conventions.FrameTransform`); the viewer checks it against the run it draws.
* ``queries``: where the query images came from: the run's held-out eval split, or a query transforms.json
  (``null``: not known).
* ``settings``: free-form description of what produced the file (``ns-localize``: what ``--resume`` must match;
  ``gsloc-bench``: protocol and methods).
* every record (one per localized query, or per benchmark trial)::

      image                     the query's name (image path as the query source gives it)
      image_path                the image file, or null
      index                     position of the query in its source
      method                    the localizer (gsloc, photometric, depth, icomma, pnp, ...)
      trial                     benchmark trial id, or null (ns-localize)
      status                    converged | max_iterations | failed | rejected
      reason                    why it stopped or failed ("" for a plain convergence)
      transform_matrix          refined pose, 4x4, or null when a failed/rejected query has no pose
      initial_transform_matrix  the pose the localizer started from, 4x4, or null (no initial pose)
      gt_transform_matrix       ground truth, 4x4, or null when unknown
      confidence                localizer's confidence in [0, 1], or null
      loss                      final loss, or null
      iterations                optimisation steps (0 for one-shot methods)
      inliers                   match / PnP inliers, or null
      seconds                   wall-clock seconds attributed to the query

  All matrices are OpenGL camera-to-world in the dataset's **original** frame (``dataparser_transforms.json``
  undone). Errors are not stored: they follow from the poses (:meth:`PoseRecord.errors`).

Version 1 (files of ``ns-localize`` before this module; no ``format``/``version`` keys) still loads: its
``match_inliers`` becomes ``inliers``, ``settings.queries`` (``"eval split"`` or a path) becomes ``queries``, the
stored errors are ignored (recomputed), ``method`` is ``gsloc``.

Files are written atomically (:func:`nerfstudio_gsloc.files.atomic_write_text`) with normal permissions, so a
reader (the viewer, ``--resume``) never sees half a file. This module imports only the bottom of the package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform, to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_write_text
from nerfstudio_gsloc.metrics import is_failure, precision_recall, rotation_error_deg, summarize, translation_error

POSES_FORMAT = "gsloc-poses"
POSES_VERSION = 2
CONVENTION = "OpenGL camera-to-world 4x4 (nerfstudio transforms.json), dataset's original frame"
#: The query-source value version 1 files used for the eval split.
_V1_EVAL_SPLIT = "eval split"


@dataclass(frozen=True)
class QuerySource:
    """Where the queries of a run came from: the run's held-out eval split, a query transforms.json, or a folder of
    images (``ns-localize --images``).

    Use :meth:`eval_split`, :meth:`transforms` and :meth:`images` to build one.
    """

    kind: Literal["eval_split", "transforms", "images"]
    path: Optional[Path] = None

    @staticmethod
    def eval_split() -> "QuerySource":
        """The held-out eval split of the run."""
        return QuerySource("eval_split")

    @staticmethod
    def transforms(path: Path) -> "QuerySource":
        """A query transforms.json (stored as an absolute path)."""
        return QuerySource("transforms", Path(path).resolve())

    @staticmethod
    def images(path: Path) -> "QuerySource":
        """A folder of query images (stored as an absolute path)."""
        return QuerySource("images", Path(path).resolve())

    @property
    def is_eval_split(self) -> bool:
        return self.kind == "eval_split"

    def describe(self) -> str:
        """Words for tables and logs."""
        if self.is_eval_split:
            return "the run's eval split"
        return f"the images in {self.path}" if self.kind == "images" else str(self.path)

    def to_json(self) -> Dict[str, Any]:
        return {"kind": "eval_split"} if self.is_eval_split else {"kind": self.kind, "path": str(self.path)}

    @staticmethod
    def from_json(value: Any) -> "QuerySource":
        """Inverse of :meth:`to_json`; also reads version 1's ``"eval split"`` / path strings.

        Raises:
            ValueError: not a query source.
        """
        if value == _V1_EVAL_SPLIT:
            return QuerySource.eval_split()
        if isinstance(value, str) and value.strip():
            return QuerySource("transforms", Path(value))
        if isinstance(value, dict) and value.get("kind") == "eval_split":
            return QuerySource.eval_split()
        if isinstance(value, dict) and value.get("kind") in ("transforms", "images") and value.get("path"):
            return QuerySource(value["kind"], Path(str(value["path"])))
        raise ValueError(f"not a query source: {value!r}")


@dataclass
class PoseRecord:
    """One localized query (or benchmark trial). Poses: ``[4, 4]`` float64 OpenGL c2w, **original** frame.

    Attributes:
        image: the query's name.
        status: see :mod:`nerfstudio_gsloc.metrics` (``converged``, ``max_iterations``, ``failed``, ``rejected``).
        c2w: refined pose, or ``None`` when a failed/rejected query has no pose.
        c2w_init: initial pose, or ``None``.
        c2w_gt: ground truth, or ``None`` when unknown.
        Others: see the module docstring.
    """

    image: str
    status: str
    c2w: Optional[Tensor]
    c2w_init: Optional[Tensor] = None
    c2w_gt: Optional[Tensor] = None
    image_path: Optional[Path] = None
    index: int = 0
    method: str = "gsloc"
    trial: Optional[int] = None
    reason: str = ""
    confidence: Optional[float] = None
    loss: Optional[float] = None
    iterations: int = 0
    inliers: Optional[int] = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Counts as a failure (infinite error) in every summary."""
        return is_failure(self.status) or self.c2w is None

    @property
    def key(self) -> Tuple[str, str, Optional[int]]:
        """``(method, image, trial)``: unique within one file."""
        return (self.method, self.image, self.trial)

    def errors(self, scale: float) -> Tuple[Optional[float], Optional[float]]:
        """Rotation error (degrees) and translation error in **scene** units of the refined pose.

        Args:
            scale: the frame's dataparser scale (scene units per original unit).

        Returns:
            ``(None, None)`` without ground truth or without a refined pose; otherwise the raw errors, also for a
            failed query (summaries apply the failure convention, see :func:`summarize_records`).
        """
        if self.c2w_gt is None or self.c2w is None:
            return None, None
        est, gt = self.c2w[None].double(), self.c2w_gt[None].double()
        return float(rotation_error_deg(est, gt)[0]), float(translation_error(est, gt)[0]) * float(scale)

    def to_json(self) -> Dict[str, Any]:
        return {
            "image": self.image,
            "image_path": None if self.image_path is None else str(self.image_path),
            "index": int(self.index),
            "method": self.method,
            "trial": self.trial,
            "status": self.status,
            "reason": self.reason,
            "transform_matrix": _matrix_json(self.c2w),
            "initial_transform_matrix": _matrix_json(self.c2w_init),
            "gt_transform_matrix": _matrix_json(self.c2w_gt),
            "confidence": _finite_or_none(self.confidence),
            "loss": _finite_or_none(self.loss),
            "iterations": int(self.iterations),
            "inliers": None if self.inliers is None else int(self.inliers),
            "seconds": round(float(self.seconds), 4),
        }


@dataclass
class PosesDocument:
    """A whole ``poses.json``."""

    frame: FrameTransform
    queries: Optional[QuerySource]
    """Where the queries came from (``None``: not known)."""
    records: List[PoseRecord] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    version: int = POSES_VERSION
    """The version the file was written in (:data:`POSES_VERSION` for new documents)."""

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": POSES_FORMAT,
            "version": POSES_VERSION,
            "convention": CONVENTION,
            "frame": self.frame.to_json(),
            "queries": None if self.queries is None else self.queries.to_json(),
            "settings": self.settings,
            "results": [r.to_json() for r in sorted(self.records, key=_order)],
        }


def pose_to_original(frame: FrameTransform, c2w_scene: Optional[Tensor]) -> Optional[Tensor]:
    """A localizer's scene-frame OpenGL c2w ``[3|4, 4]`` -> the record's original-frame ``[4, 4]`` float64.

    ``None`` (no pose) for ``None`` or a non-finite pose, e.g. the last iterate of a diverged query.
    """
    if c2w_scene is None or not bool(torch.isfinite(c2w_scene).all()):
        return None
    return to_homogeneous(frame.to_original(c2w_scene.detach().cpu().double()[None])[0])


def _order(record: PoseRecord) -> Tuple[str, int, int]:
    return (record.method, record.index, -1 if record.trial is None else record.trial)


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _matrix_json(c2w: Optional[Tensor]) -> Optional[List[List[float]]]:
    """``[3|4, 4]`` pose -> nested 4x4 list; ``None`` (JSON null) for no pose or a non-finite one."""
    if c2w is None or not bool(torch.isfinite(c2w).all()):
        return None
    return to_homogeneous(c2w.detach().cpu().double()).tolist()


def parse_pose_matrix(value: Any, key: str, where: str) -> Tensor:
    """A ``4x4``/``3x4`` JSON matrix -> finite ``[3, 4]`` float64 with a proper rotation (one-line error otherwise).

    Raises:
        GslocError: not numeric, wrong shape, not finite, or its rotation is not orthonormal with det +1.
    """
    try:
        mat = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise GslocError(f"{where}: {key} is not a numeric matrix") from None
    if mat.shape not in ((4, 4), (3, 4)) or not torch.isfinite(mat).all():
        raise GslocError(f"{where}: {key} must be a finite 4x4 or 3x4 matrix, got shape {tuple(mat.shape)}")
    rot = mat[:3, :3]
    if (rot.T @ rot - torch.eye(3, dtype=torch.float64)).abs().max() > 1e-3 or torch.det(rot) < 0:
        raise GslocError(f"{where}: {key} has no proper rotation (not orthonormal with det +1)")
    return mat[:3]


def _optional_pose(entry: Dict[str, Any], key: str, where: str) -> Optional[Tensor]:
    value = entry.get(key)
    return None if value is None else to_homogeneous(parse_pose_matrix(value, key, where))


def _optional_number(entry: Dict[str, Any], key: str, where: str, kind: type = float) -> Any:
    value = entry.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise GslocError(f"{where}: {key} must be a number, got {value!r}") from None


def _finite_matrix(value: Any) -> bool:
    """Whether a JSON matrix holds only finite numbers (malformed ones count as finite: the parser reports them)."""
    try:
        return bool(torch.isfinite(torch.tensor(value, dtype=torch.float64)).all())
    except (TypeError, ValueError, RuntimeError):
        return True


def record_from_json(entry: Any, where: str) -> PoseRecord:
    """One record (version 1 or 2). Raises :class:`GslocError` naming ``where``."""
    if not isinstance(entry, dict) or not all(k in entry for k in ("image", "status", "transform_matrix")):
        raise GslocError(f"{where}: needs 'image', 'status' and 'transform_matrix'")
    status = str(entry["status"])
    raw = entry["transform_matrix"]
    # Version 1 wrote a failed query's non-finite pose as NaN; version 2 writes null. Both mean "no pose".
    no_pose = raw is None or (is_failure(status) and not _finite_matrix(raw))
    if no_pose and not is_failure(status):
        raise GslocError(f"{where}: transform_matrix is null but the status is {status!r}")
    trial = _optional_number(entry, "trial", where, int)
    inliers = entry.get("inliers", entry.get("match_inliers"))
    return PoseRecord(
        image=str(entry["image"]),
        status=status,
        c2w=None if no_pose else _optional_pose(entry, "transform_matrix", where),
        c2w_init=_optional_pose(entry, "initial_transform_matrix", where),
        c2w_gt=_optional_pose(entry, "gt_transform_matrix", where),
        image_path=Path(entry["image_path"]) if entry.get("image_path") else None,
        index=_optional_number(entry, "index", where, int) or 0,
        method=str(entry.get("method") or "gsloc"),
        trial=trial,
        reason=str(entry.get("reason") or ""),
        confidence=_optional_number(entry, "confidence", where),
        loss=_optional_number(entry, "loss", where),
        iterations=_optional_number(entry, "iterations", where, int) or 0,
        inliers=None if inliers is None else _optional_number({"inliers": inliers}, "inliers", where, int),
        seconds=_optional_number(entry, "seconds", where) or 0.0,
    )


def read_poses(path: Path) -> PosesDocument:
    """Read and validate a ``poses.json`` (version 1 or 2).

    Raises:
        GslocError: the file is missing, not JSON, of a newer version, or malformed (one line naming the problem).
    """
    path = Path(path)
    if not path.is_file():
        raise GslocError(f"poses file not found: {path} (pass the poses.json that ns-localize or gsloc-bench wrote)")
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GslocError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list) or "frame" not in document:
        raise GslocError(f"{path} is not a poses.json (needs 'results' and 'frame')")
    version = document.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= POSES_VERSION:
        raise GslocError(f"{path}: poses.json version {version!r} is not supported (this program reads 1 to "
                         f"{POSES_VERSION})")
    if version >= 2 and document.get("format") != POSES_FORMAT:
        raise GslocError(f"{path}: format is {document.get('format')!r}, expected {POSES_FORMAT!r}")
    try:
        frame = FrameTransform.from_json(document["frame"])
    except (ValueError, TypeError) as err:
        raise GslocError(f"{path}: 'frame': {err}") from None
    settings = dict(document.get("settings") or {})
    try:
        source = document.get("queries") if version >= 2 else settings.pop("queries", None)
        queries = None if source is None else QuerySource.from_json(source)
    except ValueError as err:
        raise GslocError(f"{path}: 'queries': {err}") from None
    records = [record_from_json(entry, f"{path} result {i}") for i, entry in enumerate(document["results"])]
    seen = set()
    for record in records:
        if record.key in seen:
            raise GslocError(f"{path}: {record.image} (method {record.method}, trial {record.trial}) appears twice")
        seen.add(record.key)
    return PosesDocument(frame=frame, queries=queries, records=records, settings=settings, version=version)


def write_poses(path: Path, document: PosesDocument) -> None:
    """Write ``document`` as ``poses.json`` (version :data:`POSES_VERSION`, atomic, strict JSON)."""
    atomic_write_text(Path(path), json.dumps(document.to_json(), indent=2, allow_nan=False))


def summarize_records(records: Sequence[PoseRecord], scale: float) -> Optional[Dict[str, Any]]:
    """:func:`nerfstudio_gsloc.metrics.summarize` of the records with ground truth (``None`` when none has it).

    Errors in scene units (``scale``: the frame's dataparser scale). Failed or rejected records, and records
    without a refined pose, are failures with infinite error.
    """
    with_gt = [r for r in records if r.c2w_gt is not None]
    if not with_gt:
        return None
    errors = [r.errors(scale) for r in with_gt]
    summary = summarize(
        [e[0] for e in errors],
        [e[1] for e in errors],
        failed=[r.failed for r in with_gt],
        seconds=[r.seconds for r in with_gt],
        iterations=[r.iterations for r in with_gt],
    )
    # The confidence's precision and recall at (5 deg, 0.05), over every pose (rejected ones included).
    summary["precision"], summary["recall"] = precision_recall(
        [e[0] for e in errors], [e[1] for e in errors], [not r.failed for r in with_gt])
    return summary
