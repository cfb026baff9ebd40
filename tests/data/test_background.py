"""Background detection for captures without alpha (masked object captures on white or black)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nerfstudio_gsloc.data.background import detect_border_background
from nerfstudio_gsloc.training import TrainPreset, gsloc_run_config, resolve_background


def _capture(folder, border, num=6, size=(40, 30), mode="RGB"):
    """``num`` images of a noisy object in the middle on a uniform ``border`` colour, as a nerfstudio dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    frames = []
    for i in range(num):
        image = np.zeros((size[1], size[0], len(mode)), np.uint8)
        image[...] = border
        image[8:22, 10:30, :3] = rng.integers(0, 255, (14, 20, 3))
        if mode == "RGBA":
            image[8:22, 10:30, 3] = 255
        name = f"images/{i:03d}.png"
        (folder / "images").mkdir(exist_ok=True)
        Image.fromarray(image, mode).save(folder / name)
        frames.append({"file_path": name, "transform_matrix": np.eye(4).tolist()})
    meta = {"fl_x": 30.0, "fl_y": 30.0, "cx": size[0] / 2, "cy": size[1] / 2, "w": size[0], "h": size[1], "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("border, expected", [((255, 255, 255), "white"), ((3, 2, 0), "black"), ((250, 247, 252), "white")])
def test_uniform_white_or_black_borders_are_detected(tmp_path, border, expected):
    data = _capture(tmp_path / "cap", border)
    found = detect_border_background(sorted((data / "images").glob("*.png")))
    assert found is not None and found.name == expected and found.fraction == 1.0
    background, note = resolve_background(data, "auto", "random")
    assert background == expected and note.endswith(f"training against a {expected} background (background: auto)")
    config = gsloc_run_config(data, tmp_path / "out", TrainPreset(iterations=10), "cap", "t", show_progress=False)
    assert config.pipeline.model.background_color == expected


def test_no_detection_for_scenes_alpha_or_other_colours(tmp_path, embedded_scene):
    # A textured room: its borders are not one colour; the method's default stays, silently.
    assert resolve_background(embedded_scene, "auto", "random") == ("random", None)
    # RGBA images: nerfstudio composites them against the model's background already.
    rgba = _capture(tmp_path / "rgba", (0, 0, 0, 0), mode="RGBA")
    assert detect_border_background(sorted((rgba / "images").glob("*.png"))) is None
    # A uniform grey border: splatfacto trains only against white, black or random; said, not used.
    grey = _capture(tmp_path / "grey", (128, 128, 128))
    background, note = resolve_background(grey, "auto", "random")
    assert background == "random" and "(128, 128, 128)" in note and "neither white nor black" in note
    # One image whose border is mostly another colour: not a shared background.
    mixed = _capture(tmp_path / "mixed", (255, 255, 255))
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(mixed / "images" / "002.png")
    assert resolve_background(mixed, "auto", "random") == ("random", None)
    # An explicit preset background is used as given, without looking at the images.
    assert resolve_background(mixed, "black", "random") == ("black", None)
