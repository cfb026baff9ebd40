"""How far to trust refinement on this model: a self-test on the run's own training photos.

gsloc refines a query from the PnP pose of its map matches (query matched to the training photos, 3D from the
rendered depth) by render-and-compare. On a strong model the photometric optimum is closer to the truth than
PnP; on a weak one (few iterations, a real capture with floaters) it is biased, and on a block of views it pulls
a good PnP pose away (lego-200 after 1,000 iterations: refined farther than PnP on 21 of 50 test views). Neither
the map matches nor the photometric loss can see that bias on a query, since both come from the same model.
The training photos can: their poses are known.

**Self-test.** ``views`` training photos, evenly spaced, are localized as colour-only queries (a query with depth
ends with the depth alignment, which decides its pose, so it is not calibrated) by the same localizer and
settings, each with its own photo left out of the map (so its PnP pose comes from the other photos, as a new
photo's would) and from a perturbed pose (``perturb_deg``, ``perturb_distance`` camera distances). For each
view that started from its PnP pose and kept its refinement this gives the pair (PnP pose, refined pose).

**Calibration.** The final pose of a query is ``interpolate_pose(PnP, refined, f)``: ``f = 1`` keeps the
refined pose, ``f = 0`` returns PnP's. For each ``f`` on a grid the self-test views score
``mean(log(rotation error deg + 1e-3) + log(translation error / camera scale + 1e-5))`` (a mean of logs: each
view counts by its relative change, so a few large errors do not decide). The best ``f`` is then moved towards
PnP, to the smallest ``f`` whose score is within ``standard_errors`` standard errors of the best's (the paired
differences over the views): the self-test's views are few and come from the training cameras, not from where
the queries are, so where it cannot tell two fractions apart the one that leans on PnP's independent evidence is
the safer bet (the "one standard error" rule of model selection).

Measured (README, issue 18): ``f = 0.5`` on lego-200 after 1,000 iterations and 1 after 8,000; 0.75 on fox after
1,000 and 1 after 3,000. The weak lego model's test views score 0.375 and 0.5 alike; fox's 7 test views would have
liked 0.125-0.25.

The calibration is cached beside the run (``gsloc_index/calibration-<key>.json``, keyed by the checkpoint and
every setting that changes a pose) and redone when either changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from nerfstudio_gsloc.files import OutputError, atomic_write_text
from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.pose import interpolate_pose
from nerfstudio_gsloc.localize.queries import Query, load_eval_queries
from nerfstudio_gsloc.localize.retrieval import INDEX_FOLDER, checkpoint_fingerprint
from nerfstudio_gsloc.localize.scene_map import camera_distance_scale, training_camera_poses
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error

CALIBRATION_FORMAT = 1

PosePair = Tuple[Tensor, Tensor]
"""``(PnP pose, refined pose)`` of one query, ``[3, 4]`` OpenGL camera-to-world each (scene frame)."""


@dataclass
class CalibrationConfig:
    """Settings of the self-test that decides how far the final pose moves from PnP's towards the refined one."""

    enabled: bool = True
    """Calibrate on the run's training photos (needs them and the map); off: the refined pose is returned as is."""
    views: int = 24
    """Training photos localized in the self-test (evenly spaced over the training split)."""
    steps: int = 8
    """The fractions tried are ``0, 1/steps, ..., 1``."""
    perturb_deg: float = 10.0
    """Rotation of the self-test's start poses from the training pose."""
    perturb_distance: float = 0.1
    """Translation of the start poses, in camera-distance units (the benchmark protocols' unit)."""
    min_views: int = 8
    """With fewer self-test views that started from PnP, the refined pose is kept (``f = 1``)."""
    standard_errors: float = 1.0
    """How many standard errors of the score the chosen fraction may give up to lean towards PnP."""
    cache: bool = True
    """Keep the calibration beside the run (read back while the checkpoint and settings are unchanged)."""


@dataclass
class Calibration:
    """Outcome of the self-test.

    Attributes:
        fraction: how far the final pose goes from the PnP pose towards the refined pose (``1``: refined).
        views: self-test views that scored (started from PnP and were not failures).
        fractions: the fractions tried; scores: their mean log error over the views (lower is better).
        seconds: wall time of the self-test.
        reason: one line on how ``fraction`` was chosen.
    """

    fraction: float
    views: int
    fractions: List[float] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        if self.fraction >= 1.0:
            return f"refined pose kept as is ({self.reason})"
        return f"final pose {self.fraction:g} of the way from the PnP pose to the refined pose ({self.reason})"


def view_scores(pairs: Sequence[PosePair], truths: Sequence[Tensor], fraction: float, scale: float) -> Tensor:
    """``[V]`` log errors of ``interpolate_pose(pnp, refined, fraction)`` against the true poses (see the module)."""
    est = torch.stack([interpolate_pose(p, r, fraction).double() for p, r in pairs])
    gt = torch.stack([t[:3, :4].double() for t in truths])
    rot, trans = rotation_error_deg(est, gt), translation_error(est, gt)
    return torch.log(rot + 1e-3) + torch.log(trans / max(scale, 1e-9) + 1e-5)


def choose_fraction(pairs: Sequence[PosePair], truths: Sequence[Tensor], scale: float,
                    config: CalibrationConfig) -> Calibration:
    """The fraction of the self-test views (see the module docstring); ``f = 1`` with fewer than ``min_views``."""
    if len(pairs) < max(2, config.min_views):
        return Calibration(1.0, len(pairs), reason=f"only {len(pairs)} self-test views started from PnP, "
                                                   f"{config.min_views} needed")
    fractions = [k / max(1, config.steps) for k in range(max(1, config.steps) + 1)]
    per_view = torch.stack([view_scores(pairs, truths, f, scale) for f in fractions])  # [F, V]
    means = per_view.mean(dim=1)
    best = int(torch.argmin(means))
    chosen = best
    for k in range(best):  # the smallest fraction within the tolerance of the best
        diff = per_view[k] - per_view[best]
        error = float(diff.std(correction=1)) / math.sqrt(diff.numel())
        if float(means[k] - means[best]) <= config.standard_errors * error:
            chosen = k
            break
    reason = (f"self-test on {len(pairs)} training photos: best mean log error at f = {fractions[best]:g}"
              + (f", f = {fractions[chosen]:g} within {config.standard_errors:g} standard error"
                 if chosen != best else ""))
    return Calibration(fractions[chosen], len(pairs), fractions, [float(m) for m in means], reason=reason)


def self_test_queries(pipeline: Any, count: int, config: CalibrationConfig) -> List[Query]:
    """The self-test photos among the run's ``count`` training photos, as queries (ground truth known; evenly
    spaced), without their depth images: RGB-D queries end with the depth alignment, so the calibration serves the
    colour-only ones."""
    take = max(1, min(config.views, count))
    indices = sorted({round(k * (count - 1) / max(1, take - 1)) for k in range(take)})
    photos = load_eval_queries(pipeline, split="train", indices=indices)
    return [dataclasses.replace(query, depth=None) for query in photos]


def run_self_test(pipeline: Any, config: CalibrationConfig, seed: int,
                  localize_pairs: Callable[[List[Query], List[Tensor]], Dict[int, PosePair]]) -> Calibration:
    """Localize the self-test photos with ``localize_pairs`` and choose the fraction.

    Args:
        pipeline: the loaded run (training split).
        config: settings.
        seed: seed of the start poses' perturbations.
        localize_pairs: localizes the queries from the given start poses, each with its own photo left out of the
            map, and returns ``{position: (PnP pose, refined pose)}`` of the queries that started from PnP.
    """
    started = time.perf_counter()
    train_c2w = training_camera_poses(pipeline)  # GslocError without a training split
    queries = self_test_queries(pipeline, len(train_c2w), config)
    scale = camera_distance_scale(train_c2w)
    starts = initial_poses(queries, "perturb", angle_deg=config.perturb_deg,
                           translation=config.perturb_distance * scale, seed=seed)
    CONSOLE.log(f"gsloc: self-test: localizing {len(queries)} training photos, each left out of the map, to "
                "calibrate how far refinement is trusted on this model (once per checkpoint and settings)")
    pairs = localize_pairs(queries, starts)
    positions = sorted(pairs)
    calibration = choose_fraction([pairs[p] for p in positions], [queries[p].gt_c2w for p in positions], scale,
                                  config)
    calibration.seconds = time.perf_counter() - started
    return calibration


def calibration_key(settings: Dict[str, Any]) -> str:
    """Short hash of every setting that changes a self-test pose (the cache file name)."""
    text = json.dumps({"format": CALIBRATION_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_or_calibrate(pipeline: Any, config: CalibrationConfig, settings: Dict[str, Any],
                      calibrate: Callable[[], Calibration]) -> Calibration:
    """The run's calibration: read from ``<run>/gsloc_index`` when the checkpoint and ``settings`` match, else
    ``calibrate()`` (saved there when the run has a folder and a checkpoint, and ``config.cache`` is on)."""
    run_dir, checkpoint = getattr(pipeline, "gsloc_run_dir", None), getattr(pipeline, "gsloc_checkpoint", None)
    path: Optional[Path] = None
    fingerprint = None
    if config.cache and run_dir is not None and checkpoint is not None and Path(checkpoint).is_file():
        path = Path(run_dir) / INDEX_FOLDER / f"calibration-{calibration_key(settings)}.json"
        fingerprint = checkpoint_fingerprint(Path(checkpoint))
        if path.is_file():
            try:
                state = json.loads(path.read_text())
                if state.get("checkpoint") == fingerprint and state.get("format") == CALIBRATION_FORMAT:
                    calibration = Calibration(**state["calibration"])
                    CONSOLE.log(f"gsloc: calibration read from {path}: {calibration.describe()}")
                    return calibration
                CONSOLE.log(f"gsloc: the checkpoint changed since {path} was written; calibrating again")
            except (ValueError, TypeError, KeyError) as err:  # a truncated or foreign file: calibrate again
                CONSOLE.log(f"gsloc: cannot read {path} ({type(err).__name__}); calibrating again")
    calibration = calibrate()
    CONSOLE.log(f"gsloc: self-test took {calibration.seconds:.1f} s: {calibration.describe()}")
    if path is not None:
        state = {"format": CALIBRATION_FORMAT, "checkpoint": fingerprint,
                 "calibration": dataclasses.asdict(calibration)}
        try:
            atomic_write_text(path, json.dumps(state, indent=2))
        except OutputError as err:  # a read-only run folder: the calibration is only a cache
            CONSOLE.log(f"gsloc: the calibration is not cached ({err})")
    return calibration
