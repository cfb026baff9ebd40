"""Loading a trained run (gsloc or splatfacto) through nerfstudio's own ``eval_setup``, with clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from nerfstudio_gsloc import compat
from nerfstudio_gsloc.errors import GslocError

SUPPORTED_METHODS = ("gsloc", "splatfacto", "splatfacto-big", "splatfacto-w-light")


def read_run_config(config_path: Path) -> Any:
    """The nerfstudio ``TrainerConfig`` stored in a run's ``config.yml`` (the one reader of that file).

    nerfstudio writes the config with ``yaml.dump`` of its dataclasses, which only the full (unsafe) loader can
    rebuild, as nerfstudio's own ``eval_setup`` does: load only configs you trust.

    Raises:
        GslocError: the file is missing or does not parse.
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise GslocError(f"config not found: {config_path} (pass the config.yml that ns-train wrote)")
    try:
        return yaml.load(config_path.read_text(), Loader=yaml.Loader)
    except Exception as err:  # yaml raises many types
        raise GslocError(f"cannot read {config_path} as a nerfstudio config: {type(err).__name__}") from None


def check_run(config_path: Path) -> Path:
    """Validate a run before loading it: the config parses, names a supported method, has checkpoints.

    Returns:
        The checkpoint directory. Raises :class:`GslocError` with a one-line reason otherwise.
    """
    config_path = Path(config_path)
    config = read_run_config(config_path)
    method = getattr(config, "method_name", None)
    if method is None or not hasattr(config, "pipeline"):
        raise GslocError(f"{config_path} is not a nerfstudio training config")
    if method not in SUPPORTED_METHODS:
        raise GslocError(f"{config_path} is a {method!r} run; localization needs a Gaussian-splatting run ({', '.join(SUPPORTED_METHODS)})")
    checkpoint_dir = config_path.parent / config.relative_model_dir
    if not checkpoint_dir.is_dir() or not any(p.suffix == ".ckpt" for p in checkpoint_dir.iterdir()):
        raise GslocError(f"no checkpoint (*.ckpt) in {checkpoint_dir}")
    data = Path(config.pipeline.datamanager.data or config.pipeline.datamanager.dataparser.data)
    if not data.exists():
        raise GslocError(
            f"the run's dataset {data} is not found from {Path.cwd()} (relative paths in config.yml are relative to "
            "where ns-train ran)"
        )
    return checkpoint_dir


def load_run(config_path: Path, test_mode: Literal["test", "val", "inference"] = "test"):
    """Load a trained run for localization.

    Args:
        config_path: the ``config.yml`` of a gsloc (or splatfacto) run.
        test_mode: nerfstudio's ``eval_setup`` mode; "test" also loads the eval split (the default queries).

    Returns:
        ``(config, pipeline)``: nerfstudio's ``TrainerConfig`` and the loaded pipeline in eval mode; the pipeline
        carries ``gsloc_run_dir`` (the folder of ``config.yml``) and ``gsloc_checkpoint`` (the loaded ``.ckpt``).

    Raises:
        GslocError: a one-line reason for anything that stops the run from loading.
    """
    from nerfstudio.utils.eval_utils import eval_setup

    config_path = Path(config_path)
    checkpoint_dir = check_run(config_path)
    compat.allow_nerfstudio_checkpoints()

    def use_checkpoints_beside_config(config):
        # eval_setup looks for checkpoints under output_dir relative to the current directory; point it at
        # the folder of this config instead so a run can be loaded from anywhere.
        config.output_dir = config_path.resolve().parents[3]
        config.experiment_name = config_path.resolve().parents[2].name
        config.timestamp = config_path.resolve().parent.name
        return config

    try:
        with warnings.catch_warnings():
            # Loading to localize never computes LPIPS: the model's note that it would be skipped is noise here.
            warnings.filterwarnings("ignore", message="gsloc: LPIPS skipped", category=UserWarning)
            config, pipeline, checkpoint_path, _ = eval_setup(config_path, test_mode=test_mode,
                                                update_config_callback=use_checkpoints_beside_config)
    except SystemExit as err:  # eval_setup exits when the checkpoint folder is missing
        raise GslocError(f"could not load a checkpoint from {checkpoint_dir}") from err
    except GslocError:
        raise
    except Exception as err:  # a corrupt checkpoint or config: still one line for the user, no traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise GslocError(f"could not load the run {config_path}: {type(err).__name__} {first}".strip()) from None
    if not hasattr(pipeline.model, "means"):
        raise GslocError(f"{config_path}: the model has no Gaussians to render")
    # Where caches derived from this checkpoint live (the retrieval index, localize/retrieval.py), and what they
    # are keyed on.
    pipeline.gsloc_run_dir = config_path.resolve().parent
    pipeline.gsloc_checkpoint = Path(checkpoint_path).resolve()
    return config, pipeline


def eval_split_has_depth(config_path: Path) -> Optional[bool]:
    """Whether the run's dataset lists depth images (``depth_file_path``), read from its transforms.json without
    loading the run; ``None`` when that cannot be told (another dataset format, an unreadable file)."""
    try:
        data = Path(read_run_config(config_path).pipeline.datamanager.data)
        meta = json.loads((data if data.is_file() else data / "transforms.json").read_text())
        frames = meta["frames"]
    except (GslocError, AttributeError, OSError, ValueError, KeyError, TypeError):
        return None
    return any("depth_file_path" in frame for frame in frames) or "depth_file_path" in meta
