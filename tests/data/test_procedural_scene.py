"""Tests for the embedded procedural scene (ray-cast room written as a nerfstudio dataset)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c, rigid_inverse
from nerfstudio_gsloc.data.procedural_scene import eval_indices, generate_scene, load_depth_png, write_query_set
from nerfstudio_gsloc.data.room_layout import build_scene, camera_is_valid, dataset_poses
from nerfstudio_gsloc.data.room_raycast import render_views
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.scripts import make_scene

WIDTH, HEIGHT, VIEWS = 64, 48, 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small dataset of scene 0 (16 views, 64x48, eval every 4th frame)."""
    out = tmp_path_factory.mktemp("scene")
    generate_scene(out, seed=0, num_views=VIEWS, width=WIDTH, height=HEIGHT, eval_fraction=0.25, show_progress=False)
    return out


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """Three novel views of scene 0 at a different resolution."""
    out = tmp_path_factory.mktemp("queries")
    write_query_set(out, seed=5, num_views=3, width=56, height=40, scene_seed=0, show_progress=False)
    return out


@dataclass
class FrameSet:
    """Frames of a ``transforms.json`` in file order, poses in its original frame (no nerfstudio normalisation).

    Attributes:
        c2w_opengl: ``[N, 4, 4]`` OpenGL camera-to-world.
        K: ``[N, 3, 3]`` intrinsics in pixels (pixel centres at +0.5).
        widths, heights: ``[N]`` image sizes.
        image_paths, depth_paths: absolute paths (``depth_paths`` entries are None without depth).
    """

    c2w_opengl: np.ndarray
    K: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    image_paths: List[Path]
    depth_paths: List[Optional[Path]]


def read_frames(folder: Path) -> FrameSet:
    """The frames of ``folder/transforms.json`` (pinhole, global or per-frame intrinsics) as written by the generator."""
    meta = json.loads((Path(folder) / "transforms.json").read_text())
    frames = meta["frames"]
    values = np.array([[float(f.get(k, meta.get(k))) for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")] for f in frames])
    K = np.zeros((len(frames), 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = values[:, 0], values[:, 1], values[:, 2], values[:, 3], 1.0
    return FrameSet(
        c2w_opengl=np.array([f["transform_matrix"] for f in frames], dtype=np.float64).reshape(-1, 4, 4),
        K=K,
        widths=values[:, 4].astype(np.int64),
        heights=values[:, 5].astype(np.int64),
        image_paths=[Path(folder) / f["file_path"] for f in frames],
        depth_paths=[Path(folder) / f["depth_file_path"] if "depth_file_path" in f else None for f in frames],
    )


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def _cv_cameras(frames) -> np.ndarray:
    """OpenCV camera-to-world ``[N, 4, 4]`` of a FrameSet, via the project's conventions module."""
    w2c = opengl_c2w_to_opencv_w2c(torch.from_numpy(frames.c2w_opengl))
    return rigid_inverse(w2c).numpy()


def _pixel_rays(K: np.ndarray, c2w_cv: np.ndarray, width: int, height: int):
    """World ray origin ``[3]`` and directions ``[H*W, 3]`` with unit camera z through the pixel centres."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1).reshape(-1, 3)
    return c2w_cv[:3, 3], cam @ c2w_cv[:3, :3].T


def _reproject(src: int, dst: int, frames_src, frames_dst):
    """Lift pixels of ``src`` with its depth PNG, project into ``dst``; return matching colours of visible points.

    Returns:
        (colours in src [V, 3], colours in dst [V, 3], fraction of src pixels visible in dst)
    """
    cv_src, cv_dst = _cv_cameras(frames_src)[src], _cv_cameras(frames_dst)[dst]
    w_s, h_s = int(frames_src.widths[src]), int(frames_src.heights[src])
    w_d, h_d = int(frames_dst.widths[dst]), int(frames_dst.heights[dst])
    depth_s = load_depth_png(frames_src.depth_paths[src]).reshape(-1)
    origin, dirs = _pixel_rays(frames_src.K[src], cv_src, w_s, h_s)
    points = origin + dirs * depth_s[:, None]
    w2c = np.linalg.inv(cv_dst)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    K = frames_dst.K[dst]
    uv = cam[:, :2] / cam[:, 2:3] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
    inside = (cam[:, 2] > 0.1) & (col >= 0) & (col < w_d) & (row >= 0) & (row < h_d)
    depth_d = load_depth_png(frames_dst.depth_paths[dst])
    visible = inside.copy()
    visible[inside] = np.abs(depth_d[row[inside], col[inside]] - cam[inside, 2]) < 0.02
    rgb_s = _read_rgb(frames_src.image_paths[src]).reshape(-1, 3)
    rgb_d = _read_rgb(frames_dst.image_paths[dst])
    return rgb_s[visible], rgb_d[row[visible], col[visible]], visible.mean()


def test_same_seed_writes_same_bytes(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for out in dirs:
        generate_scene(out, seed=3, num_views=4, width=32, height=24, eval_fraction=0.25, show_progress=False)
    files = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 4
    for rel in files:
        assert (dirs[0] / rel).read_bytes() == (dirs[1] / rel).read_bytes(), rel


def test_different_seeds_differ() -> None:
    pose = dataset_poses(build_scene(0), 8)[:1]
    images = [render_views(build_scene(seed), pose, 30.0, 30.0, 16.0, 12.0, 32, 24)[0] for seed in (0, 1)]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 10.0
    assert not np.allclose(dataset_poses(build_scene(0), 8), dataset_poses(build_scene(1), 8))


def test_nerfstudio_dataparser_reads_split_and_depth(dataset: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    parser = NerfstudioDataParserConfig(data=dataset).setup()
    train = parser.get_dataparser_outputs("train")
    val = parser.get_dataparser_outputs("val")
    test = parser.get_dataparser_outputs("test")
    assert (len(train.image_filenames), len(val.image_filenames)) == (12, 4)
    assert val.image_filenames == test.image_filenames
    assert not set(train.image_filenames) & set(val.image_filenames)
    assert len(set(train.image_filenames) | set(val.image_filenames)) == VIEWS
    for outputs in (train, val):
        depths = outputs.metadata["depth_filenames"]
        assert [d.name for d in depths] == [i.name for i in outputs.image_filenames]
        assert all(d.parent.name == "depth" and d.is_file() for d in depths)
    assert outputs.metadata["depth_unit_scale_factor"] == pytest.approx(1e-3)
    assert int(train.cameras.width[0]) == WIDTH and int(train.cameras.height[0]) == HEIGHT


def test_split_lists_in_transforms(dataset: Path) -> None:
    meta = json.loads((dataset / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV"
    assert meta["fl_x"] == meta["fl_y"] and (meta["cx"], meta["cy"]) == (WIDTH / 2, HEIGHT / 2)
    names = [f["file_path"] for f in meta["frames"]]
    assert not set(meta["train_filenames"]) & set(meta["val_filenames"])
    assert sorted(meta["train_filenames"] + meta["val_filenames"]) == sorted(names)
    # Eval frames sit between training frames, evenly spaced along the trajectory.
    assert eval_indices(VIEWS, 0.25).tolist() == [2, 6, 10, 14]
    assert eval_indices(80, 1 / 8).tolist() == list(range(4, 80, 8))


def test_depth_png_matches_room_planes(dataset: Path) -> None:
    """Every depth is at most the ray's exit distance through the room's walls, and equal where no object occludes."""
    scene = build_scene(0)
    frames = read_frames(dataset)
    cams = _cv_cameras(frames)
    occluded_somewhere = False
    for i in range(0, VIEWS, 3):
        origin, dirs = _pixel_rays(frames.K[i], cams[i], WIDTH, HEIGHT)
        with np.errstate(divide="ignore"):
            t_planes = np.where(dirs > 0, (scene.room_max - origin) / dirs, (scene.room_min - origin) / dirs)
        room_depth = np.min(np.where(t_planes > 0, t_planes, np.inf), axis=1)  # z-depth: dirs have unit camera z
        depth = load_depth_png(frames.depth_paths[i]).reshape(-1)
        assert np.all(depth > 0.3)
        assert np.all(depth <= room_depth + 1e-3)
        on_room = np.abs(depth - room_depth) <= 1e-3
        assert on_room.mean() > 0.3
        occluded_somewhere |= bool((depth < room_depth - 0.05).any())
    assert occluded_somewhere, "no view shows any object"


def test_depth_reprojects_onto_matching_colours(dataset: Path) -> None:
    frames = read_frames(dataset)
    for src, dst in ((0, 1), (5, 4)):
        col_src, col_dst, visible = _reproject(src, dst, frames, frames)
        assert visible > 0.25
        err = np.abs(col_src - col_dst).mean(axis=1)
        shuffled = np.abs(col_src - np.random.default_rng(0).permutation(col_dst)).mean(axis=1)
        assert np.median(err) < 8.0
        assert np.median(shuffled) > 4.0 * np.median(err) + 10.0


def test_rendering_is_textured() -> None:
    """Images carry texture everywhere (gradients for alignment), not flat colour regions."""
    scene = build_scene(0)
    rgb, _ = render_views(scene, dataset_poses(scene, 4), 50.0, 50.0, 32.0, 24.0, 64, 48)
    gray = rgb.astype(float).mean(axis=-1)
    grad = np.abs(np.diff(gray, axis=2))[:, :-1] + np.abs(np.diff(gray, axis=1))[:, :, :-1]
    assert np.median(grad) > 1.0
    assert gray.std(axis=(1, 2)).min() > 15.0


def test_cameras_are_valid_and_distinct() -> None:
    scene = build_scene(0)
    poses = dataset_poses(scene, 80)
    centres = poses[:, :3, 3]
    assert all(camera_is_valid(scene, c) for c in centres)
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    assert steps.max() < 0.3 and steps.min() > 0.01  # smooth loop, no repeated poses
    # OpenGL cameras look along -z: the view direction points into the room's middle, never straight up/down.
    forward = -poses[:, :3, 2]
    assert np.all(np.einsum("ij,ij->i", forward, -centres * [1, 1, 0]) > 0)
    assert np.all(np.abs(forward[:, 2]) < np.sin(np.radians(41.0)))


def test_query_set_is_novel_and_in_the_scene_frame(dataset: Path, queries: Path) -> None:
    data, query = read_frames(dataset), read_frames(queries)
    assert len(query.image_paths) == 3
    assert set(query.widths.tolist()) == {56} and set(query.heights.tolist()) == {40}
    assert all(p.is_file() for p in query.image_paths + query.depth_paths)
    dist = np.linalg.norm(query.c2w_opengl[:, None, :3, 3] - dataset_poses(build_scene(0), 80)[None, :, :3, 3], axis=-1)
    assert dist.min() > 0.01
    # Same scene, same frame: query depth reprojected into an overlapping dataset view lands on matching colours.
    for q in range(3):
        best = max(range(VIEWS), key=lambda d: _reproject(q, d, query, data)[2])
        col_q, col_d, visible = _reproject(q, best, query, data)
        assert visible > 0.2
        assert np.median(np.abs(col_q - col_d).mean(axis=1)) < 10.0


def test_json_poses_rerender_to_written_images(queries: Path) -> None:
    frames = read_frames(queries)
    K = frames.K
    rgb, depth = render_views(build_scene(0), frames.c2w_opengl, K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], 56, 40)
    for i in range(3):
        assert np.array_equal(rgb[i], _read_rgb(frames.image_paths[i]).astype(np.uint8))
        assert np.abs(depth[i] - load_depth_png(frames.depth_paths[i])).max() <= 5e-4 + 1e-6


def test_query_set_parses_with_per_frame_intrinsics(queries: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    outputs = NerfstudioDataParserConfig(data=queries).setup().get_dataparser_outputs("test")
    assert len(outputs.image_filenames) == 3 and int(outputs.cameras.width[0]) == 56


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 200}, "width must be between"),
        ({"height": 8}, "height must be between"),
        ({"num_views": -1}, "num_views must be at least"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs, message: str) -> None:
    args = {"num_views": 4, "width": 32, "height": 24, "show_progress": False, **kwargs}
    with pytest.raises(GslocError, match=message):
        generate_scene(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(GslocError, match="is a file, not a folder"):
        generate_scene(target, num_views=2, width=16, height=16, show_progress=False)
    with pytest.raises(GslocError):
        write_query_set(target / "sub", seed=0, num_views=1, width=16, height=16, show_progress=False)


def test_cli_writes_dataset_and_reports_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["gsloc-make-scene", "--output-dir", str(out), "--num-views", "3", "--width", "24", "--height", "16"]
    monkeypatch.setattr(sys, "argv", argv)
    make_scene.entrypoint()
    assert len(json.loads((out / "transforms.json").read_text())["frames"]) == 3

    forward = tmp_path / "forward"
    monkeypatch.setattr(sys, "argv", [*argv[:2], str(forward), *argv[3:], "--layout", "forward", "--no-depth"])
    make_scene.entrypoint()
    frames = json.loads((forward / "transforms.json").read_text())["frames"]
    assert len(frames) == 3 and all("depth_file_path" not in f for f in frames) and not (forward / "depth").exists()

    monkeypatch.setattr(sys, "argv", argv + ["--queries", "--scene-seed", "2"])
    make_scene.entrypoint()
    assert json.loads((out / "transforms.json").read_text())["gsloc_scene"]["scene_seed"] == 2

    monkeypatch.setattr(sys, "argv", ["gsloc-make-scene", "--output-dir", str(out), "--width", "400"])
    with pytest.raises(SystemExit) as exit_info:
        make_scene.entrypoint()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "width must be between" in err and "Traceback" not in err
