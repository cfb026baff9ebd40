"""The registry of localizers: a method name -> its config (and so, through ``setup()``, its localizer).

* ``gsloc``: :class:`~nerfstudio_gsloc.localize.pipeline.PoseInversionConfig` as ``ns-localize`` runs it by
  default: matching stage with PnP jumps, then photometric (+ depth) refinement down an image pyramid.
* ``photometric``: gsloc's losses and pyramid with only the photometric term (L1 + D-SSIM over rendered alpha),
  no matching stage, and the iNeRF-sized budget of :class:`SingleLossBudget`.
* ``depth``: the same with only the depth term (L1 + Sobel edges, GSplatLoc); queries without depth are skipped.
* ``icomma``: :class:`~nerfstudio_gsloc.localize.icomma.IComMaConfig`, iComMa's loss on the shared loop.
* ``pnp``: :class:`~nerfstudio_gsloc.localize.pnp.PnPLocalizerConfig`, structure-based (SIFT + RANSAC PnP).
* ``regression``: :class:`~nerfstudio_gsloc.localize.regression.RegressionLocalizerConfig`, the scene regressor's
  one-shot pose (weights from ``gsloc-train-regressor``), unrefined.

:class:`LocalizerSettings` holds the settings of every method (``--method-settings.*`` of ``gsloc-bench``, the
method options of ``ns-localize``); :meth:`LocalizerSettings.config` gives the config of one method, and every
caller then makes the same call: ``config.setup(model=..., pipeline=..., seed=...).localize(queries, starts)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.icomma import IComMaConfig
from nerfstudio_gsloc.localize.localizer import Localizer, LocalizerConfig
from nerfstudio_gsloc.localize.pipeline import PoseInversion, PoseInversionConfig
from nerfstudio_gsloc.localize.pnp import PnPLocalizerConfig
from nerfstudio_gsloc.localize.regression import RegressionLocalizerConfig
from nerfstudio_gsloc.localize.verification import PoseVerifier, VerificationConfig


@dataclass
class SingleLossBudget:
    """Iterations and learning rates of the single-loss methods (``photometric``, ``depth``).

    Without a matching stage these methods have to walk the whole initial error by gradient steps, so they get
    an iNeRF-sized budget (Adam at 0.01 rad per step at the coarsest level, about 300 steps) instead of the
    short refinement levels that ``gsloc`` runs after its matching stage has already closed the gap.
    """

    pyramid_iterations: Tuple[int, ...] = (100, 100, 100)
    """Maximum iterations per pyramid level (same levels as gsloc's ``schedule.pyramid_scales``)."""
    rotation_lr: float = 2.5e-3
    """Full-resolution rotation learning rate (radians); a level downscaled by ``s`` uses ``s`` times this."""
    translation_lr: float = 2.5e-3
    """Full-resolution translation learning rate (scene units), scaled like ``rotation_lr``."""


def single_loss_config(base: PoseInversionConfig, budget: SingleLossBudget, photometric: bool, depth: bool) -> PoseInversionConfig:
    """``base`` (gsloc's config) with one loss term, no matching stage and the single-loss budget."""
    losses = dataclasses.replace(base.losses, photometric=photometric, matching=False, depth=depth)
    # One budget per level of gsloc's pyramid, finest levels first: a 2-level preset (fast) gets the budget of the
    # default's two finest levels, a deeper pyramid repeats the coarsest budget.
    levels, per_level = len(base.schedule.pyramid_scales), tuple(budget.pyramid_iterations)
    per_level = per_level[max(0, len(per_level) - levels):]
    iterations = (per_level[:1] * (levels - len(per_level))) + per_level
    schedule = dataclasses.replace(base.schedule, pyramid_iterations=iterations)
    # Adam at every level, as the papers these baselines reproduce (gsloc's final level may be Levenberg-Marquardt)
    optim = dataclasses.replace(base.optim, rotation_lr=budget.rotation_lr, translation_lr=budget.translation_lr,
                                final_solver="adam")
    # The iNeRF/GSplatLoc baselines refine from the given start only (no PnP start, no choice of hypotheses, no
    # alignment to the capture's depth images after it).
    alignment = dataclasses.replace(base.depth_alignment, enabled=False)
    return dataclasses.replace(base, losses=losses, schedule=schedule, optim=optim, hypotheses=False,
                               depth_alignment=alignment)


@dataclass
class LocalizerSettings:
    """Settings of every registered method."""

    gsloc: PoseInversionConfig = field(default_factory=PoseInversionConfig)
    """``gsloc``; ``photometric`` and ``depth`` use its losses and pyramid with one loss each and the budget of
    ``single_loss``."""
    single_loss: SingleLossBudget = field(default_factory=SingleLossBudget)
    """Iterations and learning rates of ``photometric`` and ``depth``."""
    icomma: IComMaConfig = field(default_factory=IComMaConfig)
    pnp: PnPLocalizerConfig = field(default_factory=PnPLocalizerConfig)
    regression: RegressionLocalizerConfig = field(default_factory=RegressionLocalizerConfig)
    """``regression`` and ``--init regression``: where the regressor's weights are, how the pose is computed."""
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    """The ground-truth-free check of every method's results (confidence, rejection) against the map matches of
    ``pnp``'s map; gsloc also chooses between its hypotheses with it."""

    def config(self, method: str) -> LocalizerConfig:
        """The config of ``method`` (raises :class:`GslocError` for an unknown name)."""
        check_methods([method])
        if method == "photometric":
            return single_loss_config(self.gsloc, self.single_loss, photometric=True, depth=False)
        if method == "depth":
            return single_loss_config(self.gsloc, self.single_loss, photometric=False, depth=True)
        return getattr(self, method)


#: Registered methods and a one-line description each (for help texts and benchmark reports).
LOCALIZERS: Dict[str, str] = {
    "gsloc": "ns-localize default: SIFT matching + PnP jumps, then photometric/depth pyramid",
    "photometric": "photometric L1 + D-SSIM only down the same pyramid, iNeRF-sized budget (about 300 Adam steps, "
                   "0.01 rad at the coarsest level)",
    "icomma": "iComMa: 0.8 x matching (mean squared keypoint distance, gradient through the render keypoints) + "
              "0.2 x MSE, matching switched off below 1e-3, on the shared loop (one full-resolution stage)",
    "depth": "depth L1 + Sobel edges only (GSplatLoc), same budget as photometric, queries with depth",
    "pnp": "classical: SIFT (2x upsampled) matched to the 10 training images with most matches, 3D points from the "
           "depth rendered at the training poses, RANSAC PnP + Levenberg-Marquardt on tight inliers (no gradient step); "
           "with no prior (global, --init retrieval) the views come from the retrieval index (VLAD shortlist of "
           "training + rendered views, re-ranked by matches)",
    "regression": "scene regressor (gsloc-train-regressor): one CNN forward pass predicting camera- and scene-frame "
                  "points with weights, weighted rigid alignment; unrefined, the start is never read",
}

#: Methods that run on any trained run without further files (``gsloc-bench``'s default); ``regression`` needs
#: ``gsloc-train-regressor`` first.
DEFAULT_METHODS = tuple(name for name in LOCALIZERS if name != "regression")

#: Methods that find their own pose and never read the initial one: with no prior (``global``, ``--init
#: retrieval``) they get no separate initialisation.
SELF_INITIALIZING = ("pnp", "regression")


def check_methods(names: Sequence[str]) -> List[str]:
    """Validate method names (in order, without duplicates).

    Raises:
        GslocError: unknown or no method.
    """
    if not names:
        raise GslocError("no method given (choose from " + ", ".join(LOCALIZERS) + ")")
    out: List[str] = []
    for name in names:
        if name not in LOCALIZERS:
            raise GslocError(f"unknown method {name!r} (choose from {', '.join(LOCALIZERS)})")
        if name not in out:
            out.append(name)
    return out


def check_queries_suit(method: str, config: LocalizerConfig, queries: Sequence[Any], source: Optional[str] = None) -> None:
    """Refuse a run in which ``method`` cannot localize any of ``queries`` (a depth-only method on RGB queries).

    Args:
        method, config: the method and its config.
        queries: the queries (``depth`` ``None`` when a query has none); empty when only ``source`` is known.
        source: instead of ``queries``, a description of a query set known to have no depth at all.

    Raises:
        GslocError: one line naming the method and what the queries lack.
    """
    if not (isinstance(config, PoseInversionConfig) and PoseInversion.depth_only(config)):
        return
    if source is not None:
        lacking = f"{source} has none"
    elif queries and all(getattr(q, "depth", None) is None for q in queries):
        lacking = f"none of the {len(queries)} queries has one"
    else:
        return
    raise GslocError(f"--method {method} needs query depth images (depth_file_path), and {lacking}: use another "
                     "method (gsloc, photometric, icomma, pnp)")


def make_verifier(settings: LocalizerSettings, model: nn.Module, pipeline: Any) -> Optional[PoseVerifier]:
    """The check of results against the map of the run's training views (``None`` without a pipeline or when
    ``settings.verification.enabled`` is off). One verifier can serve several localizers (one map)."""
    if pipeline is None or not settings.verification.enabled:
        return None
    return PoseVerifier(model, pipeline, settings.pnp, settings.verification)


def make_localizer(method: str, settings: LocalizerSettings, model: nn.Module, pipeline: Any = None, seed: int = 0,
                   verifier: Optional[PoseVerifier] = None) -> Localizer:
    """``settings.config(method).setup(model=model, pipeline=pipeline, seed=seed)`` with its verifier (``verifier``,
    else a new one from :func:`make_verifier`; none for coarse methods, whose poses the pixel-level check would
    reject by design)."""
    localizer = settings.config(method).setup(model=model, pipeline=pipeline, seed=seed)
    if getattr(localizer, "coarse", False):
        localizer.verifier = None
    else:
        localizer.verifier = verifier if verifier is not None else make_verifier(settings, model, pipeline)
    return localizer
