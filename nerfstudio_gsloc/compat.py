"""Compatibility fixes for nerfstudio 1.1.5 under torch 2.14, applied when the plugin is imported.

torch >= 2.6 loads checkpoints with ``weights_only=True``; nerfstudio's checkpoints (written by its own
trainer) hold a few plain Python / numpy objects that this safe unpickler rejects, so ``ns-viewer``,
``ns-eval``, ``ns-render``, ``ns-export`` and ``--load-dir`` fail. We allow exactly those types rather than
turning the safe loader off.
"""

from __future__ import annotations

import numpy as np
import torch


def allow_nerfstudio_checkpoints() -> None:
    """Register the non-tensor types found in nerfstudio checkpoints as safe for ``torch.load``."""
    safe = [np.core.multiarray.scalar, np.dtype, np.float64, np.float32, np.int64]
    dtype_classes = [type(np.dtype(name)) for name in ("float64", "float32", "int64")]
    torch.serialization.add_safe_globals(safe + dtype_classes)


def default_device_type() -> str:
    """``cuda`` where a GPU is usable, else ``cpu`` (nerfstudio's own default is always ``cuda``)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def install_gsloc_excepthook() -> None:
    """Show an uncaught :class:`~nerfstudio_gsloc.errors.GslocError` as one ``error:`` line, exit code 1.

    nerfstudio's own commands (``ns-train``, ``ns-eval``, ...) do not catch our errors; without this hook a
    bad input to a gsloc run would end in a traceback. Other exceptions keep the default hook.
    """
    import sys

    from nerfstudio_gsloc.errors import GslocError, print_error

    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, GslocError):
            print_error(str(exc))
            return
        previous(exc_type, exc, tb)

    if getattr(sys.excepthook, "__name__", "") != "hook":
        sys.excepthook = hook
