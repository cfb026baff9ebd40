"""Shared test set-up: deterministic, single-threaded torch (the suite runs on a 2-core CI machine)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import pytest
import torch

# One intra-op thread: small tensor ops parallelised over two OpenMP threads are slower than one on a busy
# 2-core machine, and results become bitwise repeatable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.fixture(autouse=True)
def _calibration_only_where_marked(request, monkeypatch):
    """gsloc calibrates a run once per settings by localizing 24 of its training photos (the self-test of
    ``localize/calibration.py``). Most tests vary the settings and assert on the refined pose itself, so in-process
    gsloc runs skip it (the refined pose is returned as is) except in tests marked ``calibration``, which test it.
    Subprocess runs pass ``--localization.calibration.no-enabled`` (``cli_helpers.FAST``) for the same reason."""
    if request.node.get_closest_marker("calibration") is None:
        from nerfstudio_gsloc.localize.pipeline import PoseInversion

        monkeypatch.setattr(PoseInversion, "calibrated", lambda self: None)
    yield


def train_small_gsloc_run(data_dir, output_dir, iterations: int = 300, depth_seed_points: Optional[int] = 10_000):
    """Train a gsloc model in-process on a nerfstudio dataset (seeded) and return its ``config.yml`` path.

    Uses the real `ns-train gsloc` configuration with a shortened schedule (what ``ns-train gsloc
    --max-num-iterations N`` runs, with densification compressed to the short run), without the viewer.
    """
    from nerfstudio_gsloc.training import TrainPreset, gsloc_run_config, train

    preset = TrainPreset(iterations=iterations, compress_schedule=True, depth_seed_points=depth_seed_points)
    return train(gsloc_run_config(Path(data_dir), Path(output_dir), preset, "scene", "test", show_progress=False), preset.seed)


@pytest.fixture(scope="session")
def embedded_scene(tmp_path_factory):
    """The embedded procedural scene at a small size: (dataset folder, seed)."""
    from nerfstudio_gsloc.data.procedural_scene import generate_scene

    root = tmp_path_factory.mktemp("embedded_scene")
    generate_scene(root, seed=0, num_views=48, width=80, height=60)
    return root


@pytest.fixture(scope="session")
def small_gsloc_run(embedded_scene, tmp_path_factory):
    """A gsloc model trained briefly (CPU, about a minute) on :func:`embedded_scene`; returns its config.yml."""
    return train_small_gsloc_run(embedded_scene, tmp_path_factory.mktemp("outputs"), iterations=400)


def _write_fake_run(root: Path, data: Path, dataparser_transforms: dict) -> Path:
    """A run folder that passes the pre-load checks (config, checkpoint file, dataset) without a real model.

    Args:
        root: where to write it. data: the dataset folder the config names.
        dataparser_transforms: the ``{"transform": 3x4, "scale": s}`` of its dataparser_transforms.json.

    Returns:
        The run's config.yml.
    """
    import json

    from nerfstudio_gsloc.method import gsloc_trainer_config

    config = gsloc_trainer_config(max_iterations=10)
    config.pipeline.datamanager.data = Path(data)
    config.output_dir = Path(root) / "outputs"
    config.experiment_name = "scene"
    config.timestamp = "fake"
    config.save_config()
    base = config.get_base_dir()
    (base / "nerfstudio_models").mkdir(parents=True)
    (base / "nerfstudio_models" / "step-000000009.ckpt").write_bytes(b"never loaded by these tests")
    (base / "dataparser_transforms.json").write_text(json.dumps(dataparser_transforms))
    return base / "config.yml"


@pytest.fixture(scope="session")
def write_fake_run():
    """:func:`_write_fake_run`, for tests of what the CLIs check before loading a model."""
    return _write_fake_run


class _CountingExtension:
    """The C++ extension, with the name of every kernel called through it recorded in ``calls``."""

    def __init__(self, extension) -> None:
        self.extension, self.calls = extension, []

    def __getattr__(self, name):
        kernel = getattr(self.extension, name)

        def counted(*args):
            self.calls.append(name)
            return kernel(*args)

        return counted


@pytest.fixture
def counting_extension():
    """The C++ extension with its kernel calls recorded (``.calls``), to patch in where a test must see that a
    kernel, not a fallback, did the work; skips where the extension cannot be built."""
    from nerfstudio_gsloc.rendering.extension import load_cpu_extension

    extension = load_cpu_extension()
    if extension is None:
        pytest.skip("the C++ extension could not be built here")
    return _CountingExtension(extension)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written into: ``chattr +i`` when running as root (root ignores permissions),
    otherwise mode 0o555. Restored afterwards so pytest can clean up."""
    import os
    import shutil
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root on a file system without chattr +i: no way to make a read-only folder here")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
