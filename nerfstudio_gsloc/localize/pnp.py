"""The ``pnp`` localizer: classical structure-based localization against the training views (no gradient step).

What a user would pick instead of pose refinement through a Gaussian scene (hloc-style, no gradient step):

1. **Map** (once per benchmark): every training image gets kornia SIFT keypoints and descriptors (on the real
   training photo, upsampled like the query); the trained scene is rendered at each *training* pose and the keypoints
   are lifted to 3D with that rendered depth (:func:`~nerfstudio_gsloc.localize.absolute_pose.lift_keypoints`).
   Keypoints on depth discontinuities (where bilinear depth would mix foreground and background) or on
   transparent pixels are dropped. The map is :mod:`~nerfstudio_gsloc.localize.scene_map`'s, kept in the run's
   retrieval index (:func:`~nerfstudio_gsloc.localize.retrieval.load_or_build_index`, cached beside the run).
2. **Retrieval**: the query's strongest SIFT features are matched (mutual nearest neighbours + Lowe ratio)
   against every training image and the ``num_views`` images with the most matches are kept
   (``selection="matches"``, which uses no pose at all), or the ``num_views`` training cameras nearest to the
   trial's initial pose (``selection="prior"``, the perturbed-prior setting), or (``selection="retrieval"``, no
   pose either) the VLAD shortlist of the retrieval index (:mod:`~nerfstudio_gsloc.localize.retrieval`: training
   views plus views rendered around them) re-ranked by matches. All query features are then matched against the
   kept views.
3. **Pose**: all 2D-3D correspondences of the kept views go into RANSAC PnP with Levenberg-Marquardt refinement
   on the inliers (:func:`~nerfstudio_gsloc.localize.absolute_pose.pnp_ransac`, OpenCV; pycolmap is not installable
   here).

The method never uses the query's ground truth (it only reports errors against it). RANSAC is seeded per query
with ``seed + query.index``, like gsloc's matching rounds. Keypoints are ``(x, y)`` with pixel centres at ``+0.5`` (the
project's convention, see :mod:`nerfstudio_gsloc.localize.matching`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Literal, Optional, Sequence, Type

import cv2
import torch
from torch import Tensor, nn

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.absolute_pose import pnp_ransac, refine_on_tight_inliers, reprojection_errors
from nerfstudio_gsloc.localize.features import Features, SiftFeatures
from nerfstudio_gsloc.localize.live import PosesCallback
from nerfstudio_gsloc.localize.localizer import Localizer, LocalizerConfig, StepCallback
from nerfstudio_gsloc.localize.matching import MatcherConfig
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.localize.result import STATUS_CONVERGED, STATUS_FAILED, LocalizationResult
from nerfstudio_gsloc.localize.retrieval import RetrievalConfig, RetrievalIndex, load_or_build_index
from nerfstudio_gsloc.localize.scene_map import (  # noqa: F401  (re-exported: the map used to live here)
    MapView,
    TrainingView,
    build_map_view,
    camera_distance_scale,
    depth_edge_mask as _depth_edge_mask,
    load_training_views,
    training_camera_poses,
)

# ----------------------------------------------------------------------------------------------------------
# the localizer
# ----------------------------------------------------------------------------------------------------------


def _pnp_matcher_default() -> MatcherConfig:
    # 2x upsampling: 200 px images give SIFT too few keypoints otherwise (kornia's DoG pyramid doubles again).
    return MatcherConfig(kind="sift", upsample=2.0, max_keypoints=4096, ratio_threshold=0.85)


@dataclass
class PnPLocalizerConfig(LocalizerConfig):
    """Settings of the ``pnp`` localizer (and of the retrieval initialisation, which runs its ``retrieval`` route)."""

    _target: Type = field(default_factory=lambda: PnPLocalizer)

    matcher: MatcherConfig = field(default_factory=_pnp_matcher_default)
    """SIFT settings (query and map views alike)."""
    num_views: int = 10
    """Map views matched per query (k)."""
    selection: Literal["matches", "prior", "retrieval"] = "matches"
    """``matches``: the k training images with the most SIFT matches (no pose used); ``prior``: the k training
    cameras nearest to the trial's initial pose (centre distance plus viewing-direction angle); ``retrieval``: the
    k views of the retrieval index (training and rendered views) ranked first by VLAD, after re-ranking a VLAD
    shortlist by SIFT matches (no pose used)."""
    retrieval_keypoints: int = 256
    """``matches`` retrieval counts matches of only the query's strongest keypoints (0 = all): on lego-200 the
    same top-10 views for a quarter of the matching time; the chosen views are then matched in full."""
    retrieval_shortlist: int = 30
    """``retrieval``: the VLAD top-N views re-ranked by matches of the strongest keypoints like ``matches``
    (0: VLAD order only)."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """The retrieval index (built and cached for ``selection=retrieval``; the other selections map the training
    views only)."""
    reproj_px: float = 2.0
    """RANSAC inlier threshold in query pixels (loose enough to find the pose despite noisy map points)."""
    refine_px: float = 0.75
    """After RANSAC the pose is refined (Levenberg-Marquardt) on the matches within this many pixels only, which
    keeps the most consistent map points (0 = off). On lego-200's test split (a 2000-step model): median
    0.070 deg / 0.0043 units and 100 % at (2 deg, 0.02), against 0.092 deg / 0.0068 units and 94 % without it."""
    min_inliers: int = 12
    """Fewer inliers is a failure (no pose)."""
    ransac_iterations: int = 10000
    ransac_confidence: float = 0.9999
    depth_edge_tolerance: float = 0.05
    """Keypoints whose 3x3 rendered-depth neighbourhood varies by more than this fraction are not mapped."""

    def index_config(self) -> RetrievalConfig:
        """The index this configuration maps: with rendered views only for ``selection=retrieval``."""
        if self.selection == "retrieval":
            return self.retrieval
        return dataclasses.replace(self.retrieval, rendered_per_view=0)


@dataclass
class MapMatches:
    """A query's 2D-3D matches against the map: its keypoints matched to map-view features and their points.

    Attributes:
        kpts: ``[M, 2]`` query pixels ``(x, y)``, centres at ``+0.5``.
        points: ``[M, 3]`` world points (scene frame) of the matched map keypoints.
        views: ids of the map views matched.
        num_keypoints: SIFT keypoints detected in the query.
    """

    kpts: Tensor
    points: Tensor
    views: List[int]
    num_keypoints: int

    def __len__(self) -> int:
        return int(self.kpts.shape[0])


@dataclass
class PnPOutcome:
    """Result of localizing one query with the baseline.

    Attributes:
        c2w: ``[3, 4]`` estimated OpenGL camera-to-world pose (scene frame) or ``None`` when it failed.
        reason: why it failed (empty on success).
        num_matches: 2D-3D correspondences given to PnP.
        num_inliers: inliers of the final pose (those the refinement used, else RANSAC's).
        views: ids of the map views used (:attr:`RetrievalIndex.views`; training views come first, in order).
        seconds: wall time of the whole query (detection, retrieval, matching, PnP).
        inlier_kpts: ``[M, 2]`` query keypoints ``(x, y)`` (pixel centres at ``+0.5``) of the inliers of ``c2w``:
            within ``refine_px`` of the refined pose (when at least ``min_inliers``), else RANSAC's inliers
            (``[0, 2]`` on failure).
        inlier_points: ``[M, 3]`` their world points (scene frame), row for row.
        matches: all the pooled 2D-3D matches given to PnP (kept to score other poses of the query).
    """

    c2w: Optional[Tensor]
    reason: str
    num_matches: int
    num_inliers: int
    views: List[int]
    seconds: float
    inlier_kpts: Tensor = field(default_factory=lambda: torch.zeros(0, 2))
    inlier_points: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    matches: Optional[MapMatches] = None


class PnPBaseline:
    """Structure-based localization against a trained scene's map (see the module docstring).

    Args:
        index: the map (:class:`~nerfstudio_gsloc.localize.retrieval.RetrievalIndex`); ``matches`` and ``prior``
            selections use its training views only, ``retrieval`` all its views.
        config: settings.
    """

    def __init__(self, index: RetrievalIndex, config: PnPLocalizerConfig) -> None:
        if config.num_views < 1:
            raise GslocError("pnp: num_views must be >= 1")
        self.config = config
        self.features = SiftFeatures(config.matcher)
        self.index = index
        self.map: List[MapView] = index.views
        self.map_seconds = index.build_seconds
        self.train_ids = index.view_ids("train")
        train = [self.map[i] for i in self.train_ids]
        self.centres = torch.stack([v.c2w[:, 3] for v in train]) if train else torch.zeros(0, 3)
        self.forwards = torch.stack([-v.c2w[:, 2] for v in train]) if train else torch.zeros(0, 3)
        # The scene's camera-distance scale (the benchmark protocols' unit): distances of selection="prior" are in
        # it; plain scene units without training cameras or when they all sit at the origin (a rotation-only capture).
        self.camera_scale = 1.0
        if train:
            with contextlib.suppress(GslocError):
                self.camera_scale = camera_distance_scale(torch.stack([v.c2w for v in train]))

    def nearest_views(self, c2w: Tensor, scale: float, count: Optional[int] = None) -> List[int]:
        """Ids of the ``count`` (default ``num_views``) training cameras nearest to ``c2w [3, 4]``.

        Distance: centre distance in units of ``scale`` plus the angle (radians) between viewing directions.
        """
        forward = -c2w[:, 2].float()
        dist = torch.linalg.norm(self.centres - c2w[:, 3].float(), dim=-1) / max(scale, 1e-9)
        angle = torch.arccos((self.forwards @ forward).clamp(-1.0, 1.0))
        order = torch.argsort(dist + angle)
        return [self.train_ids[i] for i in order[: count or self.config.num_views].tolist()]

    def most_matched(self, query: Features, candidates: Sequence[int]) -> List[int]:
        """The ``num_views`` of ``candidates`` with the most matches of the query's strongest keypoints."""
        strongest = SiftFeatures.strongest(query, self.config.retrieval_keypoints)
        counts = torch.tensor([len(self.features.match(strongest, self.map[i].features)[0]) for i in candidates])
        order = torch.argsort(counts, descending=True, stable=True)[: self.config.num_views].tolist()
        return [candidates[i] for i in order if counts[i] > 0]

    def select(self, query: Features, prior_c2w: Optional[Tensor], scale: float,
               selection: Optional[str] = None, exclude: Optional[str] = None) -> List[int]:
        """The map views to match the query against, by ``selection`` (default ``config.selection``), never the
        map view named ``exclude`` (a training photo localized as a query must not find itself)."""
        cfg = self.config
        mode = selection or cfg.selection
        spare = 0 if exclude is None else 1  # room for the excluded view in a nearest-k or VLAD top-k list

        def kept(ids: Sequence[int]) -> List[int]:
            return [i for i in ids if exclude is None or self.map[i].name != exclude]

        if mode == "prior":
            if prior_c2w is None:
                raise GslocError("pnp with selection=prior needs an initial pose")
            return kept(self.nearest_views(prior_c2w, scale, cfg.num_views + spare))[: cfg.num_views]
        if mode == "retrieval":
            if cfg.retrieval_shortlist > 0:
                return self.most_matched(query, kept(self.index.top_k(query, max(cfg.retrieval_shortlist, cfg.num_views))))
            return kept(self.index.top_k(query, cfg.num_views + spare))[: cfg.num_views]
        return self.most_matched(query, kept(self.train_ids))

    def correspondences(self, image: Tensor, prior_c2w: Optional[Tensor] = None, scale: float = 1.0,
                        selection: Optional[str] = None, exclude: Optional[str] = None) -> MapMatches:
        """Match one image against the map views :meth:`select` chooses and pool the 2D-3D matches.

        Args:
            image: ``[H, W, 3]`` query image in ``[0, 1]``.
            prior_c2w: ``[3, 4]`` initial pose; used only with ``selection="prior"`` to choose training views.
            scale: camera-distance scale (``selection="prior"`` distance units).
            selection: overrides ``config.selection``.
            exclude: name of a map view not to use (the query's own training photo in a self-test).
        """
        query = self.features.detect(image)
        if len(query) < self.config.min_inliers:
            return MapMatches(torch.zeros(0, 2), torch.zeros(0, 3), [], len(query))
        chosen = self.select(query, prior_c2w, scale, selection, exclude)
        kq, pts = [torch.zeros(0, 2)], [torch.zeros(0, 3)]
        for i in chosen:
            idx, _ = self.features.match(query, self.map[i].features)
            kq.append(query.kpts[idx[:, 0]].float())
            pts.append(self.map[i].points[idx[:, 1]].float())
        return MapMatches(torch.cat(kq), torch.cat(pts), chosen, len(query))

    def localize(self, image: Tensor, K: Tensor, prior_c2w: Optional[Tensor] = None, scale: float = 1.0, seed: int = 0) -> PnPOutcome:
        """Localize one image: :meth:`correspondences`, then :meth:`solve`.

        Args:
            image: ``[H, W, 3]`` query image in ``[0, 1]``.
            K: ``[3, 3]`` query intrinsics.
            prior_c2w: ``[3, 4]`` initial pose; used only with ``selection="prior"`` to choose training views.
            scale: camera-distance scale (``selection="prior"`` distance units).
            seed: OpenCV RNG seed of RANSAC.
        """
        started = time.perf_counter()
        return self.solve(self.correspondences(image, prior_c2w, scale), K, seed, started)

    def solve(self, matches: MapMatches, K: Tensor, seed: int = 0, started: Optional[float] = None) -> PnPOutcome:
        """RANSAC PnP (+ LM on the tight inliers) on a query's pooled matches (see :meth:`correspondences`).

        ``started`` is the ``time.perf_counter()`` the query's clock started at (default: now).
        """
        started = time.perf_counter() if started is None else started
        cfg = self.config

        def outcome(c2w, reason, inliers=0, mask=None):
            kpts = matches.kpts[mask] if mask is not None else torch.zeros(0, 2)
            points = matches.points[mask] if mask is not None else torch.zeros(0, 3)
            return PnPOutcome(c2w, reason, len(matches), inliers, matches.views, time.perf_counter() - started,
                              kpts.float().clone(), points.float().clone(), matches)

        if matches.num_keypoints < cfg.min_inliers:
            return outcome(None, f"only {matches.num_keypoints} SIFT keypoints in the query")
        if len(matches) < cfg.min_inliers:
            return outcome(None, f"only {len(matches)} 2D-3D matches")
        points, kpts_query = matches.points.double(), matches.kpts.double()
        cv2.setRNGSeed(int(seed) & 0x7FFFFFFF)
        result = pnp_ransac(points, kpts_query, K.double(), reproj_px=cfg.reproj_px, min_inliers=cfg.min_inliers,
                            iterations=cfg.ransac_iterations, confidence=cfg.ransac_confidence)
        if result.c2w is None:
            return outcome(None, f"RANSAC PnP found no pose with {cfg.min_inliers} inliers among {len(matches)} matches")
        c2w, inliers = result.c2w.double(), result.num_inliers
        mask = result.inliers.cpu()
        if cfg.refine_px > 0:
            c2w, inliers = refine_on_tight_inliers(points, kpts_query, K.double(), c2w, cfg.refine_px,
                                                   cfg.min_inliers, fallback_inliers=inliers)
            tight = reprojection_errors(c2w, K, kpts_query, points) <= cfg.refine_px
            if int(tight.sum()) >= cfg.min_inliers:  # the consistent correspondences of the refined pose
                mask = tight
        return outcome(c2w.float(), "", inliers, mask)


class PnPLocalizer(Localizer):
    """The ``pnp`` method behind the common interface.

    The map (:func:`~nerfstudio_gsloc.localize.retrieval.load_or_build_index`: cached beside the run when the
    pipeline came from :func:`~nerfstudio_gsloc.runs.load_run`) is built or read on the first call (its time is
    reported in ``notes`` and not charged to the queries). Each query is localized independently; its initial pose
    is used only with ``selection="prior"`` (to choose the training views) and is returned as the pose of a failed
    query.

    Args:
        config, model, pipeline, seed: see :class:`~nerfstudio_gsloc.localize.localizer.Localizer`; the training
            views come from ``pipeline`` unless ``training_views`` are given.
        training_views: the training views to map (instead of the pipeline's).
    """

    def __init__(self, config: PnPLocalizerConfig, model: nn.Module, pipeline: Any = None, seed: int = 0,
                 training_views: Optional[Sequence[TrainingView]] = None) -> None:
        super().__init__(config, model, pipeline, seed)
        if config.num_views < 1:
            raise GslocError("pnp: num_views must be >= 1")
        self.training_views = None if training_views is None else list(training_views)
        self.baseline: Optional[PnPBaseline] = None

    @property
    def shares_verifier_map(self) -> bool:
        """The verifier's map and matches are this method's own (same settings, pose-free view selection)."""
        return (self.verifier is not None and self.training_views is None and self.config.selection == "matches"
                and self.verifier.map_config == self.config)

    def build_map(self) -> PnPBaseline:
        """Build or read the map once (SIFT + rendered depth; rendered views and VLAD for ``retrieval``)."""
        if self.baseline is None:
            cfg = self.config
            if self.shares_verifier_map:
                self.baseline = self.verifier.baseline  # one map for the method and the check of its results
                index = self.baseline.index
            else:
                index = load_or_build_index(self.model, self.pipeline, cfg.index_config(), cfg.matcher,
                                            cfg.depth_edge_tolerance, training_views=self.training_views)
                self.baseline = PnPBaseline(index, cfg)
            self.notes["pnp_map_seconds"] = round(self.baseline.map_seconds, 2)
            self.notes["pnp_map_points"] = sum(len(view.features) for view in self.baseline.map)
            self.notes["pnp_map_views"] = len(index)
            self.notes["pnp_map_cached"] = index.cached
        return self.baseline

    def _localize(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor],
                  on_result: Callable[[int, LocalizationResult], None], on_step: StepCallback,
                  on_poses: PosesCallback = None) -> None:
        # One-shot: no intermediate poses, so ``on_poses`` has nothing to report.
        baseline = self.build_map()
        with torch.no_grad():
            for k, (query, start) in enumerate(zip(queries, initial_c2w)):
                start = start[:3, :4].float().cpu()
                if self.shares_verifier_map:
                    outcome = self.verifier.pnp(query, seed=self.seed + query.index)
                else:
                    outcome = baseline.localize(query.image, query.K, prior_c2w=start, scale=baseline.camera_scale,
                                                seed=self.seed + query.index)
                if outcome.c2w is None:
                    c2w, status, reason = start.clone(), STATUS_FAILED, outcome.reason
                else:
                    c2w, status = outcome.c2w.float().cpu(), STATUS_CONVERGED
                    reason = f"{outcome.num_inliers} inliers of {outcome.num_matches} matches"
                rot = trans = None
                if query.gt_c2w is not None and status != STATUS_FAILED:
                    gt = query.gt_c2w[None, :3, :4].double()
                    rot = float(rotation_error_deg(c2w[None].double(), gt)[0])
                    trans = float(translation_error(c2w[None].double(), gt)[0])
                on_result(k, LocalizationResult(
                    name=query.name, index=query.index, c2w=c2w, c2w_init=start.clone(), status=status, reason=reason,
                    seconds=outcome.seconds, inliers=outcome.num_inliers, rot_err_deg=rot, trans_err=trans,
                ))
                if on_step is not None:
                    on_step(len(queries) - k - 1)
