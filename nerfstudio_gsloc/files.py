"""Atomic file output: every result file (poses.json, metrics.json, results.md, plots) is replaced in one step.

A reader never sees a half-written file, and an interrupted run leaves the previous complete file. Files get the
normal permissions of a newly created file (``0o666`` minus the umask), unlike ``tempfile.mkstemp``'s ``0600``:
results are meant to be shared.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; a clean exit moves it onto ``path`` (``os.replace``), an error removes it.

    The temporary file already exists (empty, normal permissions) and keeps ``path``'s suffix, so writers that
    infer the format from the name (e.g. matplotlib's ``savefig``) work unchanged. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}"
    # os.open with 0o666 applies the process umask, as open() would for a new file.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_output`), flushed to disk before the swap."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
