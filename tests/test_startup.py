"""What every command shares: known third-party warnings hidden, Ctrl-C at any moment one line and exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from nerfstudio_gsloc.errors import run_cli
from nerfstudio_gsloc.startup import silence_known_warnings

REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _lines(text: str):
    return [line for line in text.strip().splitlines() if line.strip()]


def test_only_the_known_warnings_are_silenced():
    jit = "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."
    amp = "`torch.cuda.amp.custom_fwd(args...)` is deprecated. Please use `torch.amp.custom_fwd(args..., device_type='cuda')` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn_explicit(jit, FutureWarning, "_script.py", 1, module="torch.jit._script")
        warnings.warn_explicit(amp, FutureWarning, "activations.py", 32, module="nerfstudio.field_components.activations")
        # Same words from elsewhere, or another warning from the same place, still show.
        warnings.warn_explicit(jit, FutureWarning, "mine.py", 1, module="nerfstudio_gsloc.mine")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "_script.py", 2, module="torch.jit._script")
        warnings.warn_explicit(jit, DeprecationWarning, "_script.py", 3, module="torch.jit._script")
    assert [(w.category, w.lineno) for w in caught] == [(FutureWarning, 1), (FutureWarning, 2), (DeprecationWarning, 3)]


def test_the_commands_import_nerfstudio_without_warnings():
    """The nerfstudio modules that warn at import (under torch 2.14) print nothing once a command has started.

    (Without ``import nerfstudio_gsloc.scripts`` these imports print three FutureWarnings; importing them is what
    ``ns-localize`` does when it loads a run.)"""
    code = ("import nerfstudio_gsloc.scripts; "
            "import nerfstudio.utils.misc, nerfstudio.cameras.camera_utils, nerfstudio.field_components.activations")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_sigint)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr



def _default_sigint() -> None:
    """Children get Ctrl-C's default action: a shell starting the suite in the background (``cmd &``) makes
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130():
    """SIGINT while a command is still importing torch: one ``interrupted:`` line, status 130, no traceback."""
    code = ("import os, signal, nerfstudio_gsloc.scripts\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "import nerfstudio_gsloc.scripts.make_scene\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_default_sigint)
    assert proc.returncode == 130
    assert _lines(proc.stderr) == ["interrupted: stopped by Ctrl-C while starting; nothing was written"]


def test_ctrl_c_inside_a_command_is_one_line_and_exit_130(capsys):
    def body():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_cli(body)
    assert info.value.code == 130
    assert _lines(capsys.readouterr().err) == ["interrupted: stopped by Ctrl-C; no file was left half-written"]


def test_make_scene_refuses_a_path_under_a_file(tmp_path, capsys):
    from nerfstudio_gsloc.scripts import make_scene

    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    sys_argv = sys.argv
    sys.argv = ["gsloc-make-scene", "--output-dir", str(blocker / "scene"), "--num-views", "8"]
    try:
        with pytest.raises(SystemExit) as info:
            make_scene.entrypoint()
    finally:
        sys.argv = sys_argv
    assert info.value.code == 1
    assert _lines(capsys.readouterr().err) == [
        f"error: cannot write to output directory {blocker / 'scene'}: {blocker} is a file, not a folder"
    ]


def test_sigint_while_make_scene_writes_leaves_whole_images_and_one_line(tmp_path):
    """A real SIGINT to gsloc-make-scene while it writes images: exit 130, one line, no partial file."""
    from PIL import Image

    out = tmp_path / "scene"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nerfstudio_gsloc.scripts.make_scene", "--output-dir", str(out), "--num-views", "2000",
         "--width", "48", "--height", "32", "--no-depth"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "images").is_dir() and len(list((out / "images").glob("frame_*.png"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert _lines(err) == [
        f"interrupted: {out} is incomplete (transforms.json is written only after every view); run the command again"
    ], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not (out / "transforms.json").exists()
    written = list((out / "images").iterdir())
    assert written and all(p.name.startswith("frame_") for p in written)  # no temporary files left
    for path in written:
        with Image.open(path) as image:
            image.load()  # every image that exists is whole


def test_make_scene_on_a_full_disk_is_one_line_and_no_partial_image(tmp_path, capsys, monkeypatch):
    from nerfstudio_gsloc import files
    from nerfstudio_gsloc.scripts import make_scene

    real_replace = files.os.replace
    moved = {"n": 0}

    def replace_until_full(src, dst):
        moved["n"] += 1
        if moved["n"] > 3:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_until_full)
    out = tmp_path / "scene"
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: make_scene.MakeScene(output_dir=out, num_views=8, width=24, height=16, depth=False).main())
    assert info.value.code == 1
    assert _lines(capsys.readouterr().err) == [
        f"error: cannot write {out / 'images' / 'frame_00003.png'}: no space left on the device; {out} is incomplete "
        "(no transforms.json), the views already written are whole"
    ]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert not (out / "transforms.json").exists()
