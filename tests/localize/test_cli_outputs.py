"""ns-localize's outputs: an unwritable --output-dir, a full disk, Ctrl-C anywhere and a method that cannot apply
each end in one line, with every file in --output-dir complete and --resume able to continue."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from nerfstudio_gsloc import files, runs
from nerfstudio_gsloc.poses_file import read_poses
from nerfstudio_gsloc.scripts import localize_outputs
from nerfstudio_gsloc.scripts.localize_outputs import read_metrics

from cli_helpers import run_ns_localize

FAST = [
    "--num-threads", "1",
    "--localization.schedule.matching-iterations", "20",
    "--localization.schedule.pyramid-scales", "1",
    "--localization.schedule.pyramid-iterations", "6",
    "--localization.schedule.refine-matching-weight",
]


def _run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, the non-empty stderr lines)."""
    code, out, err = run_ns_localize(argv, capsys)
    return code, out, [line for line in err.strip().splitlines() if line.strip()]


def _no_partial_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") for p in folder.iterdir())


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, embedded_scene, write_fake_run):
    frame = {"transform": np.eye(4)[:3].tolist(), "scale": 0.5}
    return write_fake_run(tmp_path_factory.mktemp("fake_run"), Path(embedded_scene.dataset).parent, frame)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading the model."""
    def load_run(*args, **kwargs):
        raise AssertionError("the model was loaded although the input is bad")

    monkeypatch.setattr(runs, "load_run", load_run)


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unwritable_output_dir_is_one_line_before_any_work(tmp_path, capsys, fake_run, no_model_load, where, request):
    if where == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        out_dir, reason = blocker / "out", f"{blocker} is a file, not a folder"
    else:
        out_dir, reason = request.getfixturevalue("read_only_dir") / "out", "permission denied"
    code, out, err = _run(["--load-config", fake_run, "--output-dir", out_dir], capsys)
    assert code == 1 and err == [f"error: cannot write to --output-dir {out_dir}: {reason}"]
    assert not out_dir.exists()


def test_depth_method_on_queries_without_depth_is_one_line_upfront(tmp_path, capsys, fake_run, embedded_scene,
                                                                   no_model_load):
    meta = json.loads(Path(embedded_scene.queries).read_text())
    source = Path(embedded_scene.queries).parent
    for frame in meta["frames"]:
        frame["file_path"] = str(source / frame["file_path"])
        frame.pop("depth_file_path", None)
    queries = tmp_path / "rgb_only.json"
    queries.write_text(json.dumps(meta))
    out_dir = tmp_path / "out"
    code, _, err = _run(["--load-config", fake_run, "--output-dir", out_dir, "--queries", queries, "--method", "depth"],
                        capsys)
    assert code == 1 and err == [
        f"error: --method depth needs query depth images (depth_file_path), and none of the {len(meta['frames'])} "
        "queries has one: use another method (gsloc, photometric, icomma, pnp)"
    ]
    assert not out_dir.exists()


def test_depth_method_on_an_rgb_only_run_is_one_line_before_loading(tmp_path, capsys, embedded_scene, write_fake_run,
                                                                    no_model_load):
    meta = json.loads(Path(embedded_scene.dataset).read_text())
    for frame in meta["frames"]:
        frame.pop("depth_file_path", None)
    rgb_only = tmp_path / "rgb_only"
    rgb_only.mkdir()
    (rgb_only / "transforms.json").write_text(json.dumps(meta))
    run = write_fake_run(tmp_path / "run", rgb_only, {"transform": np.eye(4)[:3].tolist(), "scale": 1.0})
    code, _, err = _run(["--load-config", run, "--output-dir", tmp_path / "out", "--method", "depth"], capsys)
    assert code == 1 and err == [
        "error: --method depth needs query depth images (depth_file_path), and the run's eval split has none: use "
        "another method (gsloc, photometric, icomma, pnp)"
    ]


def test_ctrl_c_while_loading_is_one_line_and_writes_nothing(tmp_path, capsys, fake_run, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "load_run", interrupted)
    out_dir = tmp_path / "out"
    code, _, err = _run(["--load-config", fake_run, "--output-dir", out_dir], capsys)
    assert code == 130 and err == ["interrupted: stopped by Ctrl-C; no file was left half-written"]
    assert not out_dir.exists()


class _FullDisk:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


class _NeverDue(localize_outputs.RewriteThrottle):
    """poses.json rewritten only at the start and at the end (the throttle is time-based, so tests fix it)."""

    def due(self) -> bool:
        return False


def test_a_full_disk_mid_run_keeps_the_finished_queries_and_resume_continues(tmp_path, capsys, monkeypatch,
                                                                               small_gsloc_run):
    """The journal takes the first finished query, then the disk is full: one error line saying what is kept and
    lost; --resume folds the journal into poses.json and localizes the rest."""
    out_dir = tmp_path / "out"
    journal = out_dir / localize_outputs.JOURNAL_FILE
    real_open = open
    appends = {"n": 0}

    def open_until_full(path, *args, **kwargs):
        if Path(path) == journal:
            appends["n"] += 1
            if appends["n"] > 1:
                return _FullDisk()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_until_full, raising=False)
    monkeypatch.setattr(localize_outputs, "RewriteThrottle", _NeverDue)
    base = ["--load-config", small_gsloc_run, "--output-dir", out_dir, "--perturb-deg", "3", "--perturb-trans", "0.03",
            "--localization.optim.batch-size", "1", *FAST]
    code, _, err = _run(base, capsys)
    poses = out_dir / "poses.json"
    assert code == 1 and err == [
        f"error: cannot write {journal}: no space left on the device; {poses} keeps 0 queries saved before and "
        f"{journal} 1 more (--resume folds them in); lost: the query just finished and 1 query not yet localized "
        "(rerun with --resume once the folder can be written)"
    ]
    assert read_poses(poses).records == [] and len(localize_outputs.read_journal(journal)) == 1
    assert _no_partial_files(out_dir) and not (out_dir / "metrics.json").exists()

    monkeypatch.setattr(files, "open", real_open, raising=False)
    code, out, err = _run([*base, "--resume"], capsys)
    assert code == 0, err
    assert "recovered 1 finished queries" in out and "localizing 2 queries (1 already done)" in out
    assert len(read_poses(poses).records) == 3 and read_metrics(out_dir / "metrics.json")["num_queries"] == 3
    assert not journal.exists()  # folded into poses.json at the end
    rows = localize_outputs.read_trace_csv(out_dir / "trace.csv")
    assert {row["query"] for row in rows} == {r.image for r in read_poses(poses).records}


def test_ctrl_c_mid_run_writes_every_finished_query_into_poses_json(tmp_path, capsys, monkeypatch, small_gsloc_run):
    """Between rewrites the finished queries are only in the journal; Ctrl-C still leaves them in poses.json."""
    out_dir = tmp_path / "out"
    monkeypatch.setattr(localize_outputs, "RewriteThrottle", _NeverDue)
    real_add = localize_outputs.LocalizeOutputs.add

    def add_then_interrupt(self, record, trace):
        real_add(self, record, trace)
        raise KeyboardInterrupt

    monkeypatch.setattr(localize_outputs.LocalizeOutputs, "add", add_then_interrupt)
    code, _, err = _run(["--load-config", small_gsloc_run, "--output-dir", out_dir, "--perturb-deg", "3",
                         "--perturb-trans", "0.03", "--localization.optim.batch-size", "1", *FAST], capsys)
    assert code == 130 and err == [
        f"interrupted: {out_dir / 'poses.json'} holds 1 query of 3; rerun with --resume to continue"
    ]
    assert len(read_poses(out_dir / "poses.json").records) == 1 and not (out_dir / localize_outputs.JOURNAL_FILE).exists()


def test_a_journal_torn_by_a_crash_loses_only_its_last_line(tmp_path):
    journal = tmp_path / localize_outputs.JOURNAL_FILE
    entry = {"record": {"image": "a"}, "trace": [{"iteration": 0}]}
    journal.write_text(json.dumps(entry) + "\n" + json.dumps(entry)[:20])
    assert localize_outputs.read_journal(journal) == [({"image": "a"}, [{"iteration": 0}])]
    journal.write_text(json.dumps(entry)[:20] + "\n" + json.dumps(entry) + "\n")
    with pytest.raises(Exception, match="line 1 is not a journal entry"):
        localize_outputs.read_journal(journal)


def test_ctrl_c_while_writing_the_summaries_keeps_whole_files_and_resume_writes_them(tmp_path, capsys, monkeypatch,
                                                                                   small_gsloc_run):
    out_dir = tmp_path / "out"
    base = ["--load-config", small_gsloc_run, "--output-dir", out_dir, "--max-queries", "1", "--perturb-deg", "3",
            "--perturb-trans", "0.03", *FAST]
    real_plot = localize_outputs.plot_trace

    def interrupted_plot(path, rows):
        with files.atomic_output(path) as tmp:
            tmp.write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt

    monkeypatch.setattr(localize_outputs, "plot_trace", interrupted_plot)
    code, _, err = _run(base, capsys)
    assert code == 130 and err == [
        f"interrupted: {out_dir / 'poses.json'} holds every query (1 query); rerun with --resume to write trace.png"
    ]
    assert not (out_dir / "trace.png").exists() and _no_partial_files(out_dir)
    assert read_metrics(out_dir / "metrics.json")["num_queries"] == 1  # written before, complete
    assert (out_dir / "trace.csv").read_text().startswith("query,index,iteration")

    monkeypatch.setattr(localize_outputs, "plot_trace", real_plot)
    code, out, err = _run([*base, "--resume"], capsys)
    assert code == 0, err
    assert "localizing 0 queries (1 already done)" in out and (out_dir / "trace.png").stat().st_size > 1000
