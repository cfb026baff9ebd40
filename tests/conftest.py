"""Shared test set-up: deterministic, single-threaded torch (the suite runs on a 2-core CI machine)."""

from __future__ import annotations

import warnings

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


def train_small_gsloc_run(data_dir, output_dir, iterations: int = 300):
    """Train a gsloc model in-process on a nerfstudio dataset and return its ``config.yml`` path.

    Uses the real `ns-train gsloc` configuration with a shortened schedule (what ``ns-train gsloc
    --max-num-iterations N`` runs), without the viewer.
    """
    from pathlib import Path

    from nerfstudio_gsloc.method import gsloc_trainer_config

    config = gsloc_trainer_config(max_iterations=iterations)
    config.pipeline.datamanager.data = Path(data_dir)
    config.output_dir = Path(output_dir)
    config.experiment_name = "scene"
    config.timestamp = "test"
    config.vis = "tensorboard"
    config.steps_per_eval_image = 1_000_000
    config.steps_per_save = iterations
    config.save_only_latest_checkpoint = True
    config.logging.local_writer.enable = False
    config.pipeline.model.warmup_length = iterations // 5
    config.pipeline.model.refine_every = max(iterations // 10, 10)
    config.pipeline.model.sh_degree_interval = iterations // 4
    config.pipeline.datamanager.dataparser.depth_seed_points = 10_000
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return config.get_base_dir() / "config.yml"


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
