"""ICP of an RGB-D frame onto the capture's depth images (localize/depth_registration.py), on the procedural room:
depth ray cast exactly at known poses, so the true pose is the alignment's optimum."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nerfstudio_gsloc.data.room_layout import build_scene, dataset_poses, focal_from_hfov, query_poses
from nerfstudio_gsloc.data.room_raycast import render_views
from nerfstudio_gsloc.localize.depth_registration import (DepthRegistrationConfig, capture_depth_map, register_depth,
                                                           surface_normals, depth_points)
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error

WIDTH, HEIGHT = 64, 48


def _K() -> np.ndarray:
    f = focal_from_hfov(WIDTH)
    return np.array([[f, 0.0, WIDTH / 2], [0.0, f, HEIGHT / 2], [0.0, 0.0, 1.0]])


def _depths(scene, poses: np.ndarray) -> np.ndarray:
    K = _K()
    _, depth = render_views(scene, poses, K[0, 0], K[1, 1], K[0, 2], K[1, 2], WIDTH, HEIGHT, supersample=1)
    return depth


def _turned(c2w: torch.Tensor, axis, degrees: float, shift) -> torch.Tensor:
    """``c2w [3, 4]`` turned by ``degrees`` about ``axis`` (world frame, about the camera centre) and moved by ``shift``."""
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm() * np.radians(degrees)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    out = c2w.double().clone()
    out[:, :3] = torch.linalg.matrix_exp(cross) @ out[:, :3]
    out[:, 3] += torch.tensor(shift, dtype=torch.float64)
    return out


@pytest.fixture(scope="module")
def room():
    scene = build_scene(0)
    train = dataset_poses(scene, 24)
    depth_map = capture_depth_map(_depths(scene, train), [_K()] * len(train), [torch.from_numpy(p) for p in train])
    queries = query_poses(scene, 3, seed=1)
    return SimpleNamespace(scene=scene, map=depth_map, queries=queries, query_depths=_depths(scene, queries))


def test_a_frame_is_pulled_back_onto_the_captured_geometry(room):
    assert room.map.views == 24 and len(room.map.points) > 10_000
    K = torch.from_numpy(_K()).float()
    for pose, depth in zip(room.queries, room.query_depths):
        truth = torch.from_numpy(pose[:3, :4])
        start = _turned(truth, (0.3, -1.0, 0.5), 0.3, (0.006, -0.004, 0.003))  # 0.3 deg, 8 mm off
        result = register_depth(start.float(), torch.from_numpy(depth), K, room.map)
        assert result.accepted, result.reason
        assert result.overlap > 0.8
        rot = float(rotation_error_deg(result.c2w[None].double(), truth[None])[0])
        trans = float(translation_error(result.c2w[None].double(), truth[None])[0])
        # 10x closer than the start at least (exact depth: the optimum is the truth up to the map's sampling)
        assert rot < 0.03 and trans < 0.0008, (rot, trans, result.reason)


def test_a_frame_that_is_not_on_the_map_or_would_jump_keeps_its_pose(room):
    K = torch.from_numpy(_K()).float()
    truth = torch.from_numpy(room.queries[0][:3, :4]).float()
    depth = torch.from_numpy(room.query_depths[0])
    # Depth of another place: everything 3 m further away than the map's surfaces
    far = register_depth(truth, depth + 3.0, K, room.map)
    assert not far.accepted and "not kept" in far.reason and torch.equal(far.c2w, truth)
    # A start 4 degrees off converges far away from it: a jump, not a correction, and it is refused
    start = _turned(truth, (0.0, 0.0, 1.0), 4.0, (0.0, 0.0, 0.0)).float()
    jump = register_depth(start, depth, K, room.map)
    assert not jump.accepted and "jump" in jump.reason and torch.equal(jump.c2w, start)
    assert float(rotation_error_deg(start[None].double(), truth[None].double())[0]) == pytest.approx(4.0, abs=1e-3)
    allowed = register_depth(start, depth, K, room.map, DepthRegistrationConfig(max_correction_deg=5.0))
    assert allowed.accepted and allowed.turned == pytest.approx(4.0, abs=0.05)
    # Too few valid pixels: refused with a reason, no exception
    empty = register_depth(truth, torch.zeros_like(depth), K, room.map)
    assert not empty.accepted and "not run: fewer than 6" in empty.reason


def test_normals_leave_out_depth_discontinuities():
    depth = np.full((8, 8), 2.0)
    depth[:, 4:] = 4.0  # a step: the columns beside it have no surface to take a normal of
    points, z, valid = depth_points(depth, _K(), torch.eye(4))  # the camera's own (OpenGL) axes
    normals, good = surface_normals(points, z, valid)
    assert not good[:, 3].any() and not good[:, 4].any()
    assert good[2:6, 1:3].all() and good[2:6, 5:7].all()
    # a fronto-parallel plane's normal is the optical axis (sign arbitrary)
    assert np.allclose(np.abs(normals[3, 2]), [0.0, 0.0, 1.0], atol=1e-6)


def test_results_are_aligned_in_place_and_only_gsloc_aligns(room, monkeypatch):
    from nerfstudio_gsloc.localize.depth_registration import align_result, capture_depth_map_of
    from nerfstudio_gsloc.localize.registry import LocalizerSettings
    from nerfstudio_gsloc.localize.result import LocalizationResult

    K = torch.from_numpy(_K()).float()
    truth = torch.from_numpy(room.queries[1][:3, :4]).float()
    query = SimpleNamespace(depth=torch.from_numpy(room.query_depths[1]), K=K, mask=None, gt_c2w=truth)
    biased = _turned(truth, (1.0, 0.2, 0.0), 0.2, (0.005, 0.0, 0.0)).float()  # a model's bias: 0.2 deg, 5 mm
    result = LocalizationResult("q", 0, biased.clone(), biased.clone(), "converged", reason="converged early")
    align_result(query, result, room.map, DepthRegistrationConfig())
    assert result.depth_aligned is True and result.reason.startswith("depth ICP (overlap")
    assert result.reason.endswith("; converged early") and result.rot_err_deg < 0.03 and result.trans_err < 0.0008
    assert float(rotation_error_deg(result.c2w[None].double(), truth[None].double())[0]) == pytest.approx(
        result.rot_err_deg, abs=1e-6)
    # no depth, or a failed result: untouched
    for q, status in ((SimpleNamespace(depth=None, K=K, mask=None, gt_c2w=truth), "converged"), (query, "failed")):
        untouched = LocalizationResult("q", 0, biased.clone(), biased.clone(), status)
        align_result(q, untouched, room.map, DepthRegistrationConfig())
        assert untouched.depth_aligned is None and torch.equal(untouched.c2w, biased) and untouched.reason == ""
    # the map of a run is built once and kept on its pipeline; a run without depth images has none
    built = SimpleNamespace(datamanager=SimpleNamespace(train_dataparser_outputs=SimpleNamespace(metadata={})))
    assert capture_depth_map_of(built) is None and built.gsloc_capture_depth_map == (2_000_000, None)
    # unreadable depth images: one warning, localization goes on without the alignment
    from nerfstudio_gsloc.localize import depth_registration

    def unreadable(outputs, max_points):
        raise OSError("depth/frame_00003.png: truncated")

    monkeypatch.setattr(depth_registration, "build_capture_depth_map", unreadable)
    broken = SimpleNamespace(datamanager=SimpleNamespace(train_dataparser_outputs=SimpleNamespace(metadata={})))
    with pytest.warns(UserWarning, match="cannot be read.*truncated"):
        assert capture_depth_map_of(broken) is None
    # gsloc's last stage; the baselines reproduce their papers without it
    settings = LocalizerSettings()
    assert settings.config("gsloc").depth_alignment.enabled
    assert not settings.config("depth").depth_alignment.enabled
    assert not settings.config("photometric").depth_alignment.enabled
