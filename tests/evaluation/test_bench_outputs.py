"""gsloc-bench's outputs: checked before any work, saved per finished trial, one line on a full disk or Ctrl-C."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nerfstudio_gsloc import files, training
from nerfstudio_gsloc.errors import run_cli
from nerfstudio_gsloc.evaluation import report
from nerfstudio_gsloc.poses_file import read_poses
from nerfstudio_gsloc.scripts import bench_run
from nerfstudio_gsloc.scripts.bench import main


def _run(argv, capsys):
    code = 0
    try:
        run_cli(lambda: main([str(a) for a in argv]))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.strip().splitlines() if line.strip()]


def test_unwritable_output_dir_is_one_line_before_training(tmp_path, capsys, embedded_scene, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the results could not be written")

    monkeypatch.setattr(training, "train_or_reuse", no_training)
    blocker = tmp_path / "bench.txt"
    blocker.write_text("x")
    code, _, err = _run(["--data", embedded_scene, "--train-preset", "tiny", "--output-dir", blocker / "out"], capsys)
    assert code == 1 and err == [f"error: cannot write to --output-dir {blocker / 'out'}: {blocker} is a file, not a folder"]


def test_merge_into_a_read_only_folder_is_one_line(tmp_path, capsys, read_only_dir):
    code, _, err = _run(["--merge", tmp_path / "a", tmp_path / "b", "--output-dir", read_only_dir], capsys)
    assert code == 1 and err == [f"error: cannot write to --output-dir {read_only_dir}: permission denied"]


def _bench_args(run, out):
    return ["--load-config", run, "--output-dir", out, "--methods", "pnp", "--trials", "2", "--max-queries", "2",
            "--method-settings.pnp.num-views", "4", "--threads", "1"]


class _FullDisk:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_every_trial_saved_before(tmp_path, capsys, monkeypatch, small_gsloc_run):
    out = tmp_path / "bench"
    real_open = open
    writes = {"n": 0}

    def open_until_full(path, *args, **kwargs):
        if Path(path) == out / "trials.jsonl" and args[:1] == ("a",):  # one line appended per finished trial
            writes["n"] += 1
            if writes["n"] > 2:
                return _FullDisk()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_until_full, raising=False)
    code, _, err = _run(_bench_args(small_gsloc_run, out), capsys)
    assert code == 1 and err == [
        f"error: cannot write {out / 'trials.jsonl'}: no space left on the device; {out} keeps 2 trials saved "
        "before; lost: 2 trials and the summaries (results.md, plots)"
    ]
    assert len(report.read_trials_jsonl(out / "trials.jsonl")) == 2
    assert not (out / "results.md").exists() and not any(p.name.startswith(".") for p in out.iterdir())


def test_ctrl_c_mid_benchmark_is_one_line_and_keeps_finished_trials(tmp_path, capsys, monkeypatch, small_gsloc_run):
    out = tmp_path / "bench"
    real_append = bench_run.append_line
    calls = {"n": 0}

    def interrupted_after_one(path, line):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_append(path, line)

    monkeypatch.setattr(bench_run, "append_line", interrupted_after_one)
    monkeypatch.setattr(files.RewriteThrottle, "due", lambda self: False)  # poses.json only at the start and on Ctrl-C
    code, _, err = _run(_bench_args(small_gsloc_run, out), capsys)
    assert code == 130 and err == [
        f"interrupted: {out / 'trials.jsonl'} and {out / 'poses.json'} hold 1 trial of 4; the summaries "
        "(results.md, plots) are not complete"
    ]
    assert len(report.read_trials_jsonl(out / "trials.jsonl")) == 1
    assert len(read_poses(out / "poses.json").records) == 1


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
