"""Presets: one loader for configs/{localize,protocols,train}, and the presets of a non-editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple

import pytest

from nerfstudio_gsloc import presets
from nerfstudio_gsloc.errors import GslocError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Inner:
    rate: float = 1.0
    scales: Tuple[int, ...] = (4, 2, 1)


@dataclass
class _Outer:
    name: str = "x"
    enabled: bool = True
    weights_path: Path = None  # type: ignore[assignment]
    inner: _Inner = field(default_factory=_Inner)


def test_every_kind_lists_and_reads_the_repository_presets():
    # From a source checkout the repository's configs/ is read (edits show without reinstalling).
    assert Path(str(presets.configs_root())) == REPO / "configs"
    expected = {"localize": {"default", "fast", "rgbd"}, "protocols": {"inerf", "icomma-sweep", "tracking"},
                "train": {"default", "quick", "tiny"}}
    for kind, names in expected.items():
        assert names <= set(presets.available_presets(kind)), kind
        for name in names:
            values, file_name = presets.read_preset(kind, name)
            assert isinstance(values, dict) and values and file_name.startswith(name)
    assert presets.read_preset("train", "quick")[0] == {"iterations": 2000}
    with pytest.raises(ValueError):
        presets.preset_dir("models")  # type: ignore[arg-type]


def test_files_and_errors(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("inner:\n  rate: 2\n  scales: [1]\nweights_path: w.ckpt\n")
    loaded = presets.load_dataclass_preset("localize", mine, _Outer())
    assert loaded.inner.rate == 2.0 and isinstance(loaded.inner.rate, float) and loaded.inner.scales == (1,)
    assert loaded.weights_path == Path("w.ckpt") and loaded.name == "x"
    (tmp_path / "mine.json").write_text('{"name": "y"}')
    assert presets.load_dataclass_preset("train", tmp_path / "mine.json", _Outer()).name == "y"
    cases = [
        ("inner:\n  speed: 1\n", "unknown setting 'speed'"),
        ("enabled: 1\n", "enabled must be true or false"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("a: [\n", "cannot read preset mine.yaml"),
    ]
    for text, message in cases:
        mine.write_text(text)
        with pytest.raises(GslocError, match=message):
            presets.load_dataclass_preset("localize", mine, _Outer())
    with pytest.raises(GslocError, match=r"unknown protocol 'nope' \(a file path or one of: global, icomma-sweep, inerf"):
        presets.read_preset("protocols", "nope")
    with pytest.raises(GslocError, match="training preset file not found"):
        presets.read_preset("train", tmp_path / "missing.yaml")


def test_presets_ship_with_a_non_editable_install(tmp_path):
    """`pip install --target` (a wheel built and unpacked, no network) finds the presets inside the package."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("nerfstudio_gsloc", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    shutil.rmtree(source)  # nothing may be read from the sources any more
    assert sorted(p.name for p in (target / "nerfstudio_gsloc" / "configs").iterdir()) == ["localize", "protocols", "train"]
    script = (
        "import nerfstudio_gsloc, sys\n"
        "from pathlib import Path\n"
        "from nerfstudio_gsloc import presets\n"
        "from nerfstudio_gsloc.evaluation.protocols import load_protocol\n"
        "from nerfstudio_gsloc.training import load_train_preset\n"
        "print(Path(nerfstudio_gsloc.__file__).resolve().parent)\n"
        "print(Path(str(presets.configs_root())).resolve())\n"
        "from nerfstudio_gsloc.localize.pipeline import load_preset\n"
        "print(load_protocol('inerf').trials, load_train_preset('quick').iterations, load_preset('fast').optim.batch_size)\n"
        "from nerfstudio_gsloc.scripts.localize import main\n"
        "main(['--preset', 'fast', '--help'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = done.stdout.splitlines()
    assert lines[0] == str((target / "nerfstudio_gsloc").resolve()), done.stderr[-2000:]
    assert lines[1] == str((target / "nerfstudio_gsloc" / "configs").resolve())
    assert lines[2] == "5 2000 8"
    # ns-localize --preset fast --help: main() reads the preset before tyro prints the help (a missing preset
    # would end in a GslocError, exit code 1).
    assert done.returncode == 0 and "--localization.optim.batch-size" in done.stdout, done.stderr[-2000:]
