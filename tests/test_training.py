"""Training presets and the in-process trainer's run configuration (no training here; see test_bench for a run)."""

from __future__ import annotations

import json

import pytest

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.training import (
    TrainPreset,
    available_train_presets,
    dataset_format,
    final_checkpoint,
    gsloc_run_config,
    load_train_preset,
)


def test_shipped_presets_load():
    assert {"tiny", "quick", "default"} <= set(available_train_presets())
    assert load_train_preset("quick").iterations == 2000
    assert load_train_preset("default").iterations == 7000
    tiny = load_train_preset("tiny")
    assert tiny.compress_schedule and tiny.iterations < 1000


def test_bad_presets_are_one_line_errors(tmp_path):
    with pytest.raises(GslocError, match="unknown training preset .nope."):
        load_train_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("iteration: 10\n")
    with pytest.raises(GslocError, match="unknown setting 'iteration'"):
        load_train_preset(bad)
    bad.write_text("iterations: 0\n")
    with pytest.raises(GslocError, match="at least 1"):
        load_train_preset(bad)


def test_dataset_format_and_background(tmp_path):
    blender = tmp_path / "blender"
    blender.mkdir()
    (blender / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": []}))
    nerfstudio = tmp_path / "ns"
    nerfstudio.mkdir()
    (nerfstudio / "transforms.json").write_text("{}")
    assert dataset_format(blender) == "blender" and dataset_format(nerfstudio) == "nerfstudio"
    with pytest.raises(GslocError, match="neither"):
        dataset_format(tmp_path)

    # RGBA Blender scenes train against white; nerfstudio datasets keep the method's default; presets override.
    config = gsloc_run_config(blender, tmp_path / "out", TrainPreset(iterations=50), "lego", "t")
    assert config.pipeline.model.background_color == "white"
    assert type(config.pipeline.datamanager.dataparser).__name__ == "BlenderDataParserConfig"
    config = gsloc_run_config(nerfstudio, tmp_path / "out", TrainPreset(iterations=50, background="black"), "room", "t")
    assert config.pipeline.model.background_color == "black"
    assert config.pipeline.model.stop_split_at == 25 and config.max_num_iterations == 50
    assert final_checkpoint(config) == tmp_path / "out" / "room" / "gsloc" / "t" / "nerfstudio_models" / "step-000000049.ckpt"
