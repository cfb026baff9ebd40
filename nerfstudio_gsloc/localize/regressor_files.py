"""The regressor's files beside a run: ``<run_dir>/gsloc_regressor/`` (:data:`REGRESSOR_FOLDER`).

``regressor.pt`` holds each network's config and state dict (:func:`save_regressor`); ``regressor.json`` the
checkpoint the networks were trained for (path, size, modification time), the training settings and their key,
time and losses. :func:`load_regressor` checks both against the loaded run and names ``gsloc-train-regressor`` in
every error.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_output, atomic_write_text
from nerfstudio_gsloc.localize.regressor import RegressorInference, RegressorNetConfig, SceneRegressor, SceneRegressorNet
from nerfstudio_gsloc.localize.retrieval import checkpoint_fingerprint

REGRESSOR_FOLDER = "gsloc_regressor"
WEIGHTS_FILE = "regressor.pt"
META_FILE = "regressor.json"
#: Bumped when the saved layout or the network changes; weights of a format not in READABLE_FORMATS are retrained.
REGRESSOR_FORMAT = 3
#: 1: one network (``net``, ``state``); 2: a list of ``members``, each ``{net, state}``; 3: as 2, the network
#: config with its ``architecture``.
READABLE_FORMATS = (1, 2, 3)
#: ``regressor.json``'s ``training_views`` since 2026-12-07: the photos were undistorted before training. Weights
#: without it may have been trained on a capture's raw (distorted) photos with pinhole intrinsics (the map's views
#: before that fix), so on a capture with lens distortion they are retrained.
UNDISTORTED_VIEWS = "undistorted"


def regressor_dir(run_dir: Path) -> Path:
    """Where a run's regressor lives: ``<run_dir>/gsloc_regressor``."""
    return Path(run_dir) / REGRESSOR_FOLDER


def train_command(config_path: Optional[Path]) -> str:
    """The command that trains the regressor of a run (for messages)."""
    return f"gsloc-train-regressor --load-config {config_path if config_path is not None else 'RUN/config.yml'}"


def save_regressor(folder: Path, nets: Union[SceneRegressorNet, Sequence[SceneRegressorNet]], meta: Dict[str, Any]) -> None:
    """Write ``regressor.pt`` (every network's config and weights) and ``regressor.json`` atomically (the json
    last: it marks a complete pair)."""
    folder = Path(folder)
    nets = [nets] if isinstance(nets, nn.Module) else list(nets)
    members = [{"net": asdict(net.config), "state": net.state_dict()} for net in nets]
    with atomic_output(folder / WEIGHTS_FILE) as tmp:
        torch.save({"format": REGRESSOR_FORMAT, "members": members}, tmp)
    write_meta(folder, {"format": REGRESSOR_FORMAT, **meta})


def write_meta(folder: Path, meta: Dict[str, Any]) -> None:
    """Write ``regressor.json`` atomically (``meta`` as given, its ``format`` that of the weights beside it)."""
    atomic_write_text(Path(folder) / META_FILE, json.dumps(meta, indent=2) + "\n")


def read_meta(folder: Path) -> Optional[Dict[str, Any]]:
    """``regressor.json`` of ``folder`` (``None`` when missing or unreadable)."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_up_to_date(folder: Path, checkpoint: Optional[Path], settings_key: Optional[str] = None,
                  lens_distortion: bool = False) -> bool:
    """True when ``folder`` holds weights trained for ``checkpoint`` as it is now (path, size, modification
    time), usable for a run with or without ``lens_distortion`` (:func:`unusable_reason`) and, when given, with the
    settings of ``settings_key``."""
    if unusable_reason(folder, checkpoint, lens_distortion=lens_distortion) is not None:
        return False
    return settings_key is None or (read_meta(folder) or {}).get("settings_key") == settings_key


def unusable_reason(folder: Path, checkpoint: Optional[Path], config_path: Optional[Path] = None,
                    lens_distortion: bool = False) -> Optional[str]:
    """Why the weights in ``folder`` cannot serve ``checkpoint`` (when given): none, another format, another
    checkpoint, or (``lens_distortion``: the run's photos have a lens) trained on undistorted photos not recorded
    (:data:`UNDISTORTED_VIEWS`); the message names the command to run. ``None`` when they can."""
    folder, command = Path(folder), train_command(config_path)
    meta = read_meta(folder)
    if meta is None or not (folder / WEIGHTS_FILE).is_file():
        return f"no regressor weights in {folder}: train them first with `{command}`"
    if meta.get("format") not in READABLE_FORMATS:
        return f"the regressor in {folder} was written by another version: retrain it with `{command}`"
    if lens_distortion and meta.get("training_views") != UNDISTORTED_VIEWS:
        return (f"the regressor in {folder} may have been trained on this capture's distorted photos (an earlier "
                f"version): retrain it with `{command}`")
    if checkpoint is not None and meta.get("checkpoint") != checkpoint_fingerprint(Path(checkpoint)):
        return (f"the regressor in {folder} was trained for another checkpoint than {checkpoint}: "
                f"retrain it with `{command}`")
    return None


def check_regressor_files(folder: Path, config_path: Optional[Path] = None) -> None:
    """Raise :class:`GslocError` (naming ``gsloc-train-regressor``) when ``folder`` holds no complete regressor;
    for the checks before a run is loaded (the checkpoint it was trained for is checked when loading)."""
    meta = read_meta(folder)
    if meta is None or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise GslocError(f"no regressor weights in {folder}: train them first with `{train_command(config_path)}`")


def load_regressor(folder: Path, checkpoint: Optional[Path] = None, config_path: Optional[Path] = None,
                   inference: Optional[RegressorInference] = None, lens_distortion: bool = False) -> SceneRegressor:
    """Load the regressor of ``folder``, checking that it was trained for ``checkpoint`` (when given) and, on a run
    with ``lens_distortion``, on undistorted photos.

    Raises:
        GslocError: no weights (run ``gsloc-train-regressor``), unreadable weights, or weights trained for another
            checkpoint or on distorted photos; the message names the command to run.
    """
    folder = Path(folder)
    command = train_command(config_path)
    reason = unusable_reason(folder, checkpoint, config_path, lens_distortion)
    if reason is not None:
        raise GslocError(reason)
    meta = read_meta(folder) or {}
    try:
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        nets = []
        for member in state.get("members", [state]):  # format 1 held one network at the top level
            net_config = RegressorNetConfig(**{**member["net"], "channels": tuple(member["net"]["channels"]),
                                               "center": tuple(member["net"]["center"])})
            nets.append(SceneRegressorNet(net_config))
            nets[-1].load_state_dict(member["state"])
        regressor = SceneRegressor(nets, meta, inference)
    except Exception as err:  # a truncated or foreign file
        raise GslocError(f"cannot read {folder / WEIGHTS_FILE} ({type(err).__name__}): retrain it with `{command}`") from None
    return regressor


def run_regressor_folder(run_dir: Optional[Path], folder: Optional[Path] = None) -> Path:
    """``folder`` when given, else the run's ``<run_dir>/gsloc_regressor``."""
    if folder is not None:
        return Path(folder)
    if run_dir is None:
        raise GslocError("the regressor needs a weights folder (no run folder to look beside)")
    return regressor_dir(run_dir)


def check_run_regressor(config_path: Path, folder: Optional[Path] = None) -> None:
    """Before loading the run of ``config_path``: one error naming ``gsloc-train-regressor`` when there are no
    weights (in ``folder``, default beside the run)."""
    check_regressor_files(run_regressor_folder(Path(config_path).parent, folder), config_path)


def load_run_regressor(pipeline: Any, folder: Optional[Path] = None,
                       inference: Optional[RegressorInference] = None) -> SceneRegressor:
    """The regressor of a loaded run (``gsloc_run_dir`` and ``gsloc_checkpoint`` from
    :func:`~nerfstudio_gsloc.runs.load_run`), from ``folder`` when given; checked against the loaded checkpoint."""
    from nerfstudio_gsloc.localize.scene_map import training_photos_have_lens_distortion

    run_dir = getattr(pipeline, "gsloc_run_dir", None)
    config_path = None if run_dir is None else Path(run_dir) / "config.yml"
    return load_regressor(run_regressor_folder(run_dir, folder), getattr(pipeline, "gsloc_checkpoint", None),
                          config_path, inference, training_photos_have_lens_distortion(pipeline))
