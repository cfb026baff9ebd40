"""Output files: writability checked before work, atomic writes that never leave a partial file, strict JSON."""

from __future__ import annotations

import errno
import json
import math

import pytest

from nerfstudio_gsloc import files
from nerfstudio_gsloc.files import OutputError, atomic_output, atomic_write_text, check_writable
from nerfstudio_gsloc.metrics import from_strict_json, to_strict_json


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_check_writable_leaves_no_trace_and_accepts_existing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    assert check_writable(target) == target
    assert not (tmp_path / "a").exists()  # the folders it created for the probe are removed again
    (tmp_path / "kept").mkdir()
    check_writable(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


def test_check_writable_names_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a regular file")
    with pytest.raises(OutputError) as info:
        check_writable(blocker / "out", "--output-dir")
    assert str(info.value) == f"cannot write to --output-dir {blocker / 'out'}: {blocker} is a file, not a folder"
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(blocker, "--output-dir")


def test_check_writable_refuses_a_read_only_folder(read_only_dir):
    with pytest.raises(OutputError) as info:
        check_writable(read_only_dir / "out", "--output-dir")
    message = str(info.value)
    assert message.startswith(f"cannot write to --output-dir {read_only_dir / 'out'}:") and "permission denied" in message
    assert "\n" not in message
    with pytest.raises(OutputError, match="permission denied"):
        check_writable(read_only_dir)


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "poses.json"
    atomic_write_text(target, '{"complete": true}')
    monkeypatch.setattr(files, "open", _FullDisk, raising=False)
    with pytest.raises(OutputError) as info:
        atomic_write_text(target, '{"complete": "never"}')
    assert str(info.value) == f"cannot write {target}: no space left on the device"
    assert info.value.path == target
    assert json.loads(target.read_text()) == {"complete": True}
    assert _leftovers(tmp_path) == []


def test_an_interrupt_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "trace.png"
    target.write_bytes(b"old plot")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half a plo")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old plot" and _leftovers(tmp_path) == []


def test_strict_json_writes_infinite_errors_as_strings_and_reads_them_back():
    metrics = {"rot_deg_mean": math.inf, "rot_deg_median": 0.5, "rates": [math.inf, -math.inf], "nan": math.nan}
    text = to_strict_json(metrics, indent=2)
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["rot_deg_mean"] == "inf"  # any strict parser reads it
    back = from_strict_json(text)
    assert back["rot_deg_mean"] == math.inf and back["rates"] == [math.inf, -math.inf] and math.isnan(back["nan"])
    # metrics.json files written before (bare Infinity) are still read.
    assert from_strict_json('{"rot_deg_mean": Infinity}')["rot_deg_mean"] == math.inf


def test_rewrites_are_throttled_to_a_small_share_of_the_time(monkeypatch):
    """A rewrite is due at most every min_seconds, and not before its last cost is max_fraction of the time since."""
    now = {"t": 100.0}
    monkeypatch.setattr(files.time, "perf_counter", lambda: now["t"])
    throttle = files.RewriteThrottle(min_seconds=2.0, max_fraction=0.05)
    assert throttle.due()  # nothing written yet
    with throttle.rewriting():
        now["t"] += 0.5  # a rewrite that took 0.5 s
    now["t"] += 2.0
    assert not throttle.due()  # 2 s since, but 0.5 s is 25% of that
    now["t"] += 7.9
    assert not throttle.due()
    now["t"] += 0.2  # 10.1 s since: 0.5 s is under 5%
    assert throttle.due()
    with throttle.rewriting():
        now["t"] += 0.01
    now["t"] += 1.0
    assert not throttle.due()  # cheap now, but min_seconds holds
    now["t"] += 1.0
    assert throttle.due()


def test_append_line_adds_one_line_and_names_the_file_when_it_fails(tmp_path, read_only_dir):
    path = tmp_path / "trials.jsonl"
    files.append_line(path, '{"a": 1}')
    files.append_line(path, '{"a": 2}')
    assert path.read_text().splitlines() == ['{"a": 1}', '{"a": 2}']
    with pytest.raises(OutputError, match=f"cannot write {read_only_dir / 'x.jsonl'}: permission denied"):
        files.append_line(read_only_dir / "x.jsonl", "{}")


def test_json_lines_skip_only_a_torn_last_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    files.append_line(path, '{"a": 1}')
    path.write_text(path.read_text() + '{"a": 2')  # a run killed while appending
    assert files.read_json_lines(path) == [{"a": 1}]
    path.write_text('{"a": 1\n\n{"a": 2}\n')
    with pytest.raises(files.JSONLinesError, match="line 1 is not JSON"):
        files.read_json_lines(path)
