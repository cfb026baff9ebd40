"""The ``pnp`` localizer: classical structure-based localization against the training views (no gradient step).

What a user would pick instead of pose refinement through a Gaussian scene (hloc-style, no gradient step):

1. **Map** (once per benchmark): every training image gets kornia SIFT keypoints and descriptors (on the real
   training photo, upsampled like the query); the trained scene is rendered at each *training* pose and the
   keypoints are lifted to 3D with that rendered depth (:func:`~nerfstudio_gsloc.localize.matching.lift_keypoints`).
   Keypoints on depth discontinuities (where bilinear depth would mix foreground and background) or on
   transparent pixels are dropped.
2. **Retrieval**: the query's strongest SIFT features are matched (mutual nearest neighbours + Lowe ratio)
   against every training image and the ``num_views`` images with the most matches are kept
   (``selection="matches"``, which uses no pose at all), or the ``num_views`` training cameras nearest to the
   trial's initial pose (``selection="prior"``, the perturbed-prior setting). All query features are then
   matched against the kept views.
3. **Pose**: all 2D-3D correspondences of the kept views go into RANSAC PnP with Levenberg-Marquardt refinement
   on the inliers (:func:`~nerfstudio_gsloc.localize.matching.pnp_ransac`, OpenCV; pycolmap is not installable
   here).

The method never uses the query's ground truth (it only reports errors against it). RANSAC is seeded per query
with ``seed + query.index``, like gsloc's matching rounds. Keypoints are ``(x, y)`` with pixel centres at ``+0.5`` (the
project's convention, see :mod:`nerfstudio_gsloc.localize.matching`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Literal, Optional, Sequence, Tuple, Type

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nerfstudio_gsloc.camera_conventions import opencv_w2c_to_opengl_c2w, opengl_c2w_to_opencv_w2c
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.features import Features, SiftFeatures
from nerfstudio_gsloc.localize.live import PosesCallback
from nerfstudio_gsloc.localize.localizer import Localizer, LocalizerConfig, StepCallback
from nerfstudio_gsloc.localize.matching import MatcherConfig, lift_keypoints, pnp_ransac
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.localize.result import STATUS_CONVERGED, STATUS_FAILED, LocalizationResult
from nerfstudio_gsloc.rendering import render_splat_model

# ----------------------------------------------------------------------------------------------------------
# training views and the map
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainingView:
    """One training image with its camera (scene frame).

    Attributes:
        name: image file name.
        image: ``[H, W, 3]`` float32 in ``[0, 1]`` (composited onto the dataset's background like the queries).
        K: ``[3, 3]`` intrinsics.
        c2w: ``[3, 4]`` OpenGL camera-to-world pose.
    """

    name: str
    image: Tensor
    K: Tensor
    c2w: Tensor


def load_training_views(pipeline) -> List[TrainingView]:
    """The training split of a loaded nerfstudio pipeline as :class:`TrainingView` s.

    RGBA images are composited onto the dataparser's ``alpha_color`` (white when it has none), as the eval
    queries are (:func:`~nerfstudio_gsloc.localize.queries.load_eval_queries`).

    Raises:
        GslocError: no training dataset.
    """
    dataset = getattr(getattr(pipeline, "datamanager", None), "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise GslocError("the run has no training images to build the pnp baseline's map from")
    outputs = dataset._dataparser_outputs
    cameras = dataset.cameras
    views: List[TrainingView] = []
    for index in range(len(dataset)):
        rgb = torch.from_numpy(dataset.get_numpy_image(index).astype(np.float32) / 255.0)
        if rgb.shape[-1] == 4:
            background = outputs.alpha_color.float() if outputs.alpha_color is not None else torch.ones(3)
            rgb = rgb[..., :3] * rgb[..., 3:] + background * (1.0 - rgb[..., 3:])
        camera = cameras[index]
        K = torch.tensor(
            [[float(camera.fx), 0.0, float(camera.cx)], [0.0, float(camera.fy), float(camera.cy)], [0.0, 0.0, 1.0]]
        )
        c2w = camera.camera_to_worlds.detach().cpu().float()[:3, :4].clone()
        views.append(TrainingView(str(outputs.image_filenames[index]), rgb.contiguous(), K, c2w))
    return views


def training_camera_poses(pipeline) -> Tensor:
    """``[N, 3, 4]`` training camera-to-world poses (scene frame) of a loaded pipeline, without reading images."""
    dataset = getattr(getattr(pipeline, "datamanager", None), "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise GslocError("the run has no training cameras")
    return dataset.cameras.camera_to_worlds.detach().cpu().float()[:, :3, :4].clone()


@dataclass
class MapView:
    """A training view's features with their 3D points (from the rendered depth at the training pose).

    Attributes:
        features: SIFT features of the kept keypoints.
        points: ``[N, 3]`` world points of those keypoints (scene frame).
        c2w: ``[3, 4]`` training camera pose.
    """

    features: Features
    points: Tensor
    c2w: Tensor


def _depth_edge_mask(depth: Tensor, tolerance: float) -> Tensor:
    """``[H, W]`` bool: True where the 3x3 neighbourhood's depth varies by more than ``tolerance`` (relative to its
    minimum), including pixels next to missing (``<= 0``) depth, where the rendered surface ends."""
    d = F.pad(depth.clamp_min(0.0)[None, None], (1, 1, 1, 1), mode="replicate")
    high = F.max_pool2d(d, 3, stride=1)[0, 0]
    low = -F.max_pool2d(-d, 3, stride=1)[0, 0]
    return (high - low) > tolerance * low.clamp_min(1e-9)


def build_map_view(model, view: TrainingView, features: SiftFeatures, depth_edge_tolerance: float, alpha_threshold: float = 0.5) -> MapView:
    """Detect features on a training image and lift them with the model's depth rendered at its pose."""
    with torch.no_grad():
        height, width = view.image.shape[:2]
        rendered = render_splat_model(model, view.c2w[None], view.K[None], width, height)
        depth, alpha = rendered.depth[0, ..., 0].cpu(), rendered.alpha[0, ..., 0].cpu()
    feats = features.detect(view.image)
    points, valid = lift_keypoints(feats.kpts, depth, view.K, view.c2w, alpha=alpha, alpha_threshold=alpha_threshold)
    if len(feats) and depth_edge_tolerance > 0:
        edges = _depth_edge_mask(depth, depth_edge_tolerance)
        col = feats.kpts[:, 0].floor().long().clamp(0, width - 1)
        row = feats.kpts[:, 1].floor().long().clamp(0, height - 1)
        valid = valid & ~edges[row, col]
    return MapView(Features(feats.kpts[valid], feats.desc[valid], feats.response[valid]), points[valid], view.c2w)


# ----------------------------------------------------------------------------------------------------------
# the localizer
# ----------------------------------------------------------------------------------------------------------


def _pnp_matcher_default() -> MatcherConfig:
    # 2x upsampling: 200 px images give SIFT too few keypoints otherwise (kornia's DoG pyramid doubles again).
    return MatcherConfig(kind="sift", upsample=2.0, max_keypoints=4096, ratio_threshold=0.85)


@dataclass
class PnPLocalizerConfig(LocalizerConfig):
    """Settings of the ``pnp`` localizer."""

    _target: Type = field(default_factory=lambda: PnPLocalizer)

    matcher: MatcherConfig = field(default_factory=_pnp_matcher_default)
    """SIFT settings (query and training images alike)."""
    num_views: int = 10
    """Training views matched per query (k)."""
    selection: Literal["matches", "prior"] = "matches"
    """``matches``: the k training images with the most SIFT matches (no pose used); ``prior``: the k training
    cameras nearest to the trial's initial pose (centre distance plus viewing-direction angle)."""
    retrieval_keypoints: int = 256
    """``matches`` retrieval counts matches of only the query's strongest keypoints (0 = all): on lego-200 the
    same top-10 views for a quarter of the matching time; the chosen views are then matched in full."""
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


@dataclass
class MapMatches:
    """A query's 2D-3D matches against the map: its keypoints matched to training-view features and their points.

    Attributes:
        kpts: ``[M, 2]`` query pixels ``(x, y)``, centres at ``+0.5``.
        points: ``[M, 3]`` world points (scene frame) of the matched training-view keypoints.
        views: indices of the training views matched.
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
        c2w: ``[3, 4]`` estimated pose (scene frame) or ``None`` when it failed.
        reason: why it failed (empty on success).
        num_matches: 2D-3D correspondences given to PnP.
        num_inliers: RANSAC inliers of the final pose.
        views: indices of the training views used.
        seconds: wall time of the whole query (detection, retrieval, matching, PnP).
        matches: the pooled 2D-3D matches given to PnP (kept to score other poses of the query).
    """

    c2w: Optional[Tensor]
    reason: str
    num_matches: int
    num_inliers: int
    views: List[int]
    seconds: float
    matches: Optional[MapMatches] = None


class PnPBaseline:
    """Structure-based localization against a trained scene's training views (see the module docstring).

    Args:
        model: a trained splatfacto-style model (renders the training views' depth).
        views: the training views.
        config: settings.
        on_view: called after each training view is mapped (progress).
    """

    def __init__(self, model, views: Sequence[TrainingView], config: PnPLocalizerConfig, on_view=None) -> None:
        if config.num_views < 1:
            raise GslocError("pnp: num_views must be >= 1")
        self.config = config
        self.features = SiftFeatures(config.matcher)
        started = time.perf_counter()
        self.map: List[MapView] = []
        for view in views:
            self.map.append(build_map_view(model, view, self.features, config.depth_edge_tolerance))
            if on_view is not None:
                on_view()
        self.map_seconds = time.perf_counter() - started
        self.centres = torch.stack([v.c2w[:, 3] for v in views]) if views else torch.zeros(0, 3)
        self.forwards = torch.stack([-v.c2w[:, 2] for v in views]) if views else torch.zeros(0, 3)

    def nearest_views(self, c2w: Tensor, scale: float) -> List[int]:
        """Indices of the ``num_views`` training cameras nearest to ``c2w [3, 4]``.

        Distance: centre distance in units of ``scale`` plus the angle (radians) between viewing directions.
        """
        forward = -c2w[:, 2].float()
        dist = torch.linalg.norm(self.centres - c2w[:, 3].float(), dim=-1) / max(scale, 1e-9)
        angle = torch.arccos((self.forwards @ forward).clamp(-1.0, 1.0))
        order = torch.argsort(dist + angle)
        return order[: self.config.num_views].tolist()

    def correspondences(self, image: Tensor, prior_c2w: Optional[Tensor] = None, scale: float = 1.0) -> MapMatches:
        """Match one image against its ``num_views`` most similar training views and pool the 2D-3D matches.

        Args:
            image: ``[H, W, 3]`` query image in ``[0, 1]``.
            prior_c2w: ``[3, 4]`` initial pose; used only with ``selection="prior"`` to choose training views.
            scale: camera-distance scale (``selection="prior"`` distance units).

        Returns:
            :class:`MapMatches` (``kpts`` and ``points`` empty when the query has too few keypoints).
        """
        cfg = self.config
        query = self.features.detect(image)
        empty = MapMatches(torch.zeros(0, 2), torch.zeros(0, 3), [], len(query))
        if len(query) < cfg.min_inliers:
            return empty
        if cfg.selection == "prior":
            if prior_c2w is None:
                raise GslocError("pnp with selection=prior needs an initial pose")
            chosen = self.nearest_views(prior_c2w, scale)
        else:
            strongest = SiftFeatures.strongest(query, cfg.retrieval_keypoints)
            counts = torch.tensor([len(self.features.match(strongest, view.features)[0]) for view in self.map])
            chosen = torch.argsort(counts, descending=True, stable=True)[: cfg.num_views].tolist()
            chosen = [i for i in chosen if counts[i] > 0]
        kq, pts = [], []
        for i in chosen:
            idx, _ = self.features.match(query, self.map[i].features)
            kq.append(query.kpts[idx[:, 0]])
            pts.append(self.map[i].points[idx[:, 1]])
        if not kq:
            return MapMatches(empty.kpts, empty.points, chosen, len(query))
        return MapMatches(torch.cat(kq), torch.cat(pts), chosen, len(query))

    def localize(self, image: Tensor, K: Tensor, prior_c2w: Optional[Tensor] = None, scale: float = 1.0, seed: int = 0) -> PnPOutcome:
        """Localize one image.

        Args:
            image: ``[H, W, 3]`` query image in ``[0, 1]``.
            K: ``[3, 3]`` query intrinsics.
            prior_c2w: ``[3, 4]`` initial pose; used only with ``selection="prior"`` to choose training views.
            scale: camera-distance scale (``selection="prior"`` distance units).
            seed: OpenCV RNG seed of RANSAC.

        Returns:
            :class:`PnPOutcome` (with the pooled matches, also when it failed).
        """
        started = time.perf_counter()
        return self.solve(self.correspondences(image, prior_c2w, scale), K, seed, started)

    def solve(self, matches: MapMatches, K: Tensor, seed: int = 0, started: Optional[float] = None) -> PnPOutcome:
        """RANSAC PnP (+ LM on the tight inliers) on a query's pooled matches (see :meth:`correspondences`).

        ``started`` is the ``time.perf_counter()`` the query's clock started at (default: now).
        """
        started = time.perf_counter() if started is None else started
        cfg = self.config

        def outcome(c2w, reason, inliers=0):
            return PnPOutcome(c2w, reason, len(matches), inliers, matches.views, time.perf_counter() - started, matches)

        if matches.num_keypoints < cfg.min_inliers:
            return outcome(None, f"only {matches.num_keypoints} SIFT keypoints in the query")
        if len(matches) < cfg.min_inliers:
            return outcome(None, f"only {len(matches)} 2D-3D matches")
        cv2.setRNGSeed(int(seed) & 0x7FFFFFFF)
        result = pnp_ransac(
            matches.points.double(), matches.kpts.double(), K.double(), reproj_px=cfg.reproj_px,
            min_inliers=cfg.min_inliers, iterations=cfg.ransac_iterations, confidence=cfg.ransac_confidence,
        )
        if result.c2w is None:
            return outcome(None, f"RANSAC PnP found no pose with {cfg.min_inliers} inliers among {len(matches)} matches")
        c2w, inliers = result.c2w.double(), result.num_inliers
        if cfg.refine_px > 0:
            c2w, inliers = refine_on_tight_inliers(matches.points.double(), matches.kpts.double(), K.double(), c2w,
                                                   cfg.refine_px, cfg.min_inliers, fallback_inliers=inliers)
        return outcome(c2w.float(), "", inliers)


def refine_on_tight_inliers(
    points_world: Tensor, kpts_query: Tensor, K: Tensor, c2w: Tensor, px: float, min_inliers: int,
    rounds: int = 2, fallback_inliers: int = 0,
) -> Tuple[Tensor, int]:
    """Levenberg-Marquardt refinement of a pose on the correspondences that reproject within ``px`` pixels.

    Args:
        points_world: ``[M, 3]`` world points.
        kpts_query: ``[M, 2]`` query pixels (centres at ``+0.5``, the convention of ``K``).
        K: ``[3, 3]`` intrinsics.
        c2w: ``[3, 4]`` OpenGL camera-to-world starting pose (e.g. from RANSAC).
        px: inlier threshold of the refinement.
        min_inliers: with fewer inliers the starting pose is returned unchanged.
        rounds: refine / re-select rounds.
        fallback_inliers: inlier count reported when the starting pose is kept.

    Returns:
        ``(c2w [3, 4] float64, number of inliers)``.
    """
    obj = points_world.cpu().numpy().reshape(-1, 1, 3)
    img = kpts_query.cpu().numpy().reshape(-1, 2)
    K_np = K.cpu().numpy()
    w2c = opengl_c2w_to_opencv_w2c(c2w.cpu()).numpy()
    rvec, _ = cv2.Rodrigues(w2c[:3, :3])
    tvec = w2c[:3, 3].reshape(3, 1).copy()
    best = (c2w.cpu(), fallback_inliers)
    for _ in range(rounds):
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K_np, None)
        rot, _ = cv2.Rodrigues(rvec)
        depth = (obj.reshape(-1, 3) @ rot.T + tvec.reshape(1, 3))[:, 2]
        mask = (np.linalg.norm(proj.reshape(-1, 2) - img, axis=-1) <= px) & (depth > 0)
        if mask.sum() < max(min_inliers, 6):
            break
        rvec, tvec = cv2.solvePnPRefineLM(obj[mask], img[mask].reshape(-1, 1, 2), K_np, None, rvec, tvec)
        rot, _ = cv2.Rodrigues(rvec)
        refined = np.eye(4)
        refined[:3, :3], refined[:3, 3] = rot, tvec.reshape(3)
        best = (opencv_w2c_to_opengl_c2w(torch.from_numpy(refined)), int(mask.sum()))
    return best


class PnPLocalizer(Localizer):
    """The ``pnp`` method behind the common interface.

    The map of the training views is built on the first call (its time is reported in ``notes`` and not charged
    to the queries). Each query is localized independently; its initial pose is used only with
    ``selection="prior"`` (to choose the training views) and is returned as the pose of a failed query.

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
        self.camera_scale = 1.0

    @property
    def shares_verifier_map(self) -> bool:
        """The verifier's map and matches are this method's own (same settings, pose-free view selection)."""
        return (self.verifier is not None and self.training_views is None and self.config.selection == "matches"
                and self.verifier.map_config == self.config)

    def build_map(self) -> PnPBaseline:
        """Map the training views once (SIFT + rendered depth)."""
        if self.baseline is None:
            if self.shares_verifier_map:
                self.baseline = self.verifier.baseline  # one map for the method and the check of its results
                views = self.baseline.map
            else:
                views = self.training_views if self.training_views is not None else load_training_views(self.pipeline)
                self.baseline = PnPBaseline(self.model, views, self.config)
            if views:
                # The scene's camera-distance scale: distances of selection="prior" are in its units.
                self.camera_scale = float(torch.linalg.norm(self.baseline.centres.double(), dim=-1).median())
            self.notes["pnp_map_seconds"] = round(self.baseline.map_seconds, 2)
            self.notes["pnp_map_points"] = sum(len(view.features) for view in self.baseline.map)
        return self.baseline

    def _localize(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor],
                  on_result: Callable[[int, LocalizationResult], None], on_step: StepCallback,
                  on_poses: PosesCallback = None) -> None:
        # One-shot: no intermediate poses to report (``on_poses`` is unused).
        baseline = self.build_map()
        with torch.no_grad():
            for k, (query, start) in enumerate(zip(queries, initial_c2w)):
                start = start[:3, :4].float().cpu()
                if self.shares_verifier_map:
                    outcome = self.verifier.pnp(query, seed=self.seed + query.index)
                else:
                    outcome = baseline.localize(query.image, query.K, prior_c2w=start, scale=self.camera_scale,
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
