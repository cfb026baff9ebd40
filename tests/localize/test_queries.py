"""Tests of query loading (transforms.json and eval split), frame transforms and initial poses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from PIL import Image

from nerfstudio_gsloc.camera_conventions import to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.initialization import check_initialization, initial_poses
from nerfstudio_gsloc.localize.frame_transform import load_frame_transform
from nerfstudio_gsloc.localize.queries import (
    FrameTransform,
    Query,
    load_eval_queries,
    load_transforms_queries,
)
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


def _pose(seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    rot = axis_angle_to_rotation_matrix(torch.randn(3, generator=gen, dtype=torch.float64))
    pose = np.eye(4)
    pose[:3, :3] = rot.numpy()
    pose[:3, 3] = torch.randn(3, generator=gen, dtype=torch.float64).numpy()
    return pose


def _write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    data = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data, mode).save(path)
    return data


def _frame_transform() -> FrameTransform:
    rot = axis_angle_to_rotation_matrix(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    transform = torch.cat([rot, torch.tensor([[0.1], [-0.4], [0.2]], dtype=torch.float64)], dim=1)
    return FrameTransform(transform, 0.5, "test")


def _query_file(tmp_path: Path, frames: list, **global_keys) -> Path:
    meta = {"camera_model": "OPENCV", "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, **global_keys, "frames": frames}
    path = tmp_path / "queries" / "transforms.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta))
    return path


def test_transforms_queries_intrinsics_poses_depth_and_masks(tmp_path):
    root = tmp_path / "queries"
    img0 = _write_image(root / "images/a.png", 8, 6)
    _write_image(root / "images/b.png", 10, 4, mode="RGBA", seed=1)
    depth_mm = np.full((6, 8), 2000, dtype=np.uint16)
    depth_mm[0, 0] = 0
    Image.fromarray(depth_mm).save(root / "depth_a.png")
    mask = np.full((6, 8), 255, dtype=np.uint8)
    mask[:, :2] = 0
    Image.fromarray(mask).save(root / "mask_a.png")
    gt, prior = _pose(1), _pose(2)
    path = _query_file(
        tmp_path,
        [
            {"file_path": "images/a.png", "transform_matrix": gt.tolist(), "prior_transform_matrix": prior.tolist(),
             "depth_file_path": "depth_a.png", "mask_path": "mask_a.png"},
            # per-frame intrinsics override the global ones (another image size)
            {"file_path": "images/b.png", "fl_x": 9.0, "fl_y": 9.5, "cx": 5.0, "cy": 2.0, "w": 10, "h": 4},
        ],
        fl_x=7.0, fl_y=7.5, cx=4.0, cy=3.0, w=8, h=6,
    )
    frame = _frame_transform()
    queries = load_transforms_queries(path, frame)
    assert len(queries) == 2
    a, b = queries
    assert (a.width, a.height, b.width, b.height) == (8, 6, 10, 4)
    torch.testing.assert_close(a.K, torch.tensor([[7.0, 0, 4.0], [0, 7.5, 3.0], [0, 0, 1.0]]))
    torch.testing.assert_close(b.K, torch.tensor([[9.0, 0, 5.0], [0, 9.5, 2.0], [0, 0, 1.0]]))
    torch.testing.assert_close(a.image, torch.from_numpy(img0).float() / 255.0)
    # Poses: converted to the scene frame, and back to the file's values.
    assert a.gt_c2w.shape == (3, 4) and a.prior_c2w.shape == (3, 4)
    torch.testing.assert_close(frame.to_original(a.gt_c2w.double()), torch.from_numpy(gt[:3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(frame.to_original(a.prior_c2w.double()), torch.from_numpy(prior[:3]), atol=1e-5, rtol=0)
    assert b.gt_c2w is None and b.prior_c2w is None
    # Depth: millimetres (nerfstudio's default unit) -> original metres -> scene units (x scale 0.5).
    assert a.depth.shape == (6, 8)
    assert a.depth[0, 0] == 0.0 and a.depth[1, 1] == pytest.approx(2.0 * 0.5)
    assert a.mask.dtype == torch.bool and not a.mask[:, :2].any() and a.mask[:, 2:].all()
    # RGBA: composited onto white, alpha > 0.5 is the mask, and renders use a white background.
    rgba = np.asarray(Image.open(root / "images/b.png")).astype(np.float32) / 255.0
    expected = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    torch.testing.assert_close(b.image, torch.from_numpy(expected), atol=1e-6, rtol=0)
    assert torch.equal(b.mask, torch.from_numpy(rgba[..., 3] > 0.5))
    torch.testing.assert_close(b.background, torch.ones(3))
    assert [q.index for q in queries] == [0, 1]
    assert len(load_transforms_queries(path, frame, max_queries=1)) == 1


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "query file not found"),
        ("missing_image", "image not found"),
        ("unreadable_image", "cannot read image"),
        ("missing_intrinsics", "missing intrinsics fl_y"),
        ("size_mismatch", "image is 8x6 but its intrinsics say w=9, h=6"),
        ("distortion_k4", "k4 is not supported for perspective cameras"),
        ("fisheye_p1", "OPENCV_FISHEYE takes k1..k4 only"),
        ("distortion_list", "distortion parameters must be 6 finite numbers"),
        ("camera_model", "camera_model EQUIRECTANGULAR is not supported"),
        ("bad_matrix", "transform_matrix"),
        ("missing_depth", "depth file not found"),
        ("mask_size", "mask is"),
    ],
)
def test_bad_query_files_raise_one_line_errors(tmp_path, case, message):
    root = tmp_path / "queries"
    _write_image(root / "images/a.png", 8, 6)
    intr = {"fl_x": 7.0, "fl_y": 7.0, "cx": 4.0, "cy": 3.0, "w": 8, "h": 6}
    frame = {"file_path": "images/a.png", "transform_matrix": _pose(0).tolist()}
    if case == "missing_image":
        frame["file_path"] = "images/nope.png"
    elif case == "unreadable_image":
        (root / "images/bad.png").write_bytes(b"not a png at all")
        frame["file_path"] = "images/bad.png"
    elif case == "missing_intrinsics":
        del intr["fl_y"]
    elif case == "size_mismatch":
        intr["w"] = 9
    elif case == "distortion_k4":
        intr["k4"] = 0.1
    elif case == "fisheye_p1":
        intr.update(camera_model="OPENCV_FISHEYE", k1=0.1, p1=0.01)
    elif case == "distortion_list":
        frame["distortion_params"] = [0.1, 0.0, 0.0]
    elif case == "camera_model":
        intr["camera_model"] = "EQUIRECTANGULAR"
    elif case == "bad_matrix":
        frame["transform_matrix"] = [[1, 2], [3, 4]]
    elif case == "missing_depth":
        frame["depth_file_path"] = "depth/nope.png"
    elif case == "mask_size":
        Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(root / "m.png")
        frame["mask_path"] = "m.png"
    path = _query_file(tmp_path, [frame], **intr)
    if case == "missing_file":
        path = tmp_path / "nowhere" / "transforms.json"
    with pytest.raises(GslocError) as info:
        load_transforms_queries(path, FrameTransform.identity())
    text = str(info.value)
    assert message in text and "\n" not in text


def test_frame_transform_matches_nerfstudio_dataparser_with_applied_transform(tmp_path):
    """Poses of a dataset's own transforms.json land exactly where nerfstudio's dataparser puts them."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    data = tmp_path / "data"
    frames = []
    for i in range(5):
        _write_image(data / f"images/{i}.png", 8, 6, seed=i)
        frames.append({"file_path": f"images/{i}.png", "transform_matrix": _pose(10 + i).tolist()})
    applied = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]
    meta = {"fl_x": 7.0, "fl_y": 7.0, "cx": 4.0, "cy": 3.0, "w": 8, "h": 6, "frames": frames,
            "applied_transform": applied}
    (data / "transforms.json").write_text(json.dumps(meta))
    parser = NerfstudioDataParserConfig(data=data, eval_mode="all", load_3D_points=False).setup()
    outputs = parser.get_dataparser_outputs("train")
    outputs.save_dataparser_transform(tmp_path / "run" / "dataparser_transforms.json")

    frame = load_frame_transform(tmp_path / "run" / "dataparser_transforms.json", data)
    originals = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float64)
    scene = frame.to_scene(originals)
    torch.testing.assert_close(scene.float(), outputs.cameras.camera_to_worlds, atol=1e-5, rtol=0)
    # Without the applied_transform correction the poses would be off: the composition matters here.
    plain = load_frame_transform(tmp_path / "run" / "dataparser_transforms.json", None)
    assert (plain.to_scene(originals).float() - outputs.cameras.camera_to_worlds).abs().max() > 1e-2
    with pytest.raises(GslocError):
        load_frame_transform(tmp_path / "missing.json", data)


def test_eval_queries_from_a_dataset(tmp_path):
    """The eval split of a (nerfstudio) dataset: images, K, scene-frame poses and depth in scene units."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.datasets.base_dataset import InputDataset

    data = tmp_path / "data"
    frames = []
    for i in range(4):
        _write_image(data / f"images/{i}.png", 8, 6, seed=i)
        Image.fromarray(np.full((6, 8), 1500 + i, dtype=np.uint16)).save(data / f"d{i}.png")
        frames.append({"file_path": f"images/{i}.png", "depth_file_path": f"d{i}.png", "transform_matrix": _pose(20 + i).tolist()})
    meta = {"fl_x": 7.0, "fl_y": 7.0, "cx": 4.0, "cy": 3.0, "w": 8, "h": 6, "frames": frames,
            "train_filenames": ["images/0.png", "images/1.png", "images/2.png"], "val_filenames": ["images/3.png"],
            "test_filenames": ["images/3.png"]}
    (data / "transforms.json").write_text(json.dumps(meta))
    parser = NerfstudioDataParserConfig(data=data, load_3D_points=False).setup()
    outputs = parser.get_dataparser_outputs("test")
    pipeline = SimpleNamespace(datamanager=SimpleNamespace(eval_dataset=InputDataset(outputs)))
    queries = load_eval_queries(pipeline)
    assert len(queries) == 1
    q = queries[0]
    assert q.image.shape == (6, 8, 3) and q.gt_c2w.shape == (3, 4) and q.prior_c2w is None
    torch.testing.assert_close(q.gt_c2w, outputs.cameras.camera_to_worlds[0])
    torch.testing.assert_close(q.image, torch.from_numpy(_write_image(tmp_path / "x.png", 8, 6, seed=3)).float() / 255)
    assert q.depth[0, 0].item() == pytest.approx(1.503 * float(outputs.dataparser_scale), rel=1e-5)
    with pytest.raises(GslocError):
        load_eval_queries(SimpleNamespace(datamanager=SimpleNamespace()))


def _queries_with_gt(num: int) -> list:
    return [
        Query(name=f"q{i}", image_path=Path("x"), image=torch.zeros(2, 2, 3), K=torch.eye(3), width=2, height=2,
              gt_c2w=torch.from_numpy(_pose(30 + i)[:3]).float(), index=i)
        for i in range(num)
    ]


def test_perturb_is_exact_seeded_and_independent_of_batching():
    queries = _queries_with_gt(4)
    poses = initial_poses(queries, "perturb", angle_deg=7.0, translation=0.3, seed=5)
    gt = torch.stack([q.gt_c2w for q in queries])
    torch.testing.assert_close(rotation_error_deg(torch.stack(poses), gt), torch.full((4,), 7.0), atol=2e-3, rtol=0)
    torch.testing.assert_close(translation_error(torch.stack(poses), gt), torch.full((4,), 0.3), atol=1e-5, rtol=0)
    # Same seed: same poses, whatever subset or order the queries come in (resume, batching).
    again = initial_poses(queries[2:][::-1], "perturb", angle_deg=7.0, translation=0.3, seed=5)
    torch.testing.assert_close(again[1], poses[2])
    torch.testing.assert_close(again[0], poses[3])
    other = initial_poses(queries, "perturb", angle_deg=7.0, translation=0.3, seed=6)
    assert not torch.allclose(other[0], poses[0])
    # Different queries get different directions.
    rel = [p[:, 3] - q.gt_c2w[:, 3] for p, q in zip(poses, queries)]
    assert not torch.allclose(rel[0], rel[1])


def test_prior_init_and_missing_poses():
    queries = _queries_with_gt(2)
    with pytest.raises(GslocError, match="prior"):
        check_initialization(queries, "prior")
    for q in queries:
        q.prior_c2w = q.gt_c2w + 0.5
    torch.testing.assert_close(initial_poses(queries, "prior")[1], queries[1].gt_c2w + 0.5)
    queries[0].gt_c2w = None
    with pytest.raises(GslocError, match="ground-truth"):
        initial_poses(queries, "perturb", 1.0, 0.1)
    assert math.isclose(to_homogeneous(queries[1].gt_c2w)[3, 3].item(), 1.0)
