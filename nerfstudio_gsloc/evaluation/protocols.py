"""Benchmark protocols: how the initial poses of localization trials are drawn from the ground truth.

A protocol (a YAML preset in ``configs/protocols/``) describes one random perturbation per trial:

* rotation: an angle about a uniformly random axis through the camera centre, either drawn uniformly from a
  range (``mode: uniform``, e.g. iNeRF's [-40, 40] degrees; a negative angle is the same as the positive one
  about the opposite axis, so the initial rotation error is ``|angle|``) or taken from a list of angles
  (``mode: sweep``, ``trials`` per angle);
* translation of the camera centre in world axes: uniform per axis (``uniform_per_axis``, iNeRF), a fixed length
  along a random direction (``fixed_length``), or a length drawn uniformly from a range (``uniform_length``).
  With ``reference: camera_distance`` the numbers are multiples of the scene's camera-distance scale
  (:func:`~nerfstudio_gsloc.evaluation.trials.camera_distance_scale`), with ``reference: scene`` plain scene units.

A protocol with ``initial_pose: none`` (``global``) draws nothing: each query gets one trial whose initial pose is
all NaN and never read; the benchmark starts every method from retrieval + PnP instead (the ``pnp`` method runs
its ``retrieval`` selection), as ``ns-localize --init retrieval`` does.

A protocol with ``initial_pose: sequence`` (``sequence``) tracks the queries as one sequence in their order: only the
first frame's start is drawn (trial 0 of query 0, as above); every later frame starts from the frame before
(:mod:`nerfstudio_gsloc.localize.sequence`, ``gsloc-bench`` reports trajectory metrics).

The trials themselves (the seeded draws, the initial poses) are made by :mod:`nerfstudio_gsloc.evaluation.trials`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.presets import available_presets, read_preset

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
