"""ns-train gsloc checks its training images before training, names every bad file, and leaves no run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerfstudio_gsloc.data.validation import check_images
from nerfstudio_gsloc.errors import GslocError


def _damage(dataset: Path):
    """Truncate one training image and resize another; returns their paths."""
    meta = json.loads((dataset / "transforms.json").read_text())
    train = meta["train_filenames"]
    truncated, resized = dataset / train[1], dataset / train[3]
    truncated.write_bytes(truncated.read_bytes()[:200])
    with Image.open(resized) as image:
        image.resize((image.width + 4, image.height)).save(resized)
    return truncated, resized, meta


@pytest.fixture
def damaged_scene(tmp_path):
    from nerfstudio_gsloc.data.procedural_scene import generate_scene

    dataset = tmp_path / "scene"
    generate_scene(dataset, seed=0, num_views=10, width=32, height=24, show_progress=False)
    return (dataset, *_damage(dataset))


def test_check_images_names_every_bad_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])  # header intact, pixel data cut short
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    check_images([good], [(8, 6)])
    with pytest.raises(GslocError) as info:
        check_images([good, truncated, text, tmp_path / "gone.png", good], [(8, 6)] * 4 + [(8, 7)])
    message = str(info.value)
    assert "\n" not in message and message.startswith("4 of 5 training images cannot be used: ")
    assert f"{truncated} (cannot be decoded" in message and f"{text} (not an image)" in message
    assert f"{tmp_path / 'gone.png'} (missing)" in message and f"{good} (8x6 pixels, but its camera says 8x7)" in message


@pytest.mark.parametrize("with_depth", [True, False])
def test_training_stops_before_it_starts_and_removes_the_run_folder(damaged_scene, tmp_path, with_depth):
    from nerfstudio_gsloc.training import TrainPreset, gsloc_run_config, train

    dataset, truncated, resized, meta = damaged_scene
    if not with_depth:  # the other path: triangulated seeding, images first decoded by the datamanager
        for frame in meta["frames"]:
            frame.pop("depth_file_path", None)
        (dataset / "transforms.json").write_text(json.dumps(meta))
    out = tmp_path / "outputs"
    config = gsloc_run_config(dataset, out, TrainPreset(iterations=5), "scene", "t", show_progress=False)
    with pytest.raises(GslocError) as info:
        train(config)
    message = str(info.value)
    assert message.startswith(f"2 of {len(meta['train_filenames'])} training images cannot be used: ")
    assert f"{truncated} (cannot be decoded" in message and f"{resized} (36x24 pixels, but its camera says 32x24)" in message
    assert not (out / "scene").exists()  # no config.yml without a checkpoint left behind
