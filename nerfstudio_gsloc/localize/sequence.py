"""Tracking a camera through a sequence of frames: each frame starts from the last, with re-localization.

:class:`SequenceTracker` localizes the frames of a sequence in order with two localizers of the one interface
(:mod:`nerfstudio_gsloc.localize.localizer`), never an optimiser of its own:

* the **tracker**, a short per-frame schedule (``configs/localize/sequence.yaml`` for gsloc): frame ``k`` starts
  from the pose a constant-velocity motion model predicts, ``T_k = T_{k-1} (T_{k-2}^-1 T_{k-1})`` (the last
  camera motion repeated, in the camera's own axes, when frame ``k-1`` was tracked from frame ``k-2``). Its small steps refine a good prediction without kicking it away (Adam's first steps are
  as long as its learning rate whatever the gradient);
* the **re-localizer**, the method with its full schedule (a wide basin: matching stage, PnP jumps, map PnP
  hypotheses), for the first frame (from its prior), for a frame without a known motion (frame 1, the frame after a
  re-localized or lost one: from the last good pose, a whole step away or more) and for every frame the tracker did not localize with confidence: the verifier (:mod:`nerfstudio_gsloc.localize.verification`) rejects a pose whose confidence is
  under its threshold, and such a frame (or one the refinement moved implausibly far from the prediction,
  :attr:`SequenceConfig.max_correction`) is re-localized from each :meth:`SequenceTracker.relocalization_starts`
  (the prediction, retrieval + PnP when the tracker has it, then the last good pose) until one is confident.

With gsloc, **RGB-D frames** of a run whose training views have depth images end aligned to those depth images
(gsloc's last stage, :mod:`nerfstudio_gsloc.localize.depth_registration`): the capture's geometry, not the model's,
has the last word on the pose; :attr:`SequenceFrame.depth_aligned` and the frame's reason say whether the alignment
was kept.

Every frame gets an event: ``initialized`` (frame 0), ``tracked``, ``relocalized`` (the tracker's pose was
refused, a re-localization was confident) or ``lost`` (nothing confident; the frame keeps its best pose, its status
says rejected/failed, and the next frame starts from the last good pose). The event and its cause are also written at
the front of the result's ``reason``, so poses.json keeps them.

``seconds`` of a frame is its whole wall-clock time (tracking, verification, re-localization attempts).
Poses: ``[3, 4]`` OpenGL camera-to-world, scene frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nerfstudio_gsloc.camera_conventions import rigid_inverse, to_homogeneous
from nerfstudio_gsloc.localize.depth_registration import capture_depth_map_of
from nerfstudio_gsloc.localize.initialization import retrieval_initial_poses
from nerfstudio_gsloc.localize.localizer import Localizer
from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig
from nerfstudio_gsloc.localize.pnp import PnPLocalizer, PnPLocalizerConfig
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.registry import LocalizerSettings, SingleLossBudget, make_localizer, make_verifier
from nerfstudio_gsloc.localize.result import STATUS_FAILED, STATUS_MAX_ITERATIONS, LocalizationResult
from nerfstudio_gsloc.localize.verification import PoseVerifier
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error

EVENT_INITIALIZED = "initialized"
EVENT_TRACKED = "tracked"
EVENT_RELOCALIZED = "relocalized"
EVENT_LOST = "lost"

AUTO_PRESET = "auto"
"""``--sequence-preset auto``: :func:`choose_sequence_preset` picks the per-frame schedule."""

RetrievalFn = Callable[[Query], Optional[Tensor]]
"""A global localization of one frame without any prior: its ``[3, 4]`` pose, or ``None`` when none was found."""


@dataclass
class SequenceConfig:
    """Settings of the tracker's motion model and re-localization."""

    motion_model: bool = True
    """Start each frame from the constant-velocity prediction (off: from the previous pose)."""
    max_rounds: int = 3
    """A tracked frame that stops at the iteration limit (still moving: the camera accelerated more than one short
    schedule can follow) is refined again from where it stopped, up to this many rounds in all (not when its pose
    ended aligned to the capture's depth images: that pose is final)."""
    max_correction: float = 0.01
    """A tracked pose that the refinement moved further than this (scene units) from the motion model's prediction
    is not trusted: the motion is smooth, and a photometric optimum that drifts along a flat direction of the
    objective (orbiting the scene looks much like turning) would feed the next prediction; the frame is re-localized."""
    max_correction_deg: float = 0.5
    """... or turned further than this (degrees)."""
    relocalize_from_retrieval: bool = True
    """Re-localize a frame from the prediction, then from retrieval + PnP (no prior), then from the last good pose;
    off: without retrieval."""
    fps: float = 30.0
    """Nominal frame rate: the TUM timestamps are ``frame / fps`` seconds."""
    map_views_from_prediction: bool = True
    """Check a tracked frame against the training views nearest to its motion-model prediction (the verifier's
    :attr:`~nerfstudio_gsloc.localize.verification.PoseVerifier.views_near`) instead of choosing them by matching
    the frame against every training photo; re-localizations still match against all."""


@dataclass
class SequenceFrame:
    """One tracked frame.

    Attributes:
        result: the final result (its ``seconds``: the frame's whole time).
        predicted: ``[3, 4]`` the start of the first attempt (motion model, or the prior for frame 0).
        event: ``initialized``, ``tracked``, ``relocalized`` or ``lost``.
        attempts: ``(start name, confidence or None, failed)`` of every localization of the frame, in order
            (``failed``: no pose at all; a rejected pose has its confidence).
    """

    result: LocalizationResult
    predicted: Tensor
    event: str
    attempts: List[Tuple[str, Optional[float], bool]] = field(default_factory=list)

    @property
    def good(self) -> bool:
        return self.event != EVENT_LOST

    @property
    def depth_aligned(self) -> Optional[bool]:
        """Whether the result's alignment to the capture's depth images was kept (``None``: none ran)."""
        return self.result.depth_aligned


def constant_velocity(pose: Tensor, motion_from: Tensor, motion_to: Tensor) -> Tensor:
    """``pose [3|4, 4]`` moved by the camera motion ``motion_from -> motion_to`` (in the camera's own axes):
    ``pose (from^-1 to)``, ``[3, 4]``. With ``pose = to`` it is the next pose of a camera that repeats its motion."""
    motion = rigid_inverse(motion_from.double()) @ to_homogeneous(motion_to.double())
    out = (to_homogeneous(pose.double()) @ motion)[:3, :4]
    # Back onto the rotations: a float32 pose is orthonormal to ~1e-7 only, and composing three of them frame after
    # frame multiplies the defect (by about 2.4 a frame: 1e-3 after a dozen frames, a visibly skewed render).
    u, _, vt = torch.linalg.svd(out[:, :3])
    fix = torch.ones(3, dtype=out.dtype)
    fix[2] = torch.sign(torch.det(u @ vt))
    out[:, :3] = u @ torch.diag(fix) @ vt
    return out.to(pose.dtype)


def _confident(result: LocalizationResult) -> bool:
    """A pose the verifier accepted (without a verifier: any pose that did not fail)."""
    return not (result.failed or result.skipped) and bool(torch.isfinite(result.c2w).all())


def _score(result: LocalizationResult) -> float:
    if result.skipped or not bool(torch.isfinite(result.c2w).all()):
        return -2.0
    return -1.0 if result.confidence is None else float(result.confidence)


class SequenceTracker:
    """Localizes the frames of a sequence in order (see the module docstring).

    Args:
        tracker: the localizer of the per-frame schedule.
        relocalizer: the localizer of the first frame and of re-localizations (may be ``tracker``).
        config: motion model and re-localization settings.
        retrieval: global localization of one frame (:func:`retrieval_function`); ``None``: re-localize from the last
            good pose only.
    """

    def __init__(self, tracker: Localizer, relocalizer: Localizer, config: Optional[SequenceConfig] = None,
                 retrieval: Optional[RetrievalFn] = None) -> None:
        self.tracker = tracker
        self.relocalizer = relocalizer
        self.config = config if config is not None else SequenceConfig()
        self.retrieval = retrieval

    def predict(self, frames: Sequence[SequenceFrame]) -> Tuple[Tensor, bool]:
        """The start of the next frame from the frames so far (at least one good frame).

        The camera motion is known when the last frame was tracked from the frame before it (not re-localized: that
        may follow a jump, and its "motion" is not the camera's); the next pose repeats it.

        Returns:
            ``(pose [3, 4], whether a motion was known)``; without one the last good pose.
        """
        last = max(i for i, f in enumerate(frames) if f.good)
        if (self.config.motion_model and last == len(frames) - 1 and last > 0
                and frames[last].event == EVENT_TRACKED and frames[last - 1].good):
            return constant_velocity(frames[last].result.c2w, frames[last - 1].result.c2w, frames[last].result.c2w), True
        return frames[last].result.c2w[:3, :4].clone(), False

    def _correction(self, result: LocalizationResult, predicted: Tensor) -> Optional[str]:
        """Why a tracked pose moved implausibly far from the prediction, or ``None``."""
        if not bool(torch.isfinite(result.c2w).all()):
            return None
        est, pred = result.c2w[None].double(), predicted[None].double()
        moved, turned = float(translation_error(est, pred)[0]), float(rotation_error_deg(est, pred)[0])
        if moved > self.config.max_correction or turned > self.config.max_correction_deg:
            return f"moved {moved:.4f} and {turned:.2f} deg from the prediction"
        return None

    def relocalization_starts(self, query: Query, last_good: Optional[Tensor],
                              predicted: Optional[Tensor] = None) -> List[Tuple[str, Tensor]]:
        """Where a frame is re-localized from, in order: the motion model's prediction (when given), retrieval + PnP
        (when enabled and it finds a pose), the last good pose."""
        starts: List[Tuple[str, Tensor]] = [] if predicted is None else [("prediction", predicted[:3, :4].float().cpu())]
        if self.retrieval is not None and self.config.relocalize_from_retrieval:
            found = self.retrieval(query)
            if found is not None:
                starts.append(("retrieval", found[:3, :4].float().cpu()))
        if last_good is not None:
            starts.append(("last good pose", last_good[:3, :4].float().cpu()))
        return starts

    def track(self, queries: Sequence[Query], first_c2w: Optional[Tensor],
              on_frame: Optional[Callable[[int, SequenceFrame], None]] = None) -> List[SequenceFrame]:
        """Localize ``queries`` in order, frame 0 from ``first_c2w [3, 4]`` (with the re-localizer; ``None``: from
        retrieval).

        ``on_frame(position, frame)`` is called as soon as each frame is finished. Returns one frame per query.
        """
        frames: List[SequenceFrame] = []
        self.relocalizer.prepare(queries)  # one-off work (gsloc's calibration) outside the first frame's time
        for position, query in enumerate(queries):
            started = time.perf_counter()
            frame = self._frame(query, frames, first_c2w)
            frame.result.seconds = time.perf_counter() - started
            frames.append(frame)
            if on_frame is not None:
                on_frame(position, frame)
        return frames

    @contextlib.contextmanager
    def _map_views_near(self, pose: Optional[Tensor]) -> Iterator[None]:
        """While tracking from ``pose`` (``None``: not tracking), the tracker's verifier matches frames against the
        training views near it (:attr:`SequenceConfig.map_views_from_prediction`)."""
        verifier = getattr(self.tracker, "verifier", None)
        if pose is None or verifier is None or not self.config.map_views_from_prediction:
            yield
            return
        verifier.views_near = pose
        try:
            yield
        finally:
            verifier.views_near = None

    def _frame(self, query: Query, frames: Sequence[SequenceFrame], first_c2w: Optional[Tensor]) -> SequenceFrame:
        attempts: List[Tuple[str, Optional[float], bool]] = []
        have_good = any(f.good for f in frames)
        if not have_good:
            # Frame 0 (or no good frame yet): the prior, then the re-localization starts, with the wide basin.
            predicted = first_c2w if not frames else frames[-1].predicted
            if predicted is None or not bool(torch.isfinite(predicted).all()):  # no prior: retrieval only
                none = torch.full((3, 4), float("nan"))
                failed = LocalizationResult(query.name, query.index, none, none.clone(), STATUS_FAILED,
                                            "no initial pose", confidence=0.0)
                return self._relocalize(query, none, failed, None, attempts)
            predicted = predicted[:3, :4].float().cpu()
            result = self.relocalizer.localize([query], [predicted])[0]
            attempts.append(("prior" if not frames else "previous start", result.confidence, result.status == STATUS_FAILED))
            if _confident(result):
                event = EVENT_INITIALIZED if not frames else EVENT_RELOCALIZED
                return SequenceFrame(self._note(result, event, attempts), predicted, event, attempts)
            return self._relocalize(query, predicted, result, None, attempts)
        predicted, moving = self.predict(frames)
        # Without a known motion (frame 1, a re-localization with no motion before it) the camera may have moved a
        # whole step: the wide basin of the re-localizer, from the last pose.
        with self._map_views_near(predicted if moving else None):
            result = (self.tracker if moving else self.relocalizer).localize([query], [predicted])[0]
            for _ in range(self.config.max_rounds - 1):
                # a pose aligned to the capture's depth images is final: more photometric rounds cannot move it
                if not moving or result.status != STATUS_MAX_ITERATIONS or result.depth_aligned:
                    break
                again = self.tracker.localize([query], [result.c2w])[0]
                again.c2w_init, again.seconds = result.c2w_init, result.seconds
                again.iterations = result.iterations + again.iterations
                result = again
        attempts.append(("motion model" if moving else "previous pose", result.confidence, result.status == STATUS_FAILED))
        # Only a refinement can drift from its start (a closed-form method such as pnp never reads it).
        correction = self._correction(result, predicted) if moving and self.tracker.max_iterations > 0 else None
        if _confident(result) and correction is None:
            return SequenceFrame(result, predicted, EVENT_TRACKED, attempts)
        if correction is not None:
            attempts[-1] = (f"motion model ({correction})", result.confidence, result.status == STATUS_FAILED)
        last_good = next(f.result.c2w for f in reversed(frames) if f.good)
        return self._relocalize(query, predicted, result, last_good, attempts, from_prediction=moving)

    def _relocalize(self, query: Query, predicted: Tensor, best: LocalizationResult, last_good: Optional[Tensor],
                    attempts: List[Tuple[str, Optional[float], bool]], from_prediction: bool = False) -> SequenceFrame:
        for name, start in self.relocalization_starts(query, last_good, predicted if from_prediction else None):
            result = self.relocalizer.localize([query], [start])[0]
            attempts.append((name, result.confidence, result.status == STATUS_FAILED))
            if _confident(result):
                return SequenceFrame(self._note(result, EVENT_RELOCALIZED, attempts), predicted, EVENT_RELOCALIZED,
                                     attempts)
            if _score(result) > _score(best):
                best = result
        return SequenceFrame(self._note(best, EVENT_LOST, attempts), predicted, EVENT_LOST, attempts)

    @staticmethod
    def _note(result: LocalizationResult, event: str, attempts: Sequence[Tuple[str, Optional[float], bool]]) -> LocalizationResult:
        """Write the event and the attempts at the front of the result's reason."""
        tried = ", ".join(f"{name}: " + ("failed" if failed else f"confidence {conf:.2f}" if conf is not None else "ok")
                          for name, conf, failed in attempts)
        note = f"{event} ({tried})"
        result.add_note(note)
        return result


def choose_sequence_preset(name: str, method: str, frames: Sequence[Query], pipeline: Any,
                           gsloc: PoseInversionConfig) -> Tuple[str, str]:
    """The per-frame preset to track ``frames`` with, and why: ``name`` itself unless it is ``auto``.

    ``auto`` is ``sequence-rgbd`` for gsloc when every frame has depth, gsloc's depth alignment is on and the run's
    training views have depth images (two LM steps, then the alignment sets each frame's pose: on the room path
    ATE 0.000026 against 0.0021 at 0.7x the time per frame, README "Tracking"); otherwise ``sequence``, the short
    schedule the other methods were measured with (``sequence-rgbd``'s two steps would leave photometric and depth
    two iterations, and an RGB frame nothing to align).
    """
    if name != AUTO_PRESET:
        return name, "as given"
    if method != "gsloc":
        return "sequence", f"auto: {method} has no depth alignment"
    if not frames or any(frame.depth is None for frame in frames):
        return "sequence", "auto: frames without depth"
    if not gsloc.depth_alignment.enabled:
        return "sequence", "auto: the depth alignment is off"
    if pipeline is None or capture_depth_map_of(pipeline, gsloc.depth_alignment.map_points) is None:
        return "sequence", "auto: the run's training views have no depth images"
    return "sequence-rgbd", "auto: RGB-D frames, training views with depth images"


def tracking_settings(settings: LocalizerSettings, tracking: PoseInversionConfig) -> LocalizerSettings:
    """The settings of the tracker: gsloc's per-frame config ``tracking``; photometric and depth refine down the same
    short pyramid with its learning rates (their own budget is for starts many degrees away); icomma and pnp as
    they are."""
    budget = SingleLossBudget(pyramid_iterations=tuple(tracking.schedule.pyramid_iterations),
                              rotation_lr=tracking.optim.rotation_lr, translation_lr=tracking.optim.translation_lr)
    return dataclasses.replace(settings, gsloc=tracking, single_loss=budget)


def make_sequence_tracker(method: str, settings: LocalizerSettings, tracking: PoseInversionConfig, model: nn.Module,
                          pipeline: Any = None, seed: int = 0, config: Optional[SequenceConfig] = None,
                          verifier: Optional[PoseVerifier] = None) -> SequenceTracker:
    """The :class:`SequenceTracker` of ``method``: its tracker with :func:`tracking_settings`, its re-localizer with
    ``settings`` (full schedule), both checked by one verifier, and retrieval + PnP when a pipeline is at hand."""
    verifier = verifier if verifier is not None else make_verifier(settings, model, pipeline)
    tracker = make_localizer(method, tracking_settings(settings, tracking), model, pipeline, seed, verifier)
    relocalizer = make_localizer(method, settings, model, pipeline, seed, verifier)
    retrieval = None if pipeline is None else retrieval_function(settings.pnp, model, pipeline, seed)
    return SequenceTracker(tracker, relocalizer, config, retrieval)


def retrieval_function(pnp_config: PnPLocalizerConfig, model: nn.Module, pipeline: Any, seed: int = 0) -> RetrievalFn:
    """Global localization of one frame by retrieval + PnP (the ``--init retrieval`` route of
    :func:`~nerfstudio_gsloc.localize.initialization.retrieval_initial_poses`); the map is built on first use."""
    state: Dict[str, Any] = {}

    def find(query: Query) -> Optional[Tensor]:
        if "map" not in state:
            config = dataclasses.replace(pnp_config, selection="retrieval")
            state["map"] = PnPLocalizer(config, model, pipeline, seed=seed).build_map()
        return retrieval_initial_poses([query], state["map"], seed=seed)[0].c2w

    return find
