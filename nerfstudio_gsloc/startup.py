"""What the project's own commands set up before their heavy imports (torch, nerfstudio): quiet, interruptible.

Imported by :mod:`nerfstudio_gsloc.scripts` (so by ``ns-localize``, ``gsloc-bench``, ``gsloc-view``,
``gsloc-make-scene`` and ``gsloc-render-bench``, not by ``ns-train`` or other users of the package). Standard
library only, so it runs before anything slow.

* :func:`silence_known_warnings`: the deprecation warnings that nerfstudio 1.1.5's imports trigger under
  torch 2.14, which a user can do nothing about, are filtered by category, module and message; every other
  warning still shows.
* :func:`install_interrupt_hook`: Ctrl-C while the commands import torch and nerfstudio (a few seconds) ends with
  one ``interrupted:`` line and exit code 130 instead of a traceback. Once a command runs,
  :func:`nerfstudio_gsloc.errors.run_cli` handles Ctrl-C itself.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Tuple

#: (category, module regex, message regex) of the third-party warnings the commands hide.
KNOWN_WARNINGS: Tuple[Tuple[type, str, str], ...] = (
    # nerfstudio decorates functions with torch.jit.script at import time (fields, cameras, ...)
    (FutureWarning, r"torch\.jit\._script", r"`torch\.jit\.script` is deprecated"),
    # nerfstudio.field_components.activations uses torch.cuda.amp.custom_fwd / custom_bwd
    (FutureWarning, r"nerfstudio\.", r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated"),
)

INTERRUPTED_AT_STARTUP = "stopped by Ctrl-C while starting; nothing was written"


def silence_known_warnings() -> None:
    """Hide :data:`KNOWN_WARNINGS` (only those) for the rest of the process."""
    for category, module, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def install_interrupt_hook() -> None:
    """Turn a ``KeyboardInterrupt`` that reaches the top level (Ctrl-C during imports) into one line, exit 130.

    Python would print a traceback and exit by SIGINT; the hook prints ``interrupted: ...`` on stderr and exits
    with status 130 (what a shell reports for SIGINT) straight away, as there is nothing to clean up yet.
    Other exceptions keep the previous hook.
    """
    previous = sys.excepthook
    if getattr(previous, "_gsloc_interrupt_hook", False):
        return

    def gsloc_interrupt_hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            try:
                sys.stdout.flush()
            except Exception:  # a closed stdout must not hide the line below
                pass
            sys.stderr.write(f"interrupted: {INTERRUPTED_AT_STARTUP}\n")
            sys.stderr.flush()
            os._exit(130)
        previous(exc_type, exc, tb)

    gsloc_interrupt_hook._gsloc_interrupt_hook = True  # type: ignore[attr-defined]
    sys.excepthook = gsloc_interrupt_hook
