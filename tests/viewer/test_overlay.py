"""The localization overlay on a real viser server, checked against nerfstudio's own training-camera frustums."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from PIL import Image

from nerfstudio_gsloc.camera_conventions import FrameTransform, to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.poses_file import read_poses
from nerfstudio_gsloc.scripts import view
from nerfstudio_gsloc.viewer import overlay
from nerfstudio_gsloc.viewer.overlay import (
    GT_COLOR,
    INITIAL_COLOR,
    STATUS_COLORS,
    FrustumShape,
    add_localization_overlay,
    check_same_frame,
)

FX, CX, CY, W, H = 70.0, 40.0, 30.0, 80, 60


def _pose(axis_angle, translation) -> torch.Tensor:
    """``[3, 4]`` float64 rigid pose."""
    rot = axis_angle_to_rotation_matrix(torch.tensor(axis_angle, dtype=torch.float64))
    return torch.cat([rot, torch.tensor(translation, dtype=torch.float64)[:, None]], dim=1)


# A non-trivial original -> scene map: rotation, translation and scale != 1.
FRAME = FrameTransform(_pose([0.3, -0.5, 0.9], [0.4, -1.2, 2.0]), 0.37, "test")
# The training camera's pose as nerfstudio holds it (scene frame, OpenGL c2w).
TRAIN_C2W_SCENE = _pose([0.7, 0.2, -0.4], [0.3, -0.8, 0.5])


def _rgb(value: int) -> tuple:
    """viser's int colour -> (r, g, b)."""
    return ((value >> 16) & 255, (value >> 8) & 255, value & 255)


def _dominant(rgb: tuple) -> str:
    """The clearly strongest channel's name, or "mixed"."""
    order = np.argsort(rgb)
    return ("red", "green", "blue")[order[-1]] if rgb[order[-1]] > 1.5 * rgb[order[-2]] else "mixed"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server():
    import viser

    srv = viser.ViserServer(host="127.0.0.1", port=_free_port(), verbose=False)
    yield srv
    srv.stop()


def _sent(srv) -> dict:
    """Messages a newly connecting browser receives, by (message type, node name) (the newest of each)."""
    buffer = srv._websock_server._broadcast_buffer
    return {(type(m).__name__, getattr(m, "name", None)): m for m in buffer.message_from_id.values()}


def _matrix(c2w_scene: torch.Tensor) -> list:
    """Scene-frame pose -> poses.json 4x4 (original frame), through the project's conversion."""
    return to_homogeneous(FRAME.to_original(c2w_scene)).tolist()


def _write_poses(path: Path, image: Path) -> Path:
    refined = TRAIN_C2W_SCENE
    failed = _pose([0.1, 0.1, 0.1], [1.0, 0.0, 0.0])
    results = [
        {
            "image": "images/query_a.png",
            "image_path": str(image),
            "index": 0,
            "status": "converged",
            "transform_matrix": _matrix(refined),
            "initial_transform_matrix": _matrix(_pose([0.75, 0.2, -0.4], [0.35, -0.8, 0.5])),
            "gt_transform_matrix": _matrix(refined),
            "rot_err_deg": 0.0,
            "trans_err_scene": 0.0,
            "iterations": 12,
        },
        {
            "image": "images/query_b.png",
            "image_path": str(image.parent / "missing.png"),
            "index": 1,
            "status": "failed",
            "reason": "no matches",
            "transform_matrix": _matrix(failed),
            "initial_transform_matrix": _matrix(failed),
        },
    ]
    document = {"convention": "test", "frame": FRAME.to_json(), "settings": {}, "results": results}
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def poses_path(tmp_path):
    image = tmp_path / "query_a.png"
    Image.fromarray(np.full((H, W, 3), 200, dtype=np.uint8)).save(image)
    return _write_poses(tmp_path / "poses.json", image)


def _nerfstudio_training_frustum(srv) -> None:
    """Let nerfstudio's own ``Viewer.init_scene`` draw one training camera at ``TRAIN_C2W_SCENE`` on ``srv``."""
    from nerfstudio.cameras.cameras import Cameras
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.viewer.viewer import Viewer

    cameras = Cameras(
        camera_to_worlds=TRAIN_C2W_SCENE[None].float(), fx=FX, fy=FX, cx=CX, cy=CY, width=W, height=H
    )

    class Dataset:
        def __init__(self):
            self.cameras = cameras

        def __len__(self):
            return 1

        def __getitem__(self, idx):
            return {"image": torch.full((H, W, 3), 0.5)}

    state = SimpleNamespace(viser_server=srv, config=ViewerConfig())
    state._pick_drawn_image_idxs = lambda total: Viewer._pick_drawn_image_idxs(state, total)
    Viewer.init_scene(state, train_dataset=Dataset(), train_state="completed")


def test_scale_ratio_matches_nerfstudio():
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    assert overlay.VISER_NERFSTUDIO_SCALE_RATIO == VISER_NERFSTUDIO_SCALE_RATIO


def test_query_at_training_pose_lands_on_nerfstudio_frustum(server, poses_path):
    _nerfstudio_training_frustum(server)
    shape = FrustumShape.from_intrinsics(FX, CX, CY)
    result = add_localization_overlay(server, read_poses(poses_path), FRAME, shapes={"images/query_a.png": shape})
    sent = _sent(server)
    node = result.node_paths["images/query_a.png"]
    assert node == "/localization/query_a.png"
    train = "/cameras/camera_00000"
    for kind in ("refined", "gt"):  # both at the training camera's pose (the ground truth drawn 1.15 times larger)
        np.testing.assert_allclose(
            sent[("SetPositionMessage", f"{node}/{kind}")].position, sent[("SetPositionMessage", train)].position, atol=1e-9
        )
        ours = np.array(sent[("SetOrientationMessage", f"{node}/{kind}")].wxyz)
        theirs = np.array(sent[("SetOrientationMessage", train)].wxyz)
        assert min(np.abs(ours - theirs).max(), np.abs(ours + theirs).max()) < 1e-6  # q and -q: same rotation
        frustum = sent[("CameraFrustumMessage", f"{node}/{kind}")]
        nerfstudio = sent[("CameraFrustumMessage", train)]
        assert frustum.fov == pytest.approx(nerfstudio.fov) and frustum.aspect == pytest.approx(nerfstudio.aspect)
        assert frustum.scale == pytest.approx(nerfstudio.scale * (overlay.GT_SCALE if kind == "gt" else 1.0))
    # The initial pose is elsewhere, and the path runs from its centre to the refined centre.
    initial = np.array(sent[("SetPositionMessage", f"{node}/initial")].position)
    refined = np.array(sent[("SetPositionMessage", f"{node}/refined")].position)
    assert np.linalg.norm(initial - refined) > 0.1
    path = np.array(sent[("CatmullRomSplineMessage", f"{node}/path")].positions)
    np.testing.assert_allclose(path, np.stack([initial, refined]), atol=1e-9)


def test_colours_thumbnails_and_ground_truth_only_when_present(server, poses_path):
    result = add_localization_overlay(server, read_poses(poses_path))
    sent = _sent(server)
    a, b = "/localization/query_a.png", "/localization/query_b.png"
    keys = (f"{a}/refined", f"{b}/refined", f"{a}/initial", f"{a}/gt")
    colour = {key: _rgb(sent[("CameraFrustumMessage", key)].color) for key in keys}
    assert colour[f"{a}/refined"] == STATUS_COLORS["converged"] and _dominant(colour[f"{a}/refined"]) == "green"
    assert colour[f"{b}/refined"] == STATUS_COLORS["failed"] and _dominant(colour[f"{b}/refined"]) == "red"
    assert colour[f"{a}/initial"] == INITIAL_COLOR and len(set(INITIAL_COLOR)) == 1  # grey
    assert colour[f"{a}/gt"] == GT_COLOR and _dominant(GT_COLOR) == "blue"
    assert ("CameraFrustumMessage", f"{b}/gt") not in sent and "gt" not in result.nodes["images/query_b.png"]
    # The thumbnail is a child of the refined frustum, inside its outline (so the status colour shows around it);
    # none for the missing image.
    image = sent[("ImageMessage", f"{a}/refined/image")]
    assert image.data is not None and ("ImageMessage", f"{b}/refined/image") not in sent
    width, height, depth = overlay._image_plane(FrustumShape(math.radians(60.0), 4.0 / 3.0), 0.1)
    assert image.render_width == pytest.approx(overlay.IMAGE_SCALE * width)
    assert sent[("SetPositionMessage", f"{a}/refined/image")].position[2] == pytest.approx(overlay.IMAGE_SCALE * depth)
    # The ground truth frustum is larger than the refined one: both outlines stay visible when they coincide.
    assert sent[("CameraFrustumMessage", f"{a}/gt")].scale > sent[("CameraFrustumMessage", f"{a}/refined")].scale
    # One row per query, coloured by status, in the panel.
    rows = list(result.panel.row_info.values())
    assert rows == [("query_a · 0.00° · 0.0000", "green"), ("query_b · failed", "red")]


def test_positions_follow_the_frame_scale(server, poses_path):
    """Without a frame argument the poses.json frame is used: centre = scale * (T c) * ratio."""
    add_localization_overlay(server, read_poses(poses_path), gui=False)
    document = json.loads(poses_path.read_text())
    centre = torch.tensor(document["results"][1]["transform_matrix"], dtype=torch.float64)[:3, 3]
    expected = (FRAME.transform[:, :3] @ centre + FRAME.transform[:, 3]) * FRAME.scale * 10.0
    got = _sent(server)[("SetPositionMessage", "/localization/query_b.png/refined")].position
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-9)


def test_bad_poses_files(tmp_path, poses_path):
    with pytest.raises(GslocError, match="poses file not found"):
        read_poses(tmp_path / "nope.json")
    transforms = tmp_path / "transforms.json"
    transforms.write_text(json.dumps({"frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}))
    with pytest.raises(GslocError, match="not a poses.json"):
        read_poses(transforms)
    broken = json.loads(poses_path.read_text())
    broken["results"][0]["transform_matrix"] = [[1.0, 0.0], [0.0, 1.0]]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(GslocError, match="transform_matrix must be a finite 4x4 or 3x4 matrix"):
        read_poses(tmp_path / "broken.json")


def test_frame_of_another_run_is_rejected(poses_path):
    poses = read_poses(poses_path)
    check_same_frame(FRAME, poses.frame, poses_path)  # same run: fine
    with pytest.raises(GslocError, match="another run"):
        check_same_frame(FrameTransform(FRAME.transform, 0.5), poses.frame, poses_path)


def test_cli_reports_bad_inputs_before_the_viewer(tmp_path, poses_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(view, "start_nerfstudio_viewer", lambda *args: started.append(args))
    cases = [
        (["--load-config", str(tmp_path / "config.yml"), "--poses", str(tmp_path / "missing.json")], "poses file not found"),
        (["--load-config", str(tmp_path / "config.yml"), "--poses", str(tmp_path)], "poses file not found"),
        (["--load-config", str(tmp_path / "config.yml"), "--poses", str(poses_path)], "config not found"),
    ]
    for argv, message in cases:
        monkeypatch.setattr("sys.argv", ["gsloc-view", *argv])
        with pytest.raises(SystemExit) as exit_info:
            view.entrypoint()
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not started


def _fake_run(write_fake_run, root: Path, frame: FrameTransform) -> Path:
    """A run folder (dataset folder included) that passes the pre-load checks, with ``frame`` as its dataparser map."""
    (root / "data").mkdir(parents=True)
    return write_fake_run(root, root / "data", frame.to_json())


def test_cli_checks_the_poses_belong_to_the_run(tmp_path, poses_path, capsys, monkeypatch, write_fake_run):
    import nerfstudio_gsloc.runs

    loaded = []

    def fake_load_run(config_path):
        loaded.append(config_path)
        raise GslocError("stop before loading")

    monkeypatch.setattr(nerfstudio_gsloc.runs, "load_run", fake_load_run)
    other = _fake_run(write_fake_run, tmp_path / "other", FrameTransform(FRAME.transform, 0.5))
    same = _fake_run(write_fake_run, tmp_path / "same", FRAME)
    for config, message in ((other, "written for another run"), (same, "stop before loading")):
        monkeypatch.setattr("sys.argv", ["gsloc-view", "--load-config", str(config), "--poses", str(poses_path)])
        with pytest.raises(SystemExit):
            view.entrypoint()
        assert message in capsys.readouterr().err
    assert loaded == [same]


def test_benchmark_file_with_methods_trials_and_a_query_without_pose(server, tmp_path):
    """A version-2 poses.json as gsloc-bench writes it: several methods and trials per image, a failure without pose."""
    from nerfstudio_gsloc.poses_file import PoseRecord, PosesDocument, QuerySource, write_poses

    gt = to_homogeneous(TRAIN_C2W_SCENE)
    records = [
        PoseRecord("images/q.png", "converged", gt, c2w_init=gt, c2w_gt=gt, method="gsloc", trial=0),
        PoseRecord("images/q.png", "converged", gt, c2w_init=gt, c2w_gt=gt, method="gsloc", trial=1),
        PoseRecord("images/q.png", "failed", None, c2w_init=gt, c2w_gt=gt, method="pnp", trial=0, reason="no inliers"),
        PoseRecord("images/q.png", "rejected", gt, c2w_init=gt, method="pnp", trial=1),
    ]
    write_poses(tmp_path / "poses.json", PosesDocument(FRAME, QuerySource.eval_split(), records))
    result = add_localization_overlay(server, read_poses(tmp_path / "poses.json"), thumbnails=False)
    assert result.node_paths == {
        "images/q.png [gsloc] trial 0": "/localization/gsloc/q.png_t0",
        "images/q.png [gsloc] trial 1": "/localization/gsloc/q.png_t1",
        "images/q.png [pnp] trial 0": "/localization/pnp/q.png_t0",
        "images/q.png [pnp] trial 1": "/localization/pnp/q.png_t1",
    }
    # No refined frustum and no path for the failure without a pose; its initial pose and ground truth are drawn.
    assert set(result.nodes["images/q.png [pnp] trial 0"]) == {"initial", "gt"}
    sent = _sent(server)
    assert _rgb(sent[("CameraFrustumMessage", "/localization/pnp/q.png_t1/refined")].color) == STATUS_COLORS["rejected"]
    labels = [text for text, _ in result.panel.row_info.values()]
    assert labels == ["q t0 · 0.00° · 0.0000", "q t1 · 0.00° · 0.0000", "q t0 · failed", "q t1 · rejected"]
    summary = result.panel.summary.content
    assert "**gsloc**, **2 queries**: 2 converged" in summary and "**pnp**, **2 queries**: 1 failed, 1 rejected" in summary


def test_live_view_moves_frustums_then_shows_results(server, tmp_path):
    """What ns-localize --viewer does: running queries drawn at their start, moved by on_poses, redrawn by on_result."""
    import dataclasses

    from nerfstudio_gsloc.localize.queries import Query
    from nerfstudio_gsloc.viewer.live import LiveView, running_record
    from nerfstudio_gsloc.viewer.overlay import LocalizationOverlay, viewer_pose

    image = tmp_path / "q.png"
    Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(image)
    gt = TRAIN_C2W_SCENE.float()
    start = _pose([0.72, 0.2, -0.4], [0.33, -0.8, 0.5]).float()
    query = Query(name="images/q.png", image_path=image, image=torch.zeros(H, W, 3), K=torch.eye(3), width=W, height=H,
                  index=0, gt_c2w=gt)
    live = LiveView(SimpleNamespace(viser_server=server), LocalizationOverlay(server, FRAME))
    live.begin([], [query], [start], "gsloc")
    node = "/localization/q.png/refined"
    assert _rgb(_sent(server)[("CameraFrustumMessage", node)].color) == STATUS_COLORS["running"]
    assert live.panel.row_info["images/q.png"] == ("q · running", "cyan") and "1 running" in live.panel.summary.content
    middle = _pose([0.71, 0.2, -0.4], [0.31, -0.8, 0.5]).float()
    live.on_poses({0: middle})
    np.testing.assert_allclose(_sent(server)[("SetPositionMessage", node)].position, viewer_pose(middle)[1], atol=1e-6)
    assert len(_sent(server)[("CatmullRomSplineMessage", "/localization/q.png/path")].positions) == 3  # start, start, middle
    final = running_record(query, gt, FRAME, "gsloc")
    live.on_result(0, dataclasses.replace(final, status="converged", iterations=7))
    sent = _sent(server)
    assert _rgb(sent[("CameraFrustumMessage", node)].color) == STATUS_COLORS["converged"]
    assert ("ImageMessage", f"{node}/image") in sent
    assert len(sent[("CatmullRomSplineMessage", "/localization/q.png/path")].positions) == 4  # ... and the final pose
    assert live.panel.row_info["images/q.png"] == ("q · 0.00° · 0.0000", "green")
    assert "**1 queries**: 1 converged" in live.panel.summary.content and "running" not in live.panel.summary.content
    # Clicking the row moves a client's camera onto the refined frustum.
    camera = SimpleNamespace(position=np.zeros(3), look_at=np.array([0.0, 0.0, 1.0]), up_direction=np.array([0.0, -1.0, 0.0]), fov=1.0)
    client = SimpleNamespace(camera=camera, atomic=lambda: __import__("contextlib").nullcontext())
    live.panel.select("images/q.png", client)
    wxyz, position = viewer_pose(gt)
    import viser.transforms as vtf

    rotation = vtf.SO3(wxyz).as_matrix()
    np.testing.assert_allclose(camera.position, position)
    np.testing.assert_allclose(camera.look_at - camera.position, rotation[:, 2], atol=1e-9)  # forward, distance kept
    np.testing.assert_allclose(camera.up_direction, -rotation[:, 1], atol=1e-9)
    assert "converged" in live.panel.details.content and "7 iterations" in live.panel.details.content


def test_trajectory_runs_through_the_refined_centres_in_query_order(server, tmp_path):
    from nerfstudio_gsloc.poses_file import PoseRecord, PosesDocument, QuerySource, write_poses
    from nerfstudio_gsloc.viewer.overlay import viewer_pose

    poses = [_pose([0.1 * i, 0.0, 0.0], [0.1 * i, 0.0, 1.0]) for i in range(3)]
    records = [PoseRecord(f"f{i}.png", "converged", to_homogeneous(FRAME.to_original(poses[i])), index=i) for i in (2, 0, 1)]
    write_poses(tmp_path / "poses.json", PosesDocument(FRAME, QuerySource.eval_split(), records))
    result = add_localization_overlay(server, read_poses(tmp_path / "poses.json"), thumbnails=False, trajectory=True)
    line = np.array(_sent(server)[("CatmullRomSplineMessage", "/localization/trajectory")].positions)
    np.testing.assert_allclose(line, np.stack([viewer_pose(p)[1] for p in poses]), atol=1e-6)
    assert "trajectory" in result.panel.toggles
