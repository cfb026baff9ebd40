"""Settings of ``gsloc-train-regressor``: :class:`RegressorTrainConfig` (data, network input, schedule, loss weights,
augmentation, ensemble size, arithmetic) and the key that ties saved weights to them.

The defaults depend on the CPU: :func:`cpu_has_native_bfloat16` decides the arithmetic (``precision="auto"``), and
the arithmetic (with :func:`cpu_has_avx512` for ``plain`` networks) the number of networks (``members=None``).
Every field but ``max_minutes`` changes the weights and so enters :meth:`RegressorTrainConfig.key`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.regressor import Architecture


def cpu_has_native_bfloat16() -> bool:
    """True when this CPU computes bfloat16 convolutions natively (AVX512-BF16 or AMX), where they run much
    faster than float32 ones; elsewhere oneDNN emulates them, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_has_avx512() -> bool:
    """True when torch's CPU kernels run AVX-512 here: twice the float32 width of AVX2, so about twice the
    convolution throughput per core (the network's float32 convolutions run at the FMA units' peak)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@dataclass
class RegressorTrainConfig:
    """Settings of ``gsloc-train-regressor`` (every field but ``max_minutes`` keys the saved weights)."""

    input_size: int = 128
    """Long side of the network input (rounded to a multiple of 8); the short side keeps the aspect ratio."""
    channels: Tuple[int, int, int] = (32, 64, 128)
    """Network channels at strides 2, 4, 8."""
    architecture: Architecture = "compact"
    """Network body (:class:`~nerfstudio_gsloc.localize.regressor.SceneRegressorNet`): ``compact`` does half the
    arithmetic of ``plain`` per image; a training step took 0.26 s against 0.47 s on an AVX2 CPU, so 1.8x the steps
    fit in ``max_minutes``."""
    steps: int = 3000
    """Optimisation steps (fewer when ``max_minutes`` runs out first)."""
    max_minutes: float = 14.0
    """Wall-clock budget of the whole training, rendering included; the learning rate decays over whichever of
    ``steps`` and this budget ends first."""
    batch_size: int = 12
    real_fraction: float = 0.4
    """Share of each batch drawn from the real training photos (the rest from rendered views)."""
    rendered_views: int = 1500
    """Views rendered around the training cameras before training."""
    orbit_deg: float = 25.0
    distance_range: Tuple[float, float] = (0.8, 1.25)
    roll_deg: float = 20.0
    """Rendered poses: orbit angle ``U[1/3, 1] x orbit_deg``, distance factor, roll (see ``jittered_poses``)."""
    between_fraction: float = 0.0
    """Share of the rendered views placed *between* neighbouring training cameras instead (``between_poses``:
    the capture's own distance and roll), the rest jittered as above."""
    between_neighbours: int = 4
    between_overshoot: float = 0.25
    """``between_poses``: partner among this many nearest cameras, interpolation ``U[-x, 1 + x]``."""
    learning_rate: float = 2e-3
    """Adam's rate, cosine-decayed to 5% of it."""
    pose_weight: float = 10.0
    pose_warmup: float = 0.15
    """The pose loss is off for this fraction of training, then ramps linearly to ``pose_weight`` over as long.
    On lego-200, weight 10 from 15% gave 78% within (10 deg, 0.1) against 70% for weight 4 from 25%; weight 20
    from 10% gave 78% too, with worse medians and point losses."""
    consistency_weight: float = 0.5
    reprojection_weight: float = 0.5
    weight_loss_weight: float = 0.2
    alpha_threshold: float = 0.5
    """Grid cells with rendered opacity above this are valid (have a point) ..."""
    background_tolerance: float = 0.03
    """... unless they render within this of the model's background colour in every channel (0: off)."""
    brightness: float = 0.2
    contrast: float = 0.2
    channel_gain: float = 0.08
    noise: float = 0.02
    """Photometric augmentation: factors ``1 +- U[0, x]`` and Gaussian noise of this standard deviation."""
    seed: int = 0
    """Member ``m`` of an ensemble draws its rendered views, initial weights, batches and augmentation with seed
    ``seed + m``."""
    members: Optional[int] = None
    """Networks trained side by side, each on its own rendered views (an ensemble, one thread group each, so on 2
    cores two members take the wall-clock time of one); inference aligns all their point pairs together. More
    networks only help while each still gets (nearly) its ``steps`` within ``max_minutes``. On lego-200 (within
    (10 deg, 0.1), trainings of 13-14 min on 2 cores), ``plain`` networks: on an AVX-512 CPU two float32 members
    gave 76-82% in three trainings where single networks measured 64-78%, three bfloat16 members 80% and 82%; on
    an AVX2 CPU, where a float32 step takes about twice as long, two members got 1,478 steps each and 54%, one
    network 2,741 steps and 74%. ``compact`` networks on an AVX2 CPU: two members 2,828 steps each and 84%
    (one ``plain`` network on that machine: 2,218 steps, 68%). Default: 3 where the training runs in bfloat16
    (``precision``), else 2 (``plain``: 2 on AVX-512 CPUs, where three float32 members get two thirds of the steps
    each, 62%, and 1 on narrower ones)."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the network body in training. ``bfloat16``: its convolutions under autocast (the heads, the
    losses and the alignment stay float32), about 1.5x faster per training step on CPUs with native bfloat16
    (AVX512-BF16 or AMX: 0.147 s against 0.226 s on this project's machine), emulated and slower on others; ``auto``: bfloat16 where the CPU has it, else float32. Inference is
    float32 either way."""

    def body_dtype(self) -> torch.dtype:
        """The dtype ``precision`` resolves to on this machine."""
        if self.precision == "auto":
            return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
        return torch.bfloat16 if self.precision == "bfloat16" else torch.float32

    def member_count(self) -> int:
        """The number of networks ``members`` resolves to on this machine."""
        if self.members is None:
            if self.body_dtype() == torch.bfloat16:
                return 3
            return 2 if cpu_has_avx512() or self.architecture == "compact" else 1
        return self.members

    def key(self) -> str:
        """Hash of the settings that change the weights (``max_minutes`` excluded; ``members`` only when above 1,
        the precision only when it resolves to bfloat16 and the architecture only when not ``plain``, so that
        weights trained before those options existed keep their key)."""
        data = dataclasses.asdict(self)
        data.pop("max_minutes")
        data["members"] = self.member_count()
        if data["members"] == 1:
            data.pop("members")
        if data["architecture"] == "plain":
            data.pop("architecture")
        data.pop("precision")
        if self.body_dtype() == torch.bfloat16:
            data["precision"] = "bfloat16"
        return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

def member_configs(config: RegressorTrainConfig) -> List[RegressorTrainConfig]:
    """The settings of each network of ``config``'s ensemble: member ``m`` draws its rendered views, initial
    weights, batches and augmentation with seed ``config.seed + m``."""
    count = config.member_count()
    if count < 1:
        raise GslocError(f"--training.members must be at least 1, got {count}")
    return [dataclasses.replace(config, seed=config.seed + m, members=1) for m in range(count)]
