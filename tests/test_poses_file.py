"""poses.json: round trip, the version-1 files of the earlier ns-localize, validation, atomic writes."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.camera_conventions import FrameTransform, to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_output, atomic_write_text
from nerfstudio_gsloc.poses_file import (
    POSES_VERSION,
    PoseRecord,
    PosesDocument,
    QuerySource,
    pose_to_original,
    read_poses,
    summarize_records,
    write_poses,
)


def _pose(axis_angle, translation) -> torch.Tensor:
    """``[4, 4]`` float64 rigid pose."""
    rot = axis_angle_to_rotation_matrix(torch.tensor(axis_angle, dtype=torch.float64))
    return to_homogeneous(torch.cat([rot, torch.tensor(translation, dtype=torch.float64)[:, None]], dim=1))


FRAME = FrameTransform(_pose([0.3, -0.5, 0.9], [0.4, -1.2, 2.0])[:3], 0.37, "test")
GT = _pose([0.7, 0.2, -0.4], [0.3, -0.8, 0.5])
# 2 degrees about z and 0.1 original units along x away from the ground truth.
REFINED = GT @ _pose([0.0, 0.0, math.radians(2.0)], [0.0, 0.0, 0.0]) + torch.tensor(
    [[0, 0, 0, 0.1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64
)


def _records():
    return [
        PoseRecord("b.png", "converged", REFINED, c2w_init=GT, c2w_gt=GT, index=1, reason="", loss=0.25,
                   iterations=40, inliers=55, seconds=1.5, confidence=0.9, image_path=None),
        PoseRecord("a.png", "failed", None, c2w_init=GT, c2w_gt=GT, index=0, reason="diverged", loss=float("nan"),
                   iterations=3, seconds=0.5),
        PoseRecord("c.png", "max_iterations", GT, c2w_init=REFINED, index=2, method="pnp", trial=4),
    ]


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "out" / "poses.json"
    document = PosesDocument(FRAME, QuerySource.transforms(tmp_path / "q.json"), _records(), {"init": "prior"})
    write_poses(path, document)
    raw = json.loads(path.read_text())
    assert raw["format"] == "gsloc-poses" and raw["version"] == POSES_VERSION
    assert raw["queries"] == {"kind": "transforms", "path": str((tmp_path / "q.json").resolve())}
    # Sorted by method, index, trial; a failed query without a pose is null; NaN loss is null (strict JSON).
    assert [r["image"] for r in raw["results"]] == ["a.png", "b.png", "c.png"]
    assert raw["results"][0]["transform_matrix"] is None and raw["results"][0]["loss"] is None
    back = read_poses(path)
    assert back.version == POSES_VERSION and back.settings == {"init": "prior"}
    assert back.queries == document.queries and not back.queries.is_eval_split
    torch.testing.assert_close(back.frame.transform, FRAME.transform)
    assert back.frame.scale == FRAME.scale
    by_name = {r.image: r for r in back.records}
    for original in _records():
        record = by_name[original.image]
        for key in ("status", "index", "method", "trial", "reason", "confidence", "iterations", "inliers", "seconds"):
            assert getattr(record, key) == getattr(original, key), key
        for key in ("c2w", "c2w_init", "c2w_gt"):
            mine, theirs = getattr(record, key), getattr(original, key)
            assert (mine is None) == (theirs is None)
            if mine is not None:
                torch.testing.assert_close(mine, theirs)
    assert by_name["b.png"].loss == 0.25 and by_name["a.png"].loss is None


def test_errors_and_summary_use_scene_units_and_count_failures(tmp_path):
    records = _records()
    rot, trans = records[0].errors(FRAME.scale)
    assert rot == pytest.approx(2.0, abs=1e-9) and trans == pytest.approx(0.1 * FRAME.scale)
    assert records[1].errors(FRAME.scale) == (None, None) and records[2].errors(FRAME.scale) == (None, None)
    summary = summarize_records(records, FRAME.scale)
    # c.png has no ground truth and is left out; a.png failed: infinite error, so an infinite mean and median.
    assert summary["num_queries"] == 2 and summary["num_failed"] == 1
    assert math.isinf(summary["rot_deg_mean"]) and math.isinf(summary["rot_deg_median"])
    assert summary["success_rates"]["5deg_0.05"] == 0.5
    assert summarize_records(records[2:], FRAME.scale) is None


def test_scene_poses_become_original_frame_records():
    scene = FRAME.to_scene(GT).float()  # [3, 4] float32, as a localizer returns it
    original = pose_to_original(FRAME, scene)
    assert original.shape == (4, 4) and original.dtype == torch.float64
    torch.testing.assert_close(original, GT, atol=1e-5, rtol=0)
    assert pose_to_original(FRAME, None) is None
    assert pose_to_original(FRAME, torch.full((3, 4), float("nan"))) is None  # a diverged query: no pose


def test_version_1_file_of_the_earlier_ns_localize_loads(tmp_path):
    """A file exactly as ns-localize wrote it before poses.json had a schema version."""
    old = {
        "convention": "OpenGL camera-to-world 4x4 (nerfstudio transforms.json), dataset's original frame",
        "frame": FRAME.to_json(),
        "settings": {"config": "/runs/config.yml", "queries": "eval split", "init": "perturb", "perturb_deg": 10.0,
                     "perturb_trans": 0.1, "seed": 0},
        "results": [
            {"image": "images/r_0.png", "image_path": "/data/images/r_0.png", "index": 0, "status": "converged",
             "reason": "", "transform_matrix": REFINED.tolist(), "initial_transform_matrix": GT.tolist(),
             "loss": 0.01, "iterations": 42, "match_inliers": 31, "seconds": 2.345,
             "gt_transform_matrix": GT.tolist(), "rot_err_deg": 2.0, "trans_err_scene": 0.037,
             "trans_err_original": 0.1},
            {"image": "images/r_1.png", "image_path": "/data/images/r_1.png", "index": 1, "status": "failed",
             "reason": "loss is not finite", "transform_matrix": [[math.nan] * 4] * 4,
             "initial_transform_matrix": GT.tolist(), "loss": None, "iterations": 5, "match_inliers": 0,
             "seconds": 0.5, "gt_transform_matrix": GT.tolist(), "rot_err_deg": None, "trans_err_scene": None,
             "trans_err_original": None},
        ],
    }
    path = tmp_path / "poses.json"
    path.write_text(json.dumps(old))  # json.dumps writes NaN as the old writer did
    document = read_poses(path)
    assert document.version == 1 and document.queries == QuerySource.eval_split()
    assert "queries" not in document.settings and document.settings["init"] == "perturb"
    first, second = document.records
    assert first.inliers == 31 and first.method == "gsloc" and first.trial is None and first.confidence is None
    assert str(first.image_path) == "/data/images/r_0.png"
    torch.testing.assert_close(first.c2w, REFINED)
    assert second.c2w is None and second.failed and second.reason == "loss is not finite"
    # Rewritten, it becomes a version-2 file that reads back the same.
    write_poses(tmp_path / "new.json", document)
    again = read_poses(tmp_path / "new.json")
    assert again.version == POSES_VERSION and again.queries.is_eval_split and len(again.records) == 2
    # The path form of version 1's settings.queries.
    old["settings"]["queries"] = "/data/new/transforms.json"
    path.write_text(json.dumps(old))
    assert read_poses(path).queries == QuerySource("transforms", Path("/data/new/transforms.json"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("frame"), "needs 'results' and 'frame'"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.update(format="other"), "format is 'other'"),
        (lambda d: d["frame"].update(scale=-1.0), "'frame'"),
        (lambda d: d.update(queries={"kind": "camera"}), "'queries'"),
        (lambda d: d["results"][0].pop("status"), "result 0: needs 'image', 'status'"),
        (lambda d: d["results"][0].update(transform_matrix=[[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
         "no proper rotation"),
        (lambda d: d["results"][0].update(transform_matrix=None), "null but the status is 'converged'"),
        (lambda d: d["results"][1].update(image="b.png"), "appears twice"),
        (lambda d: d["results"][0].update(iterations="many"), "iterations must be a number"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "poses.json"
    write_poses(path, PosesDocument(FRAME, QuerySource.eval_split(), _records()[:2]))
    document = json.loads(path.read_text())
    document["results"].sort(key=lambda r: r["image"] != "b.png")  # b.png (converged) first
    change(document)
    path.write_text(json.dumps(document))
    with pytest.raises(GslocError, match=message) as err:
        read_poses(path)
    assert "\n" not in str(err.value)
    with pytest.raises(GslocError, match="not found"):
        read_poses(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(GslocError, match="as JSON"):
        read_poses(tmp_path / "text.json")


def test_atomic_writes_have_normal_permissions_and_leave_nothing_behind(tmp_path):
    old_umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
        write_poses(tmp_path / "poses.json", PosesDocument(FRAME, QuerySource.eval_split(), _records()))
    finally:
        os.umask(old_umask)
    for name in ("sub/a.txt", "poses.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    # A writer that fails leaves the previous file intact and no temporary file.
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "sub" / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt"]
