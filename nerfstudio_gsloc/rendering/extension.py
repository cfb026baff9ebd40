"""Builds and loads the C++ CPU kernels (``csrc/*.cpp``: projection, binning, compositing, and
the training optimizer's Adam step and loss's SSIM) on first use.

The build takes about a minute once per checkout and is cached by PyTorch in ``$TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``). Without a working C++ compiler the PyTorch implementations are
used instead, with one warning.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("bindings.cpp", "project_cpu.cpp", "rasterize_cpu.cpp", "sh_cpu.cpp", "adam_cpu.cpp", "ssim_cpu.cpp")

_extension = None
_extension_failed = False
_extension_lock = threading.Lock()


@contextmanager
def _ninja_beside_this_python():
    """Put the ``ninja`` installed beside the running Python (a virtual environment's, from PyPI) first on PATH.

    PyTorch builds with the first ``ninja`` on PATH. A venv's ninja (1.13 here) and the system's (1.11) record
    their builds differently, so calling the tools once with the venv activated and once by path
    (``.venv/bin/ns-train``) rebuilt every kernel at each switch: 1.5-4 minutes on 2 cores.
    """
    here = Path(sys.executable).parent
    if not (here / "ninja").exists():
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = str(here) + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def load_cpu_extension(verbose: bool = False):
    """Compile (first call) and return the C++ CPU kernel module, or None if it cannot be built.

    Set ``GSLOC_DISABLE_CPP=1`` to force the PyTorch path.
    """
    global _extension, _extension_failed
    if os.environ.get("GSLOC_DISABLE_CPP", "0") == "1":
        return None
    with _extension_lock:
        if _extension is None and not _extension_failed:
            try:
                from torch.utils.cpp_extension import load

                with _ninja_beside_this_python():
                    _extension = load(
                        # one build per checkout: two checkouts sharing a name would rebuild on every switch
                        name="gsloc_rasterize_cpu_" + hashlib.sha1(str(_CSRC.resolve()).encode()).hexdigest()[:8],
                        sources=[str(_CSRC / name) for name in _SOURCES],
                        # -ffast-math lets gcc vectorise expf over a tile's pixels; -march=native: built on the user's machine
                        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                        extra_ldflags=["-fopenmp"],
                        verbose=verbose,
                    )
            except Exception as err:  # no compiler, no headers: fall back, say so once
                _extension_failed = True
                warnings.warn(
                    f"gsloc: C++ CPU rasterizer could not be built ({type(err).__name__}: {err}); "
                    "using the slower PyTorch rasterizer"
                )
    return _extension
