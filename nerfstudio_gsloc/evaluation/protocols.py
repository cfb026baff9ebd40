"""Benchmark protocols: how the initial poses of localization trials are drawn from the ground truth.

A protocol (a YAML preset in ``configs/protocols/``) describes one random perturbation per trial:

* rotation: an angle about a uniformly random axis through the camera centre, either drawn uniformly from a
  range (``mode: uniform``, e.g. iNeRF's [-40, 40] degrees; a negative angle is the same as the positive one
  about the opposite axis, so the initial rotation error is ``|angle|``) or taken from a list of angles
  (``mode: sweep``, ``trials`` per angle);
* translation of the camera centre in world axes: uniform per axis (``uniform_per_axis``, iNeRF), a fixed length
  along a random direction (``fixed_length``), or a length drawn uniformly from a range (``uniform_length``).
  With ``reference: camera_distance`` the numbers are multiples of the scene's camera-distance scale
  (:func:`camera_distance_scale`), with ``reference: scene`` plain scene units.

A protocol with ``initial_pose: none`` (``global``) draws nothing: each query gets one trial whose initial pose is
all NaN and never read; the benchmark starts every method from retrieval + PnP instead (the ``pnp`` method runs
its ``retrieval`` selection), as ``ns-localize --init retrieval`` does.

A protocol with ``initial_pose: sequence`` (``sequence``) tracks the queries as one sequence in their order: only the
first frame's start is drawn (trial 0 of query 0, as above); every later frame starts from the frame before
(:mod:`nerfstudio_gsloc.localize.sequence`, ``gsloc-bench`` reports trajectory metrics).

Seeding: the perturbation of trial ``t`` of query ``q`` is drawn from its own CPU generator seeded from
``(protocol seed, q.index, t)`` (:func:`trial_seed`), so every method of a benchmark starts from exactly the same
initial poses, and so does every later run, whatever the order, batching or subset of queries.

Shapes: poses are OpenGL camera-to-world ``[3, 4]`` in the scene (dataparser) frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.pose import perturb_pose
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.presets import available_presets, read_preset
from nerfstudio_gsloc.localize.queries import Query

RotationMode = Literal["uniform", "sweep"]
TranslationMode = Literal["uniform_per_axis", "fixed_length", "uniform_length"]
TranslationReference = Literal["camera_distance", "scene"]
InitialPoseMode = Literal["perturb", "none", "sequence"]

@dataclass
class RotationSpec:
    """How the initial rotation error of a trial is drawn."""

    mode: RotationMode = "uniform"
    """``uniform``: angle ~ U[range_deg]; ``sweep``: each angle of ``angles_deg`` in turn."""
    range_deg: Tuple[float, float] = (-40.0, 40.0)
    """``uniform`` only: low and high angle in degrees."""
    angles_deg: Tuple[float, ...] = ()
    """``sweep`` only: the angles in degrees (``trials`` trials each)."""


@dataclass
class TranslationSpec:
    """How the initial translation error of a trial is drawn."""

    mode: TranslationMode = "uniform_per_axis"
    """``uniform_per_axis``: each world axis ~ U[range]; ``fixed_length``: ``length`` along a random direction;
    ``uniform_length``: a length ~ U[range] along a random direction."""
    range: Tuple[float, float] = (-0.1, 0.1)
    """``uniform_per_axis`` / ``uniform_length``: low and high value."""
    length: float = 0.0
    """``fixed_length`` only."""
    reference: TranslationReference = "camera_distance"
    """``camera_distance``: values are multiples of the camera-distance scale; ``scene``: scene units."""


@dataclass
class Protocol:
    """A benchmark protocol (see the module docstring)."""

    name: str
    description: str = ""
    rotation: RotationSpec = field(default_factory=RotationSpec)
    translation: TranslationSpec = field(default_factory=TranslationSpec)
    trials: int = 5
    """Trials per query (``sweep``: per query and angle)."""
    seed: int = 0
    """Base seed of the trials' generators."""
    initial_pose: InitialPoseMode = "perturb"
    """``perturb``: the ground truth perturbed as above; ``none``: no prior at all (one trial per query, the methods
    start from retrieval; rotation and translation are not used); ``sequence``: the queries are one sequence, only the
    first frame starts from a perturbed ground truth (one trial per query)."""

    @property
    def is_sequence(self) -> bool:
        """True for a tracking protocol (``initial_pose: sequence``)."""
        return self.initial_pose == "sequence"

    @property
    def has_prior(self) -> bool:
        """False for a protocol without initial poses (``initial_pose: none``)."""
        return self.initial_pose != "none"

    @property
    def trials_per_query(self) -> int:
        """Number of trials drawn for each query."""
        if not self.has_prior or self.is_sequence:
            return 1
        if self.rotation.mode == "sweep":
            return self.trials * len(self.rotation.angles_deg)
        return self.trials

    def translation_factor(self, camera_scale: float) -> float:
        """Scene units per protocol translation unit."""
        return float(camera_scale) if self.translation.reference == "camera_distance" else 1.0

    def summary(self, camera_scale: float) -> str:
        """One line describing the perturbations in scene units."""
        if not self.has_prior:
            return f"{self.name}: no prior (initial poses from retrieval + PnP; the ground truth is never read), seed {self.seed}"
        rot, tr = self.rotation, self.translation
        factor = self.translation_factor(camera_scale)
        if rot.mode == "sweep":
            rot_text = "rotation " + ", ".join(f"{a:g}" for a in rot.angles_deg) + f" deg ({self.trials} trials each)"
        else:
            rot_text = f"rotation U[{rot.range_deg[0]:g}, {rot.range_deg[1]:g}] deg"
        if tr.mode == "uniform_per_axis":
            tr_text = f"translation U[{tr.range[0] * factor:.4g}, {tr.range[1] * factor:.4g}] per axis"
        elif tr.mode == "fixed_length":
            tr_text = f"translation length {tr.length * factor:.4g}"
        else:
            tr_text = f"translation length U[{tr.range[0] * factor:.4g}, {tr.range[1] * factor:.4g}]"
        ref = f" (x camera distance {camera_scale:.4g})" if tr.reference == "camera_distance" else ""
        return f"{self.name}: {rot_text} about a random axis, {tr_text} scene units{ref}, seed {self.seed}"

    def validate(self) -> None:
        """Raise :class:`GslocError` for inconsistent settings."""
        rot, tr = self.rotation, self.translation
        where = f"protocol {self.name!r}"
        if self.initial_pose not in ("perturb", "none", "sequence"):
            raise GslocError(f"{where}: initial_pose must be perturb, none or sequence, got {self.initial_pose!r}")
        if self.trials < 1:
            raise GslocError(f"{where}: trials must be >= 1, got {self.trials}")
        if rot.mode == "uniform":
            if len(rot.range_deg) != 2 or rot.range_deg[0] > rot.range_deg[1]:
                raise GslocError(f"{where}: rotation.range_deg must be [low, high] with low <= high")
            if max(abs(a) for a in rot.range_deg) > 180.0:
                raise GslocError(f"{where}: rotation angles must lie in [-180, 180] degrees")
        elif rot.mode == "sweep":
            if not rot.angles_deg or any(not 0.0 <= a <= 180.0 for a in rot.angles_deg):
                raise GslocError(f"{where}: rotation.angles_deg must list angles in [0, 180] degrees")
        else:
            raise GslocError(f"{where}: unknown rotation.mode {rot.mode!r} (uniform or sweep)")
        if tr.mode in ("uniform_per_axis", "uniform_length"):
            if len(tr.range) != 2 or tr.range[0] > tr.range[1]:
                raise GslocError(f"{where}: translation.range must be [low, high] with low <= high")
            if tr.mode == "uniform_length" and tr.range[0] < 0:
                raise GslocError(f"{where}: translation lengths must be >= 0")
        elif tr.mode == "fixed_length":
            if tr.length < 0:
                raise GslocError(f"{where}: translation.length must be >= 0")
        else:
            raise GslocError(f"{where}: unknown translation.mode {tr.mode!r}")
        if tr.reference not in ("camera_distance", "scene"):
            raise GslocError(f"{where}: translation.reference must be camera_distance or scene")

    def to_dict(self) -> Dict[str, Any]:
        """Plain-data form (for the results' metadata)."""
        return {
            "name": self.name,
            "description": self.description,
            "rotation": {"mode": self.rotation.mode, "range_deg": list(self.rotation.range_deg),
                         "angles_deg": list(self.rotation.angles_deg)},
            "translation": {"mode": self.translation.mode, "range": list(self.translation.range),
                            "length": self.translation.length, "reference": self.translation.reference},
            "trials": self.trials,
            "seed": self.seed,
            "initial_pose": self.initial_pose,
        }


def available_protocols() -> List[str]:
    """Names of the shipped protocol presets (``configs/protocols``)."""
    return available_presets("protocols")


def _pair(value: Any, key: str, where: str) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise GslocError(f"{where}: {key} must be a list of two numbers") from None
    return low, high


def protocol_from_dict(data: Dict[str, Any], where: str = "protocol") -> Protocol:
    """Build and validate a :class:`Protocol` from parsed YAML.

    Raises:
        GslocError: missing or malformed fields (one line naming the field).
    """
    if not isinstance(data, dict) or "name" not in data:
        raise GslocError(f"{where}: expected a mapping with at least a 'name'")
    known = {"name", "description", "rotation", "translation", "trials", "seed", "initial_pose"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GslocError(f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    rot_data = data.get("rotation") or {}
    tr_data = data.get("translation") or {}
    if not isinstance(rot_data, dict) or not isinstance(tr_data, dict):
        raise GslocError(f"{where}: rotation and translation must be mappings")
    rotation = RotationSpec(mode=str(rot_data.get("mode", "uniform")))  # type: ignore[arg-type]
    if "range_deg" in rot_data:
        rotation.range_deg = _pair(rot_data["range_deg"], "rotation.range_deg", where)
    if "angles_deg" in rot_data:
        try:
            rotation.angles_deg = tuple(float(a) for a in rot_data["angles_deg"])
        except (TypeError, ValueError):
            raise GslocError(f"{where}: rotation.angles_deg must be a list of numbers") from None
    translation = TranslationSpec(
        mode=str(tr_data.get("mode", "uniform_per_axis")),  # type: ignore[arg-type]
        reference=str(tr_data.get("reference", "camera_distance")),  # type: ignore[arg-type]
    )
    if "range" in tr_data:
        translation.range = _pair(tr_data["range"], "translation.range", where)
    if "length" in tr_data:
        try:
            translation.length = float(tr_data["length"])
        except (TypeError, ValueError):
            raise GslocError(f"{where}: translation.length must be a number") from None
    try:
        trials, seed = int(data.get("trials", 5)), int(data.get("seed", 0))
    except (TypeError, ValueError):
        raise GslocError(f"{where}: trials and seed must be integers") from None
    protocol = Protocol(str(data["name"]), str(data.get("description", "")), rotation, translation, trials, seed,
                        str(data.get("initial_pose", "perturb")))  # type: ignore[arg-type]
    protocol.validate()
    return protocol


def load_protocol(name_or_path: str, trials: Optional[int] = None, seed: Optional[int] = None) -> Protocol:
    """Load a preset by name (``inerf``, ``icomma-sweep``, ``tracking``) or a protocol YAML by path.

    Args:
        name_or_path: preset name of ``configs/protocols`` or a path to a ``.yaml`` file.
        trials: overrides the protocol's trial count when given.
        seed: overrides the protocol's seed when given.

    Raises:
        GslocError: unknown preset, unreadable or invalid file.
    """
    data, name = read_preset("protocols", name_or_path)
    protocol = protocol_from_dict(data, where=f"protocol {name}")
    if trials is not None:
        protocol.trials = int(trials)
    if seed is not None:
        protocol.seed = int(seed)
    protocol.validate()
    return protocol


def camera_distance_scale(train_c2w: Tensor) -> float:
    """The scene's camera-distance scale: median distance of the training camera centres to the scene origin.

    nerfstudio's dataparsers centre the scene on the origin (blender scenes are built around it; the
    nerfstudio dataparser re-centres the poses), so this is how far the cameras typically are from what they
    look at, in scene units. Protocol translations with ``reference: camera_distance`` are multiples of it.

    Args:
        train_c2w: ``[N, 3|4, 4]`` training camera-to-world poses, scene frame.

    Returns:
        the median distance (positive float).
    """
    if train_c2w.ndim != 3 or train_c2w.shape[0] == 0:
        raise GslocError("cannot compute the camera-distance scale without training cameras")
    dist = torch.linalg.norm(train_c2w[:, :3, 3].double(), dim=-1)
    scale = float(torch.quantile(dist, 0.5))
    if not math.isfinite(scale) or scale <= 0:
        raise GslocError("training cameras all sit at the scene origin; cannot define a camera-distance scale")
    return scale


def translate_pose(c2w: Tensor, offset: Tensor) -> Tensor:
    """Move camera centres by world-axis offsets, keeping the orientation (same as ``PoseCorrection``'s translation).

    Args:
        c2w: ``[B, 3|4, 4]`` OpenGL camera-to-world poses.
        offset: ``[B, 3]`` offsets in world axes (scene units).

    Returns:
        ``[B, 3, 4]`` moved poses.
    """
    pose = to_homogeneous(c2w)[:, :3, :]
    return torch.cat([pose[:, :, :3], pose[:, :, 3:] + offset.to(pose)[:, :, None]], dim=-1)


def trial_seed(base_seed: int, query_index: int, trial: int) -> int:
    """63-bit seed of trial ``trial`` of query ``query_index`` (independent streams via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(query_index), int(trial)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) & 0x7FFFFFFF) << 32 | int(state[1])


@dataclass
class Trial:
    """One localization attempt: a query and the initial pose every method starts from.

    Attributes:
        query: position of the query in the benchmark's query list.
        query_index: ``Query.index`` (what the seed is derived from).
        trial: trial number of this query.
        seed: the generator seed of the perturbation (:func:`trial_seed`).
        c2w_init: ``[3, 4]`` float32 initial pose (scene frame).
        init_rot_deg: rotation error of ``c2w_init`` against the ground truth (degrees).
        init_trans: translation error of ``c2w_init`` (scene units).
        nominal_angle_deg: the drawn angle ``|angle|`` (equals ``init_rot_deg`` up to rounding; the sweep's
            angle for ``sweep`` protocols).
    """

    query: int
    query_index: int
    trial: int
    seed: int
    c2w_init: Tensor
    init_rot_deg: float
    init_trans: float
    nominal_angle_deg: float


def draw_perturbation(protocol: Protocol, trial: int, generator: torch.Generator, camera_scale: float) -> Tuple[float, Tensor]:
    """Draw the rotation angle and the translation offset of one trial.

    Args:
        protocol: the protocol.
        trial: trial number (selects the sweep angle).
        generator: the trial's CPU generator.
        camera_scale: camera-distance scale of the scene.

    Returns:
        ``(angle_deg >= 0, offset [3] float64 scene units)``.
    """
    rot, tr = protocol.rotation, protocol.translation
    if rot.mode == "sweep":
        angle = float(rot.angles_deg[trial // protocol.trials])
    else:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        angle = abs(rot.range_deg[0] + (rot.range_deg[1] - rot.range_deg[0]) * u)
    factor = protocol.translation_factor(camera_scale)
    if tr.mode == "uniform_per_axis":
        u3 = torch.rand(3, generator=generator, dtype=torch.float64)
        offset = (tr.range[0] + (tr.range[1] - tr.range[0]) * u3) * factor
    else:
        if tr.mode == "fixed_length":
            length = tr.length
        else:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            length = tr.range[0] + (tr.range[1] - tr.range[0]) * u
        direction = torch.randn(3, generator=generator, dtype=torch.float64)
        direction = direction / torch.linalg.norm(direction).clamp_min(1e-12)
        offset = direction * length * factor
    return angle, offset


def generate_trials(protocol: Protocol, queries: Sequence[Query], camera_scale: float) -> List[Trial]:
    """The trials of a benchmark: ``protocol.trials_per_query`` seeded initial poses per query.

    The rotation is applied by :func:`~nerfstudio_gsloc.localize.pose.perturb_pose` (exact angle about a random
    axis through the camera centre), then the centre is moved by the drawn offset (:func:`translate_pose`).

    Args:
        protocol: the protocol.
        queries: queries with ground truth (``gt_c2w``).
        camera_scale: camera-distance scale (:func:`camera_distance_scale`).

    Returns:
        trials ordered by query, then trial number.

    Raises:
        GslocError: a query has no ground-truth pose.
    """
    missing = [q.name for q in queries if q.gt_c2w is None]
    if missing:
        raise GslocError(f"benchmark queries need ground-truth poses (transform_matrix); missing for {missing[0]}")
    trials: List[Trial] = []
    for position, query in enumerate(queries):
        assert query.gt_c2w is not None
        if not protocol.has_prior:
            # Nothing is drawn and nothing derived from the ground truth: the start is "no pose" (NaN), its errors
            # infinite (the failure convention of the metrics).
            trials.append(Trial(position, query.index, 0, trial_seed(protocol.seed, query.index, 0),
                                torch.full((3, 4), math.nan), math.inf, math.inf, 0.0))
            continue
        gt = query.gt_c2w[None, :3, :4].double()
        for t in range(protocol.trials_per_query):
            seed = trial_seed(protocol.seed, query.index, t)
            generator = torch.Generator().manual_seed(seed)
            angle, offset = draw_perturbation(protocol, t, generator, camera_scale)
            # perturb_pose draws its random axis (and a direction for its zero-length translation) next.
            rotated = perturb_pose(gt, angle, 0.0, generator)
            c2w = translate_pose(rotated, offset[None])
            trials.append(
                Trial(
                    query=position,
                    query_index=query.index,
                    trial=t,
                    seed=seed,
                    c2w_init=c2w[0].float(),
                    init_rot_deg=float(rotation_error_deg(c2w, gt)[0]),
                    init_trans=float(translation_error(c2w, gt)[0]),
                    nominal_angle_deg=angle,
                )
            )
    return trials
