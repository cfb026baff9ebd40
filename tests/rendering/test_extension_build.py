"""How the C++ kernels are built: always with the ninja beside the running Python, whatever PATH says."""

from __future__ import annotations

import os
import shutil
import sys

import torch.utils.cpp_extension

import nerfstudio_gsloc.rendering.extension as extension


def test_the_build_runs_the_ninja_beside_this_python(tmp_path, monkeypatch):
    """A venv's ninja and the system's record builds differently, so switching between them rebuilt every kernel
    (minutes). With a ninja beside the interpreter, that one is first on PATH while PyTorch builds, and PATH is
    restored afterwards; without one, PATH is left alone."""
    for has_own_ninja in (True, False):
        venv_bin = tmp_path / f"venv_{has_own_ninja}" / "bin"
        venv_bin.mkdir(parents=True)
        if has_own_ninja:
            ninja = venv_bin / "ninja"
            ninja.write_text("#!/bin/sh\necho 1.13.0\n")
            ninja.chmod(0o755)
        other_bin = tmp_path / f"system_{has_own_ninja}"
        other_bin.mkdir()
        (other_bin / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
        (other_bin / "ninja").chmod(0o755)
        path_before = str(other_bin) + os.pathsep + os.environ.get("PATH", "")
        monkeypatch.setenv("PATH", path_before)
        monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
        monkeypatch.setattr(extension, "_extension", None)
        monkeypatch.setattr(extension, "_extension_failed", False)
        seen = {}

        def fake_load(**kwargs):
            seen["ninja"] = shutil.which("ninja")
            return "built"

        monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
        assert extension.load_cpu_extension() == "built"
        expected = venv_bin / "ninja" if has_own_ninja else other_bin / "ninja"
        assert seen["ninja"] == str(expected)
        assert os.environ["PATH"] == path_before
