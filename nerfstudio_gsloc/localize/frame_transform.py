"""The run's dataparser frame: how poses in a dataset's original frame map to the scene frame of a trained run.

nerfstudio's dataparser moves the dataset's cameras into the **scene** frame with the ``transform`` ``[3, 4]``
and ``scale`` it writes to the run's ``dataparser_transforms.json``; for datasets whose transforms.json carries an
``applied_transform`` ``[3, 4]`` (or legacy colmap datasets), the original frame is the one *before* that
transform, so it is folded in here. The result is a :class:`~nerfstudio_gsloc.camera_conventions.FrameTransform`
(``to_scene`` / ``to_original`` of OpenGL camera-to-world poses; depth times ``scale``), used by
:mod:`~nerfstudio_gsloc.localize.queries` for query files and by the scripts for their outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform, rigid_inverse, to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.runs import read_run_config

# nerfstudio's value of applied_transform for colmap datasets written before the key existed.
_LEGACY_COLMAP_APPLIED = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]


def dataset_applied_transform(data_path: Optional[Path]) -> Optional[Tensor]:
    """The ``applied_transform`` ``[3, 4]`` that nerfstudio's dataparser folds into ``dataparser_transforms.json``.

    Mirrors nerfstudio's nerfstudio-dataparser: the key of the dataset's transforms.json, or the legacy colmap
    value when ``colmap/sparse/0`` exists; ``None`` otherwise (e.g. blender datasets).

    Args:
        data_path: the dataparser's ``data`` (a folder or a transforms.json file).
    """
    if data_path is None:
        return None
    data_path = Path(data_path)
    meta_path = data_path if data_path.suffix == ".json" else data_path / "transforms.json"
    folder = data_path.parent if data_path.suffix == ".json" else data_path
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and "applied_transform" in meta:
        return torch.tensor(meta["applied_transform"], dtype=torch.float64)[:3]
    if (folder / "colmap" / "sparse" / "0").exists():
        return torch.tensor(_LEGACY_COLMAP_APPLIED, dtype=torch.float64)
    return None


def load_frame_transform(
    dataparser_transforms_path: Optional[Path],
    data_path: Optional[Path] = None,
    fallback: Optional[FrameTransform] = None,
) -> FrameTransform:
    """Read a run's ``dataparser_transforms.json`` (composed with the dataset's ``applied_transform``).

    Args:
        dataparser_transforms_path: the run's ``dataparser_transforms.json``.
        data_path: the dataset (to look up ``applied_transform``); ``None`` skips that.
        fallback: used when the file does not exist (e.g. the pipeline's in-memory dataparser outputs).

    Raises:
        GslocError: the file is missing (and no fallback) or malformed.
    """
    if dataparser_transforms_path is None or not Path(dataparser_transforms_path).is_file():
        if fallback is None:
            raise GslocError(f"dataparser transforms not found: {dataparser_transforms_path}")
        frame = fallback
    else:
        try:
            meta = json.loads(Path(dataparser_transforms_path).read_text())
            transform = torch.tensor(meta["transform"], dtype=torch.float64)[:3]
            scale = float(meta["scale"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GslocError(f"cannot read {dataparser_transforms_path}: {err}") from None
        if transform.shape != (3, 4) or not math.isfinite(scale) or scale <= 0:
            raise GslocError(f"malformed {dataparser_transforms_path}: need a 3x4 transform and a positive scale")
        frame = FrameTransform(transform, scale, str(dataparser_transforms_path))
    applied = dataset_applied_transform(data_path)
    if applied is not None:
        composed = to_homogeneous(frame.transform.double()) @ rigid_inverse(applied)
        frame = FrameTransform(composed[:3], frame.scale, f"{frame.source} + inverse applied_transform of {data_path}")
    return frame


def run_frame_transform(config_path: Path) -> FrameTransform:
    """Original <-> scene frame of a trained run: its ``dataparser_transforms.json`` (beside ``config.yml``)
    composed with its dataset's ``applied_transform``. Raises :class:`GslocError` as :func:`load_frame_transform`."""
    config = read_run_config(config_path)
    datamanager = config.pipeline.datamanager
    data = datamanager.data or getattr(datamanager.dataparser, "data", None)
    return load_frame_transform(Path(config_path).parent / "dataparser_transforms.json", data)
