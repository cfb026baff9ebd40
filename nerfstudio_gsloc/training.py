"""Training a gsloc run from Python: named training presets (``configs/train/*.yaml``) and an in-process trainer.

This is what ``ns-train gsloc --data DATA --max-num-iterations N ...`` does, callable from other tools
(``gsloc-bench --data DATA --train-preset quick`` trains before benchmarking) and from the tests. A finished
run is reused rather than trained again: a run counts as finished when its final checkpoint exists.

A preset is a YAML mapping of :class:`TrainPreset` fields, e.g. ``configs/train/quick.yaml``::

    iterations: 2000
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Union

import numpy as np
import torch
import yaml

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.presets import available_presets, load_dataclass_preset
from nerfstudio_gsloc.runs import read_run_config

@dataclass
class TrainPreset:
    """A training schedule of ``ns-train gsloc`` (the fields a user most often changes)."""

    iterations: int = 7000
    """Training steps; the learning-rate decay and the end of densification (half way) follow it."""
    background: Literal["auto", "white", "black", "random"] = "auto"
    """Background colour the model is trained against. ``auto``: white for Blender-format (RGBA) scenes,
    whose transparent pixels otherwise grow floaters under splatfacto's random background; for other datasets
    without alpha whose training images share a uniform white or black border (a masked object capture), that
    colour (:mod:`nerfstudio_gsloc.data.background`; the choice is printed); otherwise the method's default."""
    compress_schedule: bool = False
    """Scale densification warm-up, refinement interval and SH-degree schedule down with ``iterations``
    (for runs of a few hundred steps, e.g. tests); the method's defaults are tuned for thousands."""
    depth_seed_points: Optional[int] = None
    """Gaussians seeded from back-projected depth for RGB-D datasets (``None``: the dataparser's default)."""
    seed: int = 0
    """Seed of torch, numpy and random before training (Gaussian initialisation, image order)."""


def available_train_presets() -> List[str]:
    """Names of the shipped training presets (``configs/train``)."""
    return available_presets("train")


def load_train_preset(name_or_path: Union[str, Path]) -> TrainPreset:
    """A :class:`TrainPreset` from a preset name of ``configs/train`` or a YAML/JSON file. Raises :class:`GslocError`."""
    preset = load_dataclass_preset("train", name_or_path, TrainPreset())
    if preset.iterations < 1:
        raise GslocError(f"training preset {name_or_path}: iterations must be at least 1")
    return preset


def dataset_format(data: Path) -> Literal["blender", "nerfstudio"]:
    """``blender`` for a NeRF-synthetic folder (``transforms_train.json``), ``nerfstudio`` for ``transforms.json``.

    Raises:
        GslocError: the folder does not exist or is neither.
    """
    data = Path(data)
    if not data.is_dir():
        raise GslocError(f"dataset folder not found: {data}")
    if (data / "transforms.json").is_file():
        return "nerfstudio"
    if (data / "transforms_train.json").is_file():
        return "blender"
    raise GslocError(f"{data} has neither transforms.json (nerfstudio format) nor transforms_train.json (Blender format)")


def resolve_background(data: Path, background: str, default: str) -> Tuple[str, Optional[str]]:
    """The background a preset's ``background`` means on ``data``, and a line saying why when ``auto`` chose it.

    Returns:
        ``(background, note)``: ``note`` is ``None`` unless ``auto`` looked at the images.
    """
    if background != "auto":
        return background, None
    if dataset_format(data) == "blender":
        return "white", None
    from nerfstudio_gsloc.data.background import detect_border_background, nerfstudio_training_images

    try:
        found = detect_border_background(nerfstudio_training_images(data))
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable dataset is reported when training starts
        found = None
    if found is None:
        return default, None
    if found.name is None:
        return default, f"gsloc: {found.describe()}, neither white nor black: training with the {default} background"
    return found.name, f"gsloc: {found.describe()}: training against a {found.name} background (background: auto)"


def gsloc_run_config(data: Path, output_dir: Path, preset: TrainPreset, experiment_name: str, timestamp: str,
                     show_progress: bool = True):
    """The ``TrainerConfig`` of ``ns-train gsloc`` on ``data`` with ``preset``'s schedule, without the viewer.

    The run is written to ``output_dir/experiment_name/gsloc/timestamp/`` (config.yml, nerfstudio_models/);
    ``show_progress`` prints nerfstudio's step / time / ETA table while it trains.
    """
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    from nerfstudio_gsloc.method import gsloc_trainer_config

    iterations = preset.iterations
    config = gsloc_trainer_config(max_iterations=iterations)
    if dataset_format(data) == "blender":
        config.pipeline.datamanager.dataparser = BlenderDataParserConfig()
    config.pipeline.datamanager.data = Path(data)
    config.output_dir = Path(output_dir)
    config.experiment_name = experiment_name
    config.timestamp = timestamp
    config.vis = "tensorboard"
    config.steps_per_eval_image = 1_000_000
    config.steps_per_save = iterations
    config.save_only_latest_checkpoint = True
    config.logging.local_writer.enable = show_progress
    model = config.pipeline.model
    background, note = resolve_background(data, preset.background, model.background_color)
    if note:
        from nerfstudio.utils.rich_utils import CONSOLE

        CONSOLE.log(note)
    model.background_color = background
    if preset.compress_schedule:
        model.warmup_length = iterations // 5
        model.refine_every = max(iterations // 10, 10)
        model.sh_degree_interval = iterations // 4
    if preset.depth_seed_points is not None and hasattr(config.pipeline.datamanager.dataparser, "depth_seed_points"):
        config.pipeline.datamanager.dataparser.depth_seed_points = preset.depth_seed_points
    return config


def final_checkpoint(config) -> Path:
    """Where the last checkpoint of a run with this config is saved (nerfstudio saves the final step)."""
    return config.get_checkpoint_dir() / f"step-{config.max_num_iterations - 1:09d}.ckpt"


def train(config, seed: int = 0) -> Path:
    """Train ``config`` in this process and return its ``config.yml``."""
    # Seed everything nerfstudio draws from, so a run does not depend on what ran before it.
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return config.get_base_dir() / "config.yml"


def train_or_reuse(data: Path, output_dir: Path, preset: TrainPreset, experiment_name: Optional[str] = None,
                   timestamp: str = "preset") -> Path:
    """Train ``preset`` on ``data`` into ``output_dir``, or reuse that run if it finished with the same settings.

    A run is reused when its final checkpoint exists and its ``config.yml`` has the same data, model, optimiser
    and schedule settings as this call's; anything else (another preset, an interrupted run) trains again into
    the same folder.

    Returns:
        The run's ``config.yml``.
    """
    config = gsloc_run_config(data, output_dir, preset, experiment_name or Path(data).resolve().name, timestamp)
    config_path = config.get_base_dir() / "config.yml"
    if final_checkpoint(config).is_file() and config_path.is_file():
        try:
            previous = read_run_config(config_path)
        except GslocError:  # an unreadable config is a run to redo, not an error
            previous = None
        if previous is not None and _training_signature(previous) == _training_signature(config):
            return config_path
    return train(config, preset.seed)


def _training_signature(config) -> str:
    """What determines the trained model: data, model, optimisers and schedule (not logging or paths of logs)."""
    return yaml.dump(
        {
            "data": str(config.pipeline.datamanager.data),
            "pipeline": config.pipeline,
            "optimizers": config.optimizers,
            "iterations": config.max_num_iterations,
        }
    )
