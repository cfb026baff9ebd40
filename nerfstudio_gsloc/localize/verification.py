"""Ground-truth-free checks of a pose: geometric support, hypothesis selection, confidence.

A query's **map matches** are its SIFT keypoints matched against the training photos most similar to it, each
lifted to 3D with the depth the trained scene renders at that training pose
(:meth:`~nerfstudio_gsloc.localize.pnp.PnPBaseline.correspondences`). They do not depend on any pose of the
query, so they can judge every candidate pose the same way:

* the **support** of a pose is the number of map matches that reproject within ``support_px`` pixels of their
  query keypoint (an inlier count, as RANSAC's), with the median residual of those inliers;
* **selection** keeps every hypothesis a localizer produced (the initial pose, each PnP pose, the refined pose)
  and returns the refined pose unless it lost more than ``refine_tolerance`` of the support of the best
  hypothesis: the photometric optimum of an imperfect model can sit away from the true pose, and the geometric
  consensus of independent matches is what catches it;
* the **confidence** in ``[0, 1]`` grows with the support (more inliers than chance can produce) and its share
  of the matches; under ``threshold`` the result is ``rejected``.

Shapes: ``M`` map matches; poses are ``[3, 4]`` OpenGL camera-to-world in the scene frame; pixels ``(x, y)`` with
centres at ``+0.5``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nerfstudio_gsloc.localize.absolute_pose import reprojection_errors
from nerfstudio_gsloc.localize.pnp import MapMatches, PnPBaseline, PnPLocalizerConfig, PnPOutcome
from nerfstudio_gsloc.localize.retrieval import load_or_build_index
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import STATUS_REJECTED, LocalizationResult


@dataclass
class VerificationConfig:
    """Settings of the geometric check, the hypothesis selection and the confidence."""

    enabled: bool = True
    """Check every result against the map matches (needs the run's training views); off: no confidence."""
    support_px: float = 2.0
    """A map match supports a pose when it reprojects within this many pixels of its query keypoint."""
    refine_tolerance: float = 0.1
    """Selection: the refined pose is rejected when its support is below ``(1 - tolerance)`` of the best other
    hypothesis's (a refinement that moves the pose within the matches' noise keeps nearly all of them) ..."""
    residual_growth: float = 1.0
    """... or when it fits that hypothesis's inliers worse: their median residual grows by more than this fraction
    (a pose that moves the projections by about the matches' own noise makes it grow by ~40%)."""
    residual_slack_px: float = 0.5
    """... and by more than this many pixels: a median residual of a few tenths of a pixel doubles within the
    matches' noise (on a real capture the map's depth errors bias PnP's inliers), a drift the check is for moves
    it by a pixel or more."""
    min_support: int = 12
    """Supports at or below this are what chance alignments of wrong matches reach: confidence 0."""
    full_support: int = 60
    """Support at which the inlier factor of the confidence reaches 1."""
    full_ratio: float = 0.15
    """Share of the map matches supporting the pose at which the ratio factor of the confidence reaches 1."""
    threshold: float = 0.5
    """Results with a lower confidence get status ``rejected`` (they count as failures in every metric)."""


@dataclass
class Support:
    """Geometric support of one pose.

    Attributes:
        inliers: map matches within ``support_px``.
        matches: all map matches of the query.
        median_px: median residual of the inliers (``inf`` without inliers).
    """

    inliers: int
    matches: int
    median_px: float

    @property
    def ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0


def measure_support(c2w: Tensor, K: Tensor, matches: MapMatches, px: float) -> Support:
    """The :class:`Support` of pose ``c2w`` among a query's map matches."""
    if len(matches) == 0 or not bool(torch.isfinite(c2w).all()):
        return Support(0, len(matches), math.inf)
    err = reprojection_errors(c2w, K, matches.kpts, matches.points)
    inl = err[err <= px]
    return Support(int(inl.numel()), len(matches), float(inl.median()) if inl.numel() else math.inf)


def confidence_of(support: Support, config: VerificationConfig) -> float:
    """Confidence in ``[0, 1]``: ``inlier factor x ratio factor``, each a clamped linear ramp (see the config)."""
    span = max(1, config.full_support - config.min_support)
    inlier_factor = min(1.0, max(0.0, (support.inliers - config.min_support) / span))
    ratio_factor = min(1.0, support.ratio / max(config.full_ratio, 1e-9))
    return float(inlier_factor * ratio_factor)


@dataclass
class Choice:
    """Outcome of :func:`select_pose`: the chosen pose, which hypothesis it is, every support, and why."""

    c2w: Tensor
    name: str
    support: Support
    supports: Dict[str, Support]
    reason: str


def select_pose(refined: Tensor, hypotheses: Sequence[Tuple[str, Tensor]], K: Tensor, matches: MapMatches,
                config: VerificationConfig) -> Choice:
    """Choose between the refined pose and the other hypotheses of a query by their geometric support.

    The refined pose wins unless, against the best confident hypothesis (most inliers; ties go to the earlier one;
    confidence at least ``threshold``), it has
    less than ``(1 - refine_tolerance)`` of its support or fits its inliers with a median residual more than
    ``1 + residual_growth`` times and ``residual_slack_px`` pixels larger. With too few map matches to judge
    (``<= min_support``) the refined pose is kept.

    Args:
        refined: ``[3, 4]`` the localizer's final pose.
        hypotheses: ``(name, [3, 4] pose)`` of the other candidates, in order of preference.
        K: ``[3, 3]`` query intrinsics.
        matches: the query's map matches.
        config: thresholds.
    """
    px = config.support_px
    refined_support = measure_support(refined, K, matches, px)
    supports = {"refined": refined_support}
    best: Optional[Tuple[str, Tensor, Support]] = None
    for name, c2w in hypotheses:
        support = measure_support(c2w, K, matches, px)
        supports[name] = support
        if confidence_of(support, config) < config.threshold:
            continue  # a hypothesis the check would refuse cannot overrule the refined pose
        if best is None or support.inliers > best[2].inliers:
            best = (name, c2w, support)
    keep = Choice(refined, "refined", refined_support, supports, "")
    if best is None or len(matches) <= config.min_support or best[2].inliers <= config.min_support:
        return keep
    name, c2w, support = best
    if refined_support.inliers < (1.0 - config.refine_tolerance) * support.inliers:
        why = (f"{refined_support.inliers} of {len(matches)} map matches within {px:g} px, the {name} pose has "
               f"{support.inliers}")
    else:
        inl = reprojection_errors(c2w, K, matches.kpts, matches.points) <= px
        own = float(reprojection_errors(c2w, K, matches.kpts[inl], matches.points[inl]).median())
        moved = float(reprojection_errors(refined, K, matches.kpts[inl], matches.points[inl]).median())
        if moved <= max((1.0 + config.residual_growth) * own, own + config.residual_slack_px):
            return keep
        why = f"median residual of the {name} pose's {int(inl.sum())} inliers {moved:.2f} px against its {own:.2f} px"
    reason = f"refinement lost geometric support ({why}): returned the {name} pose"
    return Choice(c2w[:3, :4].float().cpu().clone(), name, support, supports, reason)


class PoseVerifier:
    """Map matches of queries against a run's training views, their support and the confidence of poses.

    The map (SIFT on every training photo, lifted with the depth rendered at the training poses) is the one of
    the ``pnp`` method, built on first use or read from the run's index cache; a query's matches are kept until :meth:`forget` so that a
    localizer and the final check share them.

    Args:
        model: the trained scene.
        pipeline: the loaded pipeline (training views), unless ``training_views`` are given.
        map_config: SIFT, retrieval and PnP settings (``selection`` is forced to ``matches``: the check must not
            depend on any pose of the query it judges; see :attr:`views_near` for a pose known beforehand).
        config: the check's thresholds.
    """

    def __init__(self, model: nn.Module, pipeline: Any, map_config: PnPLocalizerConfig, config: VerificationConfig,
                 training_views=None) -> None:
        self.model = model
        self.pipeline = pipeline
        self.map_config = dataclasses.replace(map_config, selection="matches")
        self.config = config
        self.training_views = training_views
        self._baseline: Optional[PnPBaseline] = None
        self._matches: Dict[Tuple[int, str], MapMatches] = {}
        self.seconds: Dict[Tuple[int, str], float] = {}
        self.views_near: Optional[Tensor] = None
        """When set, a ``[3, 4]`` pose known before the query is localized (a tracker's motion-model prediction):
        the query is matched against the training views nearest to it instead of choosing them by matching it
        against every training photo (a third of a tracked frame's time). Every candidate pose of the query is
        still judged by the same matches."""
        self.leave_own_photo_out = False
        """When set, a query never matches the map view of its own name: training photos localized as queries
        (:mod:`~nerfstudio_gsloc.localize.calibration`'s self-test) see the map a new photo would see."""

    @property
    def baseline(self) -> PnPBaseline:
        """The map (built on first use)."""
        if self._baseline is None:
            cfg = self.map_config
            index = load_or_build_index(self.model, self.pipeline, cfg.index_config(), cfg.matcher,
                                        cfg.depth_edge_tolerance, training_views=self.training_views)
            self._baseline = PnPBaseline(index, cfg)
        return self._baseline

    def matches(self, query: Query) -> MapMatches:
        """The query's map matches (computed once until :meth:`forget`; the time is kept in ``seconds``)."""
        key = (query.index, query.name)
        if key not in self._matches:
            started = time.perf_counter()
            exclude = query.name if self.leave_own_photo_out else None
            with torch.no_grad():
                if self.views_near is None:
                    self._matches[key] = self.baseline.correspondences(query.image, exclude=exclude)
                else:
                    self._matches[key] = self.baseline.correspondences(
                        query.image, self.views_near[:3, :4].float().cpu(), self.baseline.camera_scale, "prior",
                        exclude)
            self.seconds[key] = time.perf_counter() - started
        return self._matches[key]

    @contextlib.contextmanager
    def self_test(self) -> Iterator[None]:
        """Within: every query leaves its own training photo out of the map and is matched against all of them
        (no ``views_near``); the matches are dropped on both sides, so no query keeps matches of the other kind."""
        saved = self.views_near
        self.forget()
        self.leave_own_photo_out, self.views_near = True, None
        try:
            yield
        finally:
            self.forget()
            self.leave_own_photo_out, self.views_near = False, saved

    def pnp(self, query: Query, seed: int) -> PnPOutcome:
        """The PnP pose of the query's map matches (RANSAC seeded with ``seed``)."""
        return self.baseline.solve(self.matches(query), query.K, seed=seed)

    def support(self, query: Query, c2w: Tensor) -> Support:
        return measure_support(c2w, query.K, self.matches(query), self.config.support_px)

    def forget(self) -> None:
        """Drop the cached matches (each localize call matches its queries afresh, so its time is honest)."""
        self._matches.clear()
        self.seconds.clear()

    def review(self, query: Query, result: LocalizationResult) -> LocalizationResult:
        """Give ``result`` its confidence (0 for a failure) and reject it under the threshold, with the reason.

        The time spent matching the query against the map is added to the result's seconds: to every result of
        the query (the benchmark's trials of one query share the matches but each pays for them, as a lone query
        would).
        """
        result.seconds += self.seconds.get((query.index, query.name), 0.0)
        if result.skipped:
            return result
        if result.failed:
            result.confidence = 0.0
            return result
        support = self.support(query, result.c2w)
        result.confidence = confidence_of(support, self.config)
        if result.confidence < self.config.threshold:
            note = (f"rejected: confidence {result.confidence:.2f} < {self.config.threshold:g} ({support.inliers} of "
                    f"{support.matches} map matches within {self.config.support_px:g} px)")
            result.add_note(note)
            result.status = STATUS_REJECTED
        return result
