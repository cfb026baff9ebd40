"""Named presets: one loader for the three kinds shipped in ``configs/``.

* ``localize``: ``ns-localize --preset NAME`` (fields of ``PoseInversionConfig``),
* ``protocols``: ``gsloc-bench --protocol NAME`` (benchmark perturbation protocols),
* ``train``: ``gsloc-bench --train-preset NAME`` (fields of ``TrainPreset``).

Where the presets are: ``configs/`` stays at the top of the repository and is also installed as package data of
``nerfstudio_gsloc`` (``pyproject.toml``/``setup.py`` map it to ``nerfstudio_gsloc/configs``). From a source
checkout (the package folder sits beside ``pyproject.toml`` and ``configs/``, e.g. an editable install or
``PYTHONPATH``) the repository's ``configs/`` is read, so edits show at once; otherwise the installed copy, through
``importlib.resources``.

A preset is a YAML (or JSON) mapping; ``--preset path/to/file.yaml`` reads a file instead of a name.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Literal, Tuple, TypeVar, Union

import yaml

from nerfstudio_gsloc.errors import GslocError

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

PresetKind = Literal["localize", "protocols", "train"]
PRESET_KINDS: Tuple[str, ...] = ("localize", "protocols", "train")
#: How messages name each kind (``--preset``, ``--protocol``, ``--train-preset``).
_LABELS = {"localize": "preset", "protocols": "protocol", "train": "training preset"}
_SUFFIXES = (".yaml", ".yml", ".json")
T = TypeVar("T")


def configs_root() -> Traversable:
    """The folder holding ``localize/``, ``protocols/`` and ``train/`` (see the module docstring for which one)."""
    repository = Path(__file__).resolve().parent.parent
    if (repository / "pyproject.toml").is_file() and (repository / "configs").is_dir():
        return repository / "configs"
    return resources.files("nerfstudio_gsloc") / "configs"


def preset_dir(kind: PresetKind) -> Traversable:
    """The folder of one kind of preset."""
    if kind not in PRESET_KINDS:
        raise ValueError(f"unknown preset kind {kind!r} (one of {', '.join(PRESET_KINDS)})")
    return configs_root() / kind


def available_presets(kind: PresetKind) -> List[str]:
    """Names of the shipped presets of ``kind``, sorted."""
    folder = preset_dir(kind)
    if not folder.is_dir():
        return []
    return sorted(Path(p.name).stem for p in folder.iterdir() if Path(p.name).suffix in _SUFFIXES)


def resolve_preset(kind: PresetKind, name_or_path: Union[str, Path]) -> Traversable:
    """A preset file from a shipped name or a path to a ``.yaml``/``.yml``/``.json`` file.

    Raises:
        GslocError: neither a shipped name nor an existing file (the message lists the names).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in _SUFFIXES:
        raise GslocError(f"{_LABELS[kind]} file not found: {path}")
    folder = preset_dir(kind)
    for suffix in _SUFFIXES:
        candidate = folder / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    names = ", ".join(available_presets(kind)) or "none found"
    raise GslocError(f"unknown {_LABELS[kind]} {str(name_or_path)!r} (a file path or one of: {names})")


def read_preset(kind: PresetKind, name_or_path: Union[str, Path]) -> Tuple[Dict[str, Any], str]:
    """The mapping stored in a preset, and the preset file's name (for messages).

    Raises:
        GslocError: unknown preset, unreadable file, or not a mapping.
    """
    source = resolve_preset(kind, name_or_path)
    try:
        text = source.read_text(encoding="utf-8")
        values = json.loads(text) if source.name.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise GslocError(f"cannot read {_LABELS[kind]} {source.name}: {type(err).__name__}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise GslocError(f"{_LABELS[kind]} {source.name} must be a mapping, got {type(values).__name__}")
    return values, source.name


def apply_settings(instance: T, values: Dict[str, Any], where: str) -> T:
    """A copy of the dataclass ``instance`` with ``values`` replacing its fields (nested dicts for nested configs).

    Values are coerced to the field's current type where YAML is looser (lists -> tuples, ints -> floats,
    strings -> paths for ``Path`` fields and ``*_path`` fields); fields starting with ``_`` cannot be set.

    Raises:
        GslocError: an unknown key, a non-mapping, or a non-boolean for a boolean field.
    """
    if not isinstance(values, dict):
        raise GslocError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(instance) if not f.name.startswith("_")}  # type: ignore[arg-type]
    updates = {}
    for key, value in values.items():
        if key not in fields:
            raise GslocError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            updates[key] = apply_settings(current, value, f"{where}.{key}")
        elif isinstance(current, tuple):
            updates[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif isinstance(current, Path) or (key.endswith("_path") and value is not None):
            updates[key] = None if value is None else Path(value)
        elif isinstance(current, bool) and not isinstance(value, bool):
            raise GslocError(f"{where}.{key} must be true or false, got {value!r}")
        elif isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            updates[key] = float(value)
        else:
            updates[key] = value
    return dataclasses.replace(instance, **updates)  # type: ignore[type-var]


def load_dataclass_preset(kind: PresetKind, name_or_path: Union[str, Path], base: T) -> T:
    """``base`` with the preset's values applied (:func:`apply_settings`). Raises :class:`GslocError`."""
    values, name = read_preset(kind, name_or_path)
    return apply_settings(base, values, f"{_LABELS[kind]} {name}")
