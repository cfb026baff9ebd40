"""Tests of `ns-localize`: every bad input is one error line and exit 1 before any output; real runs localize."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nerfstudio_gsloc.localize.pose import perturb_pose
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.poses_file import read_poses
from nerfstudio_gsloc.scripts.localize_outputs import read_metrics

from cli_helpers import FAST, run_ns_localize


_run = run_ns_localize


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, embedded_scene, write_fake_run):
    """A run folder that passes the pre-load checks (config, checkpoint file, dataset) without a real model."""
    frame = {"transform": np.eye(4)[:3].tolist(), "scale": 0.5}
    return write_fake_run(tmp_path_factory.mktemp("fake_run"), Path(embedded_scene.dataset).parent, frame)


def _query_file(folder: Path, embedded_scene, edit=None) -> Path:
    """A copy of the embedded query set's transforms.json in ``folder`` (pointing at its images), edited."""
    meta = json.loads(Path(embedded_scene.queries).read_text())
    source = Path(embedded_scene.queries).parent
    for frame in meta["frames"]:
        for key in ("file_path", "depth_file_path"):
            frame[key] = str(source / frame[key])
    if edit is not None:
        edit(meta, folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "transforms.json"
    path.write_text(json.dumps(meta))
    return path


def _bad_image(meta, folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    meta["frames"][1]["file_path"] = str(folder / "broken.png")


def _missing_image(meta, folder):
    meta["frames"][2]["file_path"] = str(folder / "gone.png")


def _missing_intrinsics(meta, folder):
    del meta["frames"][0]["fl_x"]


def _size_mismatch(meta, folder):
    meta["frames"][0]["w"] = meta["frames"][0]["w"] + 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_config", "config not found"),
        ("not_a_config", "nerfstudio"),
        ("missing_checkpoint", "no checkpoint"),
        ("missing_query_file", "query file not found"),
        ("missing_image", "image not found"),
        ("unreadable_image", "cannot read image"),
        ("missing_intrinsics", "missing intrinsics fl_x"),
        ("size_mismatch", "but its intrinsics say"),
        ("unknown_preset", "unknown preset"),
        ("prior_without_priors", "needs a prior pose"),
    ],
)
def test_bad_inputs_exit_1_with_one_line_and_no_output(tmp_path, capsys, fake_run, embedded_scene, case, message):
    config = fake_run
    out_dir = tmp_path / "out"
    extra = []
    if case == "missing_config":
        config = tmp_path / "nope" / "config.yml"
    elif case == "not_a_config":
        config = tmp_path / "config.yml"
        config.write_text("just: a yaml file\n")
    elif case == "missing_checkpoint":
        from nerfstudio_gsloc.method import gsloc_trainer_config

        run = gsloc_trainer_config(max_iterations=10)
        run.pipeline.datamanager.data = Path(embedded_scene.dataset).parent
        run.output_dir, run.experiment_name, run.timestamp = tmp_path / "o", "scene", "nockpt"
        run.save_config()
        config = run.get_base_dir() / "config.yml"
    elif case == "missing_query_file":
        extra = ["--queries", tmp_path / "none" / "transforms.json"]
    elif case == "unknown_preset":
        extra = ["--preset", "no-such-preset"]
    elif case == "prior_without_priors":
        extra = ["--queries", _query_file(tmp_path / "q", embedded_scene), "--init", "prior"]
    else:
        edit = {"missing_image": _missing_image, "unreadable_image": _bad_image,
                "missing_intrinsics": _missing_intrinsics, "size_mismatch": _size_mismatch}[case]
        extra = ["--queries", _query_file(tmp_path / "q", embedded_scene, edit)]
    code, out, err = _run(["--load-config", config, "--output-dir", out_dir, *extra], capsys)
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out_dir.exists()


def test_console_script_exit_code_and_single_line(tmp_path):
    """The real process: exit status 1 and a single ``error:`` line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "nerfstudio_gsloc.scripts.localize", "--load-config", str(tmp_path / "missing.yml"),
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "config not found" in lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# with a trained run
# ----------------------------------------------------------------------------------------------------------


def _priors_from_perturbed_gt(meta, folder):
    """Give each query a prior: its ground truth rotated 5 deg and moved 0.1 m (original units)."""
    for index, frame in enumerate(meta["frames"]):
        gt = torch.tensor(frame["transform_matrix"], dtype=torch.float64)[None]
        prior = perturb_pose(gt, 5.0, 0.1, torch.Generator().manual_seed(index))[0]
        frame["prior_transform_matrix"] = torch.cat([prior, torch.tensor([[0.0, 0, 0, 1]], dtype=torch.float64)]).tolist()


def test_new_images_from_a_transforms_json_are_localized(tmp_path, capsys, small_gsloc_run, embedded_scene):
    """Novel views (never in the dataset, another image size) start from priors and end near the truth."""
    queries = _query_file(tmp_path / "q", embedded_scene, _priors_from_perturbed_gt)
    out_dir = tmp_path / "out"
    code, out, err = _run(["--load-config", small_gsloc_run, "--output-dir", out_dir, "--queries", queries, *FAST], capsys)
    assert code == 0, err
    poses = json.loads((out_dir / "poses.json").read_text())
    meta = json.loads(queries.read_text())
    assert all(0.0 <= entry["confidence"] <= 1.0 for entry in poses["results"])
    assert poses["settings"]["init"] == "prior" and len(poses["results"]) == len(meta["frames"])
    assert poses["queries"] == {"kind": "transforms", "path": str(queries.resolve())}
    document = read_poses(out_dir / "poses.json")
    for entry, record, frame in zip(poses["results"], document.records, meta["frames"]):
        # No confident wrong pose: a view the check doubts (56x42 pixels give few map matches) may be rejected.
        assert entry["image"] == frame["file_path"] and entry["status"] in ("converged", "max_iterations", "rejected")
        if entry["status"] == "rejected":
            assert entry["confidence"] < 0.5 and entry["reason"].startswith("rejected: confidence")
            continue
        refined = torch.tensor(entry["transform_matrix"], dtype=torch.float64)[None]
        start = torch.tensor(entry["initial_transform_matrix"], dtype=torch.float64)[None]
        truth = torch.tensor(frame["transform_matrix"], dtype=torch.float64)[None]
        prior = torch.tensor(frame["prior_transform_matrix"], dtype=torch.float64)[None]
        # Written in the original frame: the initial pose is the prior as given.
        torch.testing.assert_close(start, prior, atol=1e-5, rtol=0)
        rot, trans = rotation_error_deg(refined, truth).item(), translation_error(refined, truth).item()
        assert rot < 1.5 and trans < 0.05, (rot, trans, entry["reason"], entry["confidence"])  # from 5 deg / 0.1 m
        assert record.errors(document.frame.scale)[0] == pytest.approx(rot, abs=1e-6)
        torch.testing.assert_close(record.c2w_gt[None], truth)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    accepted = sum(entry["status"] != "rejected" for entry in poses["results"])
    assert accepted >= 2 and metrics["precision"] == 1.0
    assert metrics["num_queries"] == len(meta["frames"])
    assert metrics["success_rates_scene_units"]["5deg_0.05"] == pytest.approx(accepted / len(meta["frames"]))
    assert (out_dir / "trace.csv").read_text().startswith("query,index,iteration")
    assert (out_dir / "trace.png").stat().st_size > 1000
    assert "rotation error (deg)" in out


def test_eval_split_resume_and_interrupt(tmp_path, capsys, monkeypatch, small_gsloc_run):
    """Default queries (eval split) from perturbed poses; --resume skips finished ones; Ctrl-C keeps a valid file."""
    out_dir = tmp_path / "out"
    base = ["--load-config", small_gsloc_run, "--output-dir", out_dir, "--init", "perturb", "--perturb-deg", "5",
            "--perturb-trans", "0.05", *FAST]
    code, _, err = _run([*base, "--max-queries", "1"], capsys)
    assert code == 0, err
    first = json.loads((out_dir / "poses.json").read_text())["results"]
    document = read_poses(out_dir / "poses.json")
    assert len(first) == 1 and document.queries.is_eval_split
    # localized, not only written (accuracy is the optimizer tests' business: this view of the 250-step model
    # ends 2-3 deg off with any solver)
    assert document.records[0].errors(document.frame.scale)[0] < 0.7 * 5.0

    # Interrupt after the first new query is saved: poses.json stays valid and holds what finished.
    from nerfstudio_gsloc.localize import pipeline as pipeline_module

    real_localize = pipeline_module.PoseInversion.localize

    def interrupted(self, queries, initial_c2w=None, on_result=None, on_step=None):
        real_localize(self, queries[:1], initial_c2w[:1], on_result=on_result, on_step=on_step)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module.PoseInversion, "localize", interrupted)
    code, out, err = _run([*base, "--resume"], capsys)
    assert code == 130 and err.strip().splitlines() == [f"interrupted: {out_dir / 'poses.json'} holds 2 queries of 3; "
                                                        "rerun with --resume to continue"]
    partial = json.loads((out_dir / "poses.json").read_text())["results"]
    assert len(partial) == 2 and partial[0] == first[0]
    monkeypatch.setattr(pipeline_module.PoseInversion, "localize", real_localize)

    # Resume: only the remaining eval views are localized; earlier entries are kept unchanged.
    code, out, err = _run([*base, "--resume"], capsys)
    assert code == 0, err
    assert "2 already done" in out
    final = json.loads((out_dir / "poses.json").read_text())["results"]
    assert final[:2] == partial and len(final) >= 3
    metrics = read_metrics(out_dir / "metrics.json")
    assert metrics["num_queries"] == len(final)
    # A resume with other settings is refused rather than mixing two protocols in one file.
    code, _, err = _run([*base[:-len(FAST)], "--seed", "3", "--resume", *FAST], capsys)
    assert code == 1 and "cannot resume" in err


@pytest.mark.parametrize(
    "method, options",
    [
        ("pnp", ["--pnp.num-views", "4"]),
        ("photometric", ["--localization.schedule.pyramid-scales", "2", "1", "--localization.schedule.refine-matching-weight",
                         "--single-loss.pyramid-iterations", "15", "15"]),
    ],
)
def test_method_option_runs_any_registered_localizer(tmp_path, capsys, small_gsloc_run, method, options):
    """``--method`` runs another localizer through the same call; its poses.json says which method wrote it."""
    out_dir = tmp_path / method
    argv = ["--load-config", small_gsloc_run, "--output-dir", out_dir, "--max-queries", "1", "--init", "perturb", "--perturb-deg", "3",
            "--perturb-trans", "0.03", "--seed", "5", "--num-threads", "1", "--method", method, *options]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert f"with {method} from perturb poses" in out
    document = read_poses(out_dir / "poses.json")
    assert len(document.records) == 1 and document.settings["method"] == method
    record = document.records[0]
    assert record.method == method and not record.failed and record.c2w is not None
    rot, _ = record.errors(document.frame.scale)
    start = rotation_error_deg(record.c2w_init[None], record.c2w_gt[None]).item()
    assert start == pytest.approx(3.0, abs=1e-3) and rot < start, (rot, start)
    if method == "pnp":
        assert record.iterations == 0 and record.inliers >= 12
    else:
        assert 0 < record.iterations <= 30
    assert json.loads((out_dir / "metrics.json").read_text())["num_queries"] == 1


def test_unknown_method_is_one_error_line(tmp_path, capsys, fake_run):
    code, _, err = _run(["--load-config", fake_run, "--output-dir", tmp_path / "o", "--method", "magic"], capsys)
    assert code == 1 and err.startswith("error:") and "unknown method 'magic'" in err and len(err.strip().splitlines()) == 1
