"""The ``regression`` localizer and the ``regression`` initial poses: the scene regressor's one-shot pose.

``ns-localize --method regression`` (and ``gsloc-bench --methods regression``) returns the network's pose as it
is, unrefined; ``ns-localize --init regression`` starts any other method from it
(:func:`regression_initial_poses`). Both read the weights that ``gsloc-train-regressor`` wrote beside the run
(:mod:`nerfstudio_gsloc.localize.regressor`); without them they stop with one error line naming that command.

Confidence: the alignment's own (:func:`~nerfstudio_gsloc.localize.rigid_alignment.alignment_confidence`: the share
of the network's weight on point pairs that agree with the pose, times their weight mass). The map-support check
of the other methods (:mod:`~nerfstudio_gsloc.localize.verification`) judges poses to a pixel or two and would
reject every coarse pose, so it is not applied to this localizer's results (:attr:`RegressionLocalizer.coarse`);
a refinement started from them is checked as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Type

import torch
from torch import Tensor, nn

from nerfstudio_gsloc.localize.initialization import InitialPose
from nerfstudio_gsloc.localize.live import PosesCallback
from nerfstudio_gsloc.localize.localizer import Localizer, LocalizerConfig, StepCallback
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.regressor import RegressorInference, SceneRegressor
from nerfstudio_gsloc.localize.regressor_files import load_run_regressor
from nerfstudio_gsloc.localize.result import STATUS_CONVERGED, STATUS_REJECTED, LocalizationResult
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


@dataclass
class RegressionLocalizerConfig(LocalizerConfig):
    """Settings of the ``regression`` localizer (and of ``--init regression``)."""

    _target: Type = field(default_factory=lambda: RegressionLocalizer)

    folder: Optional[Path] = None
    """Folder of ``regressor.pt`` / ``regressor.json`` (default: ``<run>/gsloc_regressor``)."""
    inference: RegressorInference = field(default_factory=RegressorInference)
    """How the pose is computed from the network's outputs (robust alignment, confidence)."""
    threshold: float = 0.0
    """Results whose alignment confidence is below this are ``rejected`` (0: never)."""


class RegressionLocalizer(Localizer):
    """One forward pass and a weighted rigid alignment per query; the initial pose is never read.

    Args:
        config, model, pipeline, seed: see :class:`~nerfstudio_gsloc.localize.localizer.Localizer`.
        regressor: use this trained regressor instead of loading the run's.

    Raises:
        GslocError: the run has no (or stale) regressor weights.
    """

    #: Coarse poses: the pixel-level map-support check does not apply (see the module docstring).
    coarse = True

    def __init__(self, config: RegressionLocalizerConfig, model: nn.Module, pipeline: Any = None, seed: int = 0,
                 regressor: Optional[SceneRegressor] = None) -> None:
        super().__init__(config, model, pipeline, seed)
        self.regressor = regressor if regressor is not None else load_run_regressor(pipeline, config.folder,
                                                                                    config.inference)
        self.notes["regressor_training_seconds"] = self.regressor.meta.get("training_seconds")

    def _localize(self, queries: Sequence[Query], initial_c2w: Sequence[Tensor],
                  on_result: Callable[[int, LocalizationResult], None], on_step: StepCallback,
                  on_poses: PosesCallback = None) -> None:
        for k, (query, start) in enumerate(zip(queries, initial_c2w)):
            on_result(k, regression_result(self.regressor, query, start[:3, :4].float().cpu(), self.config.threshold))
            if on_step is not None:
                on_step(len(queries) - k - 1)


def regression_result(regressor: SceneRegressor, query: Query, start: Tensor, threshold: float = 0.0) -> LocalizationResult:
    """The regressor's pose of ``query`` as a :class:`LocalizationResult` (``start [3, 4]`` kept as the initial pose)."""
    prediction = regressor.predict(query.image, query.K)
    status, reason = STATUS_CONVERGED, f"regression: alignment confidence {prediction.confidence:.2f}"
    if prediction.confidence < threshold:
        status, reason = STATUS_REJECTED, f"rejected: {reason} < {threshold:g}"
    rot = trans = None
    if query.gt_c2w is not None:
        gt = query.gt_c2w[None, :3, :4].double()
        rot = float(rotation_error_deg(prediction.c2w[None].double(), gt)[0])
        trans = float(translation_error(prediction.c2w[None].double(), gt)[0])
    return LocalizationResult(name=query.name, index=query.index, c2w=prediction.c2w, c2w_init=start, status=status,
                              reason=reason, seconds=prediction.seconds, inliers=int((prediction.weights > 0.5).sum()),
                              confidence=prediction.confidence, rot_err_deg=rot, trans_err=trans)


def regression_initial_poses(queries: Sequence[Query], regressor: SceneRegressor) -> List[InitialPose]:
    """Initial poses from the regressor (no prior is read): one :class:`InitialPose` per query, source
    ``regression``, its forward-pass time charged to the query."""
    out: List[InitialPose] = []
    with torch.no_grad():
        for query in queries:
            prediction = regressor.predict(query.image, query.K)
            out.append(InitialPose(prediction.c2w, "regression",
                                   f"regression: alignment confidence {prediction.confidence:.2f}", prediction.seconds))
    return out
