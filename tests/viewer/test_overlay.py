"""The localization overlay on a real viser server, checked against nerfstudio's own training-camera frustums."""

from __future__ import annotations

import json
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
    for kind in ("refined", "gt"):  # both equal the training camera's pose
        np.testing.assert_allclose(
            sent[("SetPositionMessage", f"{node}/{kind}")].position, sent[("SetPositionMessage", train)].position, atol=1e-9
        )
        ours = np.array(sent[("SetOrientationMessage", f"{node}/{kind}")].wxyz)
        theirs = np.array(sent[("SetOrientationMessage", train)].wxyz)
        assert min(np.abs(ours - theirs).max(), np.abs(ours + theirs).max()) < 1e-6  # q and -q: same rotation
        frustum = sent[("CameraFrustumMessage", f"{node}/{kind}")]
        nerfstudio = sent[("CameraFrustumMessage", train)]
        assert frustum.fov == pytest.approx(nerfstudio.fov) and frustum.aspect == pytest.approx(nerfstudio.aspect)
        assert frustum.scale == pytest.approx(nerfstudio.scale)
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
    # Thumbnail on the refined frustum when the image exists; none for the missing image.
    assert sent[("CameraFrustumMessage", f"{a}/refined")].image_binary is not None
    assert sent[("CameraFrustumMessage", f"{b}/refined")].image_binary is None
    # The error table lists both queries.
    assert "query_a.png | converged" in result.markdown.content and "query_b.png | failed" in result.markdown.content


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
    monkeypatch.setattr(view, "_start_nerfstudio_viewer", lambda *args: started.append(args))
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
    table = result.markdown.content
    assert "q.png [pnp] trial 0 | failed | - | - |" in table and "q.png [gsloc] trial 1 | converged | 0.000 | 0.0000 |" in table
