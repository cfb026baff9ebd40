"""User-facing errors and interruptions: one clear line, no traceback.

Exit codes of every gsloc command: 0 done, 1 an ``error:`` line (bad input, an output that cannot be written),
130 interrupted (Ctrl-C), as a shell reports a command killed by SIGINT.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from rich.console import Console

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class GslocError(Exception):
    """Raised for bad user input (paths, configs, images, devices). Its message is one line for the user."""


class Interrupted(Exception):
    """Raised by a command that caught Ctrl-C after saving what was finished; the message says what was saved."""


def run_cli(main: Callable[[], T]) -> T:
    """Run a CLI body: :class:`GslocError` -> ``error: ...`` and exit 1; Ctrl-C -> ``interrupted: ...`` and exit 130."""
    try:
        return main()
    except GslocError as err:
        print_error(str(err))
        sys.exit(EXIT_ERROR)
    except Interrupted as err:
        print_interrupted(str(err))
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print_interrupted("stopped by Ctrl-C; no file was left half-written")
        sys.exit(EXIT_INTERRUPTED)


def count(number: int, noun: str, plural: str = "") -> str:
    """``"1 query"``, ``"3 queries"``: a number with its noun, for messages."""
    return f"{number} {noun if number == 1 else (plural or noun + 's')}"


def print_error(message: str) -> None:
    """Print ``error: message`` in red on stderr."""
    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)


def print_interrupted(message: str) -> None:
    """Print ``interrupted: message`` in yellow on stderr."""
    Console(stderr=True).print(f"[bold yellow]interrupted:[/bold yellow] {message}", highlight=False, soft_wrap=True)
