"""The pose-inversion pipeline component: one config dataclass, one object with ``localize()``.

From Python::

    from nerfstudio_gsloc.runs import load_run
    from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig
    from nerfstudio_gsloc.localize.queries import load_eval_queries
    from nerfstudio_gsloc.localize.initialization import initial_poses

    _, pipeline = load_run(Path("outputs/scene/gsloc/<timestamp>/config.yml"))
    inverter = PoseInversionConfig().setup(model=pipeline.model)
    queries = load_eval_queries(pipeline)
    results = inverter.localize(queries, initial_poses(queries, "perturb", angle_deg=10, translation=0.1))

``PoseInversionConfig`` follows nerfstudio's ``InstantiateConfig`` convention (``_target`` + ``setup()``), so the
whole tree (losses, matcher, schedule, optimiser) is exposed by one tyro CLI (``ns-localize``) and can be
loaded from the presets in ``configs/localize/*.yaml`` with :func:`load_preset` (see :mod:`nerfstudio_gsloc.presets`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor, nn

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.absolute_pose import reprojection_errors
from nerfstudio_gsloc.localize.calibration import (
    Calibration,
    CalibrationConfig,
    PosePair,
    load_or_calibrate,
    run_self_test,
)
from nerfstudio_gsloc.localize.depth_registration import DepthRegistrationConfig, align_result, capture_depth_map_of
from nerfstudio_gsloc.localize.localizer import LocalizerConfig, OptimizingLocalizer, PosesCallback, StepCallback
from nerfstudio_gsloc.localize.matching import Matcher, MatcherConfig, make_matcher
from nerfstudio_gsloc.localize.objective import LossConfig
from nerfstudio_gsloc.localize.optimizer import PoseOptimizer
from nerfstudio_gsloc.localize.pose import interpolate_pose
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.result import LocalizationResult
from nerfstudio_gsloc.localize.state import MatchState
from nerfstudio_gsloc.localize.verification import confidence_of, measure_support, select_pose
from nerfstudio_gsloc.localize.schedule import OptimConfig, ScheduleConfig, build_stages
from nerfstudio_gsloc.presets import load_dataclass_preset


@dataclass
class PoseInversionConfig(LocalizerConfig):
    """Localization by inverting a Gaussian splatting model (render, compare, descend): the ``gsloc`` method,
    and with one loss term each the ``photometric`` and ``depth`` methods."""

    _target: Type = field(default_factory=lambda: PoseInversion)
    losses: LossConfig = field(default_factory=LossConfig)
    """Loss terms: matching (reprojection), photometric, depth; switches and weights."""
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    """2D-2D matcher of the matching loss (SIFT needs no weights)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Matching stage, PnP jumps, and the coarse-to-fine refinement pyramid."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Adam learning rates, decay, stopping tolerances, batching and divergence guards."""
    hypotheses: bool = True
    """With the run's training views (a verifier): start each query from the PnP pose of its map matches (query
    matched to the training photos) when that has more geometric support than the initial pose, anchor the
    refinement on those PnP inliers, and choose at the end between every hypothesis (initial, each PnP, refined)
    by geometric support (:mod:`~nerfstudio_gsloc.localize.verification`)."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """With hypotheses: how far the final pose moves from the PnP start towards the refined pose, decided once per
    run by a self-test on its training photos (:mod:`~nerfstudio_gsloc.localize.calibration`)."""
    depth_alignment: DepthRegistrationConfig = field(default_factory=DepthRegistrationConfig)
    """The last stage for RGB-D queries of a run whose training views have depth images: point-to-plane ICP of the
    query's depth onto them (:mod:`~nerfstudio_gsloc.localize.depth_registration`); off for the photometric and
    depth baselines."""


class PoseInversion(OptimizingLocalizer):
    """Localizes queries against a splatfacto-style model with :class:`PoseOptimizer`.

    Args:
        config: the configuration.
        model: a trained ``SplatfactoModel``/``GSLocModel`` (or any module :func:`render_splat_model` accepts).
        pipeline: the loaded pipeline: its training views' depth images, when it has them, are the map of the
            depth alignment (``config.depth_alignment``); ``None``: no depth alignment.
        seed: base seed of the RANSAC sampling.
        matcher: a prebuilt matcher (default: built from ``config.matcher`` when the schedule matches).

    Raises:
        GslocError: the matcher cannot be built (e.g. learned-matcher weights missing) or the schedule is invalid.
    """

    def __init__(self, config: PoseInversionConfig, model: nn.Module, pipeline: Any = None, seed: int = 0,
                 matcher: Optional[Matcher] = None) -> None:
        super().__init__(config, model, pipeline, seed)
        self.needs_depth = self.depth_only(config)
        self.matcher = matcher if matcher is not None else self.build_matcher(config)
        self.optimizer = PoseOptimizer(model, config.losses, config.schedule, config.optim, self.matcher, seed=seed)
        self.calibration: Optional[Calibration] = None
        self._self_test_pairs: Optional[Dict[int, PosePair]] = None  # filled while the self-test runs

    def _localize(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor],
                  on_result: Callable[[int, LocalizationResult], None], on_step: StepCallback,
                  on_poses: PosesCallback = None) -> None:
        if self.verifier is None or not self.config.hypotheses:
            def aligned(k: int, result: LocalizationResult) -> None:
                self._align_depth(queries[k], result)
                on_result(k, result)

            return super()._localize(queries, initial_c2w, aligned, on_step, on_poses)
        # RGB-D queries end with the depth alignment, which decides their pose: only the others are calibrated.
        to_calibrate = [not self._aligned_by_depth(query) for query in queries]
        calibration = self.calibrated() if any(to_calibrate) else None
        starts, anchors, hypotheses = [], [], []
        for query, init in zip(queries, initial_c2w):
            start, anchor, candidates = self.first_hypotheses(query, init[:3, :4].float().cpu())
            starts.append(start)
            anchors.append(anchor)
            hypotheses.append(candidates)

        def finish(k: int, result: LocalizationResult) -> None:
            query = queries[k]
            result.c2w_init = initial_c2w[k][:3, :4].float().cpu().clone()
            if not result.failed:
                choice = select_pose(result.c2w, hypotheses[k] + result.candidates, query.K,
                                     self.verifier.matches(query), self.verifier.config)
                if choice.name != "refined":
                    result.move_to(choice.c2w, choice.reason, query.gt_c2w)
                elif anchors[k] is not None and to_calibrate[k]:  # refined from PnP: as far as the calibration trusts it
                    pnp_c2w = dict(hypotheses[k])["map PnP"]
                    if self._self_test_pairs is not None:
                        self._self_test_pairs[k] = (pnp_c2w, result.c2w.clone())
                    elif calibration is not None and calibration.fraction < 1.0:
                        result.move_to(interpolate_pose(pnp_c2w, result.c2w, calibration.fraction),
                                       f"calibrated: {calibration.describe()}", query.gt_c2w)
            self._align_depth(query, result)
            on_result(k, result)

        self.optimizer.run(queries, starts, on_result=finish, on_step=on_step, anchors=anchors, on_poses=on_poses)

    def prepare(self, queries: Optional[Sequence[Query]] = None) -> None:
        if queries is None or not all(self._aligned_by_depth(query) for query in queries):
            self.calibrated()

    def calibrated(self) -> Optional[Calibration]:
        """The run's calibration (:mod:`~nerfstudio_gsloc.localize.calibration`): read from the run's cache or made
        by the self-test on first use (``fraction`` 1 with the reason when the run has no training photos to test
        on); ``None`` when it is off, without hypotheses (nothing to calibrate) or while the self-test itself runs."""
        if (not self.config.calibration.enabled or not self.config.hypotheses or self._self_test_pairs is not None
                or self.pipeline is None or self.verifier is None):
            return None
        if self.calibration is None:
            verifier = self.verifier
            settings = {"localizer": dataclasses.asdict(self.config), "seed": self.seed,
                        "verification": dataclasses.asdict(verifier.config),
                        "map": dataclasses.asdict(verifier.map_config)}
            config = self.config.calibration
            try:
                self.calibration = load_or_calibrate(self.pipeline, config, settings, lambda: run_self_test(
                    self.pipeline, config, self.seed, self._self_test))
            except GslocError as err:  # e.g. a pipeline without its training split: nothing to test on
                self.calibration = Calibration(1.0, 0, reason=f"no self-test: {err}")
            self.notes["calibration"] = self.calibration.describe()
            self.notes["calibration_seconds"] = round(self.calibration.seconds, 2)
        return self.calibration

    def _self_test(self, queries: List[Query], starts: List[Tensor]) -> Dict[int, PosePair]:
        """Localize training photos (each left out of the map) and return their (PnP, refined) pose pairs."""
        self._self_test_pairs = {}
        done = [0]

        def progress(k: int, result: LocalizationResult) -> None:  # log lines: a caller may hold a live progress bar
            done[0] += 1
            if done[0] % 6 == 0 or done[0] == len(queries):
                CONSOLE.log(f"gsloc: self-test {done[0]}/{len(queries)} training photos")

        try:
            with self.verifier.self_test():
                self.localize(queries, starts, on_result=progress)
            return self._self_test_pairs
        finally:
            self._self_test_pairs = None

    def _aligned_by_depth(self, query: Query) -> bool:
        """Whether the query's pose ends with the depth alignment (it has depth and the run's training views too)."""
        return (query.depth is not None and self.pipeline is not None and self.config.depth_alignment.enabled
                and capture_depth_map_of(self.pipeline, self.config.depth_alignment.map_points) is not None)

    def _align_depth(self, query: Query, result: LocalizationResult) -> None:
        """The last stage: an RGB-D query's pose aligned to the capture's depth images (``config.depth_alignment``,
        when the run's training views have them), before the verifier judges it."""
        if self.pipeline is None or not self.config.depth_alignment.enabled:
            return
        depth_map = capture_depth_map_of(self.pipeline, self.config.depth_alignment.map_points)
        if depth_map is not None:
            align_result(query, result, depth_map, self.config.depth_alignment)

    def first_hypotheses(self, query: Query, init: Tensor) -> Tuple[Tensor, Optional[MatchState], List[Tuple[str, Tensor]]]:
        """The start of one query: the PnP pose of its map matches when it is confident and has more support than
        the initial pose, else the initial pose.

        Returns:
            ``(start [3, 4], anchor, hypotheses)``: the anchor holds the map matches supporting a PnP start
            (``None`` when the query starts from its initial pose); ``hypotheses`` lists ``(name, pose)`` of the
            initial and PnP poses for the final choice.
        """
        verifier = self.verifier
        cfg = verifier.config
        hypotheses: List[Tuple[str, Tensor]] = [("initial", init)]
        outcome = verifier.pnp(query, seed=self.seed + query.index)
        if outcome.c2w is None:
            return init, None, hypotheses
        pnp_c2w = outcome.c2w[:3, :4].float().cpu()
        hypotheses.insert(0, ("map PnP", pnp_c2w))
        matches = verifier.matches(query)
        support_pnp = measure_support(pnp_c2w, query.K, matches, cfg.support_px)
        # A PnP pose the confidence check would refuse (few or scattered inliers) does not replace the start.
        if (confidence_of(support_pnp, cfg) < cfg.threshold
                or support_pnp.inliers < measure_support(init, query.K, matches, cfg.support_px).inliers):
            return init, None, hypotheses
        # The anchor is what PnP's own least squares fitted: the matches within its tight refinement threshold.
        errors = reprojection_errors(pnp_c2w, query.K, matches.kpts, matches.points)
        inl = errors <= verifier.map_config.refine_px
        if int(inl.sum()) < cfg.min_support:
            inl = errors <= cfg.support_px
        return pnp_c2w, MatchState(matches.points[inl].float(), matches.kpts[inl].float(), int(inl.sum())), hypotheses

    @staticmethod
    def depth_only(config: PoseInversionConfig) -> bool:
        """Whether the depth term is the only loss: such a method cannot do anything for a query without depth."""
        return bool(config.losses.depth and not (config.losses.photometric or config.losses.matching))

    @staticmethod
    def build_matcher(config: PoseInversionConfig) -> Optional[Matcher]:
        """Validate the schedule and build its matcher (``None`` when no stage matches), without a model.

        Raises:
            GslocError: invalid schedule, or a learned matcher whose weights are missing.
        """
        try:
            stages = build_stages(config.losses, config.schedule, config.optim)
        except ValueError as err:
            raise GslocError(f"invalid localization schedule: {err}") from None
        return make_matcher(config.matcher) if any(stage.matching_weight > 0 for stage in stages) else None


# ----------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------


def load_preset(name_or_path: Union[str, Path], base: Optional[PoseInversionConfig] = None) -> PoseInversionConfig:
    """Read a ``configs/localize`` preset (YAML or JSON mapping of :class:`PoseInversionConfig` fields) on top of ``base``.

    Example ``configs/localize/fast.yaml``::

        schedule:
          pyramid_iterations: [10, 10, 30]
        optim:
          batch_size: 8

    Raises:
        GslocError: unknown preset, unreadable file or unknown keys.
    """
    return load_dataclass_preset("localize", name_or_path, base if base is not None else PoseInversionConfig())
