"""Output files: checked before any work, replaced atomically, and a failed write is one clear error.

* :func:`check_writable` is what every command runs on its output locations before it loads anything: it creates
  the folder, writes and removes a probe file, then removes again the folders it created (a run that later stops on
  bad input leaves nothing behind). A read-only folder, a path under a regular file or a full disk becomes one
  :class:`OutputError` naming the path.
* :func:`atomic_output` / :func:`atomic_write_text`: every result file (poses.json, metrics.json, trace.csv,
  trace.png, results.md, trials.jsonl, ...) is replaced in one step. A reader never sees a half-written file, and
  an interrupted or failed write (Ctrl-C, disk full) leaves the previous complete file. Failures are raised as
  :class:`OutputError` (a :class:`~nerfstudio_gsloc.errors.GslocError`) naming the file, so callers can say what
  was kept and what was lost.
* :func:`append_line` / :class:`RewriteThrottle`: files that grow by one result at a time (a journal of finished
  queries, trials.jsonl) get one line appended per result, O(1), and the full files (poses.json) are rewritten
  only every few seconds and at the end, so the cost of saving does not grow with the number of results.

Files get the normal permissions of a newly created file (``0o666`` minus the umask), unlike
``tempfile.mkstemp``'s ``0600``: results are meant to be shared.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

from nerfstudio_gsloc.errors import GslocError


class OutputError(GslocError):
    """An output file or folder cannot be written. ``path`` is the file or folder, ``reason`` the system's words."""

    def __init__(self, message: str, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.reason = reason


def _reason(err: OSError, path: Path) -> str:
    """A short cause of ``err`` for a message: names the regular file a folder path runs into."""
    if isinstance(err, NotADirectoryError) or err.errno == errno.ENOTDIR or (
        isinstance(err, FileExistsError) and path.is_file()
    ):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "read-only file system"
    return err.strerror or str(err) or type(err).__name__


def check_writable(folder: Union[str, Path], what: str = "output folder") -> Path:
    """Make sure files can be written into ``folder`` before any work: create it, write and remove a probe file.

    Folders this call created are removed again, so a command that stops later on bad input leaves nothing behind
    (the real writes create them again).

    Args:
        folder: the output folder.
        what: how the message names it (e.g. ``--output-dir``).

    Returns:
        ``folder`` as a :class:`Path`.

    Raises:
        OutputError: one line naming the folder and why (permission denied, a file in the way, no space, ...).
    """
    folder = Path(folder)
    created: List[Path] = [p for p in [folder, *folder.parents] if not p.exists()]
    probe = folder / f".gsloc-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(folder))
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"gsloc")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot write to {what} {folder}: {_reason(err, folder)}", folder, _reason(err, folder)) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # the probe was never made (a file in the way, no permission)
            pass
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
    return folder


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; a clean exit moves it onto ``path`` (``os.replace``), an error removes it.

    The temporary file already exists (empty, normal permissions) and keeps ``path``'s suffix, so writers that
    infer the format from the name (e.g. matplotlib's ``savefig``) work unchanged. The parent folder is created.
    An ``OSError`` (disk full, permission denied, ...) while creating, writing or moving becomes an
    :class:`OutputError` naming ``path``; ``path`` itself then still holds its previous content (or does not exist).
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}"
            # os.open with 0o666 applies the process umask, as open() would for a new file.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            yield tmp
            os.replace(tmp, path)
        except OSError as err:
            reason = _reason(err, path.parent)
            raise OutputError(f"cannot write {path}: {reason}", path, reason) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_output`), flushed to disk before the swap."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out a matplotlib ``fig``, write it to ``path`` atomically and close it, also when the write fails."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def append_line(path: Union[str, Path], line: str) -> None:
    """Append ``line`` (one line, no newline) to ``path`` and flush it to disk.

    One ``write`` per line, so a crash can tear at most the last line, which readers skip. An ``OSError`` becomes
    an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        reason = _reason(err, path.parent)
        raise OutputError(f"cannot write {path}: {reason}", path, reason) from None


class JSONLinesError(ValueError):
    """A line other than the last of a JSON-lines file does not parse; ``line`` is its number (1-based, among the
    non-empty lines)."""

    def __init__(self, path: Path, line: int) -> None:
        super().__init__(f"{path}: line {line} is not JSON")
        self.line = line


def read_json_lines(path: Union[str, Path]) -> List[Any]:
    """The JSON value of every non-empty line of a file written by :func:`append_line`, in order.

    A last line that does not parse is skipped (a run killed while appending tears at most that one); any other
    raises :class:`JSONLinesError`.
    """
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    values = []
    for number, line in enumerate(lines):
        try:
            values.append(json.loads(line))
        except ValueError:
            if number < len(lines) - 1:
                raise JSONLinesError(Path(path), number + 1) from None
    return values


class RewriteThrottle:
    """When a file that holds every result so far is worth rewriting again.

    A full rewrite costs time proportional to the results so far, so rewriting after every result is quadratic in
    the run's length (0.7 ms per poses.json record: 40 days of writing for 100,000 queries). The throttle allows a
    rewrite at most every ``min_seconds`` and only once the time since the last one is ``1 / max_fraction`` times
    what that one took, so writing stays under ``max_fraction`` of the run; what happens in between must be kept
    elsewhere (a journal, an appended line).
    """

    def __init__(self, min_seconds: float = 2.0, max_fraction: float = 0.05) -> None:
        self.min_seconds, self.max_fraction = float(min_seconds), float(max_fraction)
        self.last_end = -float("inf")
        self.last_cost = 0.0

    def due(self) -> bool:
        """Whether a rewrite now keeps within both limits."""
        since = time.perf_counter() - self.last_end
        return since >= self.min_seconds and since * self.max_fraction >= self.last_cost

    @contextmanager
    def rewriting(self) -> Iterator[None]:
        """Time one rewrite (``with throttle.rewriting(): write(...)``)."""
        started = time.perf_counter()
        yield
        self.last_end = time.perf_counter()
        self.last_cost = self.last_end - started
