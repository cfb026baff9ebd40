"""User-facing errors: one clear line, no traceback."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from rich.console import Console

T = TypeVar("T")


class GslocError(Exception):
    """Raised for bad user input (paths, configs, images, devices). Its message is one line for the user."""


def run_cli(main: Callable[[], T]) -> T:
    """Run a CLI body, turning :class:`GslocError` into ``error: ...`` on stderr and exit code 1."""
    try:
        return main()
    except GslocError as err:
        print_error(str(err))
        sys.exit(1)


def print_error(message: str) -> None:
    """Print ``error: message`` in red on stderr."""
    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
