"""The files ``ns-localize`` writes, and what it says when writing them fails or is interrupted.

:class:`LocalizeOutputs` saves every query as soon as it is finished, in O(1): one line (its record and trace rows)
appended to ``poses.journal.jsonl`` and flushed to disk. ``trace.csv`` and then ``poses.json`` are rewritten from
everything so far, atomically, every few seconds (:class:`~nerfstudio_gsloc.files.RewriteThrottle`), at the end, on
Ctrl-C and on an error; the journal is removed after each rewrite. So a finished or interrupted run leaves complete
files that hold every finished query, a killed one (``kill -9``, power loss) leaves them a few seconds behind plus
the journal, and ``--resume`` first folds the journal into them (:func:`recover_journal`). (trace.csv may hold the
rows of one query more than poses.json; ``--resume`` keeps only the rows of queries in poses.json.) Rewriting
poses.json after every query cost 0.7 ms per record so far, quadratic in the run's length (README, "Throughput
model"). The summaries (``metrics.json``, ``trace.png``) are written once at the end.

A write that fails (disk full, folder made read-only meanwhile) stops the run with one ``error:`` line that names
the file, what the folder still holds and what was lost; Ctrl-C ends with one ``interrupted:`` line saying what
is saved (see :meth:`LocalizeOutputs.interrupted_message`).

metrics.json is strict JSON: an infinite mean or median (a failed query counts as an infinite error) is written as
the string ``"inf"`` (:func:`nerfstudio_gsloc.metrics.to_strict_json`); :func:`read_metrics` turns it back.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.table import Table

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.errors import GslocError, count
from nerfstudio_gsloc.files import (
    JSONLinesError,
    OutputError,
    RewriteThrottle,
    append_line,
    atomic_write_text,
    read_json_lines,
    save_figure,
)
from nerfstudio_gsloc.localize.result import TRACE_FIELDS
from nerfstudio_gsloc.metrics import SUCCESS_THRESHOLDS, from_strict_json, threshold_key, to_strict_json
from nerfstudio_gsloc.poses_file import (
    PoseRecord,
    PosesDocument,
    QuerySource,
    read_poses,
    record_from_json,
    summarize_records,
    write_poses,
)

POSES_FILE = "poses.json"
METRICS_FILE = "metrics.json"
TRACE_CSV = "trace.csv"
TRACE_PNG = "trace.png"
JOURNAL_FILE = "poses.journal.jsonl"


def trace_csv_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """Trace rows as CSV lines without the header (missing values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(TRACE_FIELDS), extrasaction="ignore")
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in TRACE_FIELDS})
    return buffer.getvalue()


def trace_csv_header() -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=list(TRACE_FIELDS)).writeheader()
    return buffer.getvalue()


def write_trace_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """All trace rows as CSV (atomic)."""
    atomic_write_text(path, trace_csv_header() + trace_csv_rows(rows))


def read_trace_csv(path: Path) -> List[Dict[str, Any]]:
    """Rows of an earlier trace.csv (for --resume); empty if there is none."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def plot_trace(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """Error (or loss, without ground truth) against iteration, one line per query (matplotlib Agg, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def number(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    by_query: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        by_query.setdefault(str(row["query"]), []).append(row)
    has_gt = any(math.isfinite(number(r.get("rot_err_deg"))) for r in rows)
    keys = [("rot_err_deg", "rotation error (deg)"), ("trans_err", "translation error (scene units)")] if has_gt else [
        ("loss", "loss")
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for name, items in by_query.items():
            xs = [number(r["iteration"]) for r in items]
            ys = [max(number(r.get(key)), 1e-6) for r in items]
            ax.plot(xs, ys, linewidth=0.8, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, dpi=100)


def read_metrics(path: Path) -> Dict[str, Any]:
    """An ns-localize metrics.json (``"inf"`` strings back to floats; files of older versions hold ``Infinity``)."""
    return from_strict_json(Path(path).read_text(encoding="utf-8"))


class SaveFailed(GslocError):
    """A result could not be saved; the message says what the folder keeps and what is lost."""


def read_journal(path: Path) -> List[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """The ``(record JSON, trace rows)`` entries of a journal, in order; a torn last line (a crash while
    appending) is skipped."""
    try:
        values = read_json_lines(path)
    except JSONLinesError as err:
        raise GslocError(f"{path}: line {err.line} is not a journal entry") from None
    entries = []
    for number, entry in enumerate(values, start=1):
        try:
            entries.append((entry["record"], list(entry["trace"])))
        except (KeyError, TypeError):
            raise GslocError(f"{path}: line {number} is not a journal entry") from None
    return entries


def recover_journal(output_dir: Path) -> int:
    """Fold the journal a killed run left in ``output_dir`` into its poses.json and trace.csv (atomically), then
    remove it. Returns the number of records recovered (0 without a journal)."""
    journal, poses_path = Path(output_dir) / JOURNAL_FILE, Path(output_dir) / POSES_FILE
    if not journal.is_file():
        return 0
    entries = read_journal(journal)
    if not poses_path.is_file():
        raise GslocError(f"cannot resume: {journal} has no {POSES_FILE} beside it")
    document = read_poses(poses_path)
    records = {record.key: record for record in document.records}
    for number, (entry, _) in enumerate(entries):
        record = record_from_json(entry, f"{journal} line {number + 1}")
        records[record.key] = record
    document.records = list(records.values())
    # a crash between a rewrite and the journal's removal leaves rows in both: the journal's are kept
    journaled = {str(entry.get("image")) for entry, _ in entries}
    rows = [row for row in read_trace_csv(Path(output_dir) / TRACE_CSV) if row.get("query") not in journaled]
    rows += [row for _, trace in entries for row in trace]
    write_trace_csv(Path(output_dir) / TRACE_CSV, rows)
    write_poses(poses_path, document)
    journal.unlink()
    return len(entries)


class LocalizeOutputs:
    """The output folder of one ``ns-localize`` run: poses.json and trace.csv per finished query, then summaries.

    Args:
        output_dir: ``--output-dir`` (already checked with :func:`nerfstudio_gsloc.files.check_writable`).
        source, settings, frame: what poses.json records about the run.
        previous: records of an earlier run to keep (``--resume``), keyed by image name; their trace rows are
            read back from trace.csv.
        total: number of queries of the run (finished before plus to do), for the messages.
    """

    def __init__(self, output_dir: Path, source: QuerySource, settings: Dict[str, Any], frame: FrameTransform,
                 previous: Dict[str, PoseRecord], total: int) -> None:
        self.dir = Path(output_dir)
        self.source, self.settings, self.frame, self.total = source, settings, frame, total
        self.records: Dict[str, PoseRecord] = dict(previous)
        self.saved = 0  # records on disk in poses.json
        self.trace_rows: List[Dict[str, Any]] = []
        self._trace_chunks: List[str] = []
        if previous:
            rows = [r for r in read_trace_csv(self.dir / TRACE_CSV) if r.get("query") in previous]
            self.trace_rows.extend(rows)
            self._trace_chunks.append(trace_csv_rows(rows))
        self.summaries_written: List[str] = []
        self.throttle = RewriteThrottle()
        self.unwritten = 0  # records in the journal only

    @property
    def poses_path(self) -> Path:
        return self.dir / POSES_FILE

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL_FILE

    def start(self, resume: bool) -> None:
        """Remove an earlier run's summaries and journal (without --resume; with it the journal was folded in by
        :func:`recover_journal`) and write poses.json with the kept records."""
        if not resume:
            # Summaries of an earlier run in this folder would not describe this one.
            for stale in (METRICS_FILE, TRACE_CSV, TRACE_PNG, JOURNAL_FILE):
                (self.dir / stale).unlink(missing_ok=True)
        self._save(lost_now=0)

    def add(self, record: PoseRecord, trace: Sequence[Dict[str, Any]]) -> None:
        """Save one finished query: one journal line at once, the full trace.csv and poses.json when due."""
        self.records[record.image] = record
        self.trace_rows.extend(trace)
        self._trace_chunks.append(trace_csv_rows(trace))
        try:
            # Trace rows hold NaN (no ground truth): Python's JSON reads it back, and the journal is ours alone.
            append_line(self.journal_path, json.dumps({"record": record.to_json(), "trace": list(trace)}, default=str))
        except OutputError as err:
            self._fail(err, lost_now=1)
        self.unwritten += 1
        self.saved = len(self.records)  # in poses.json or the journal
        if self.throttle.due():
            self._save(lost_now=0)  # the query just finished is in the journal: a failed rewrite does not lose it

    def flush(self) -> None:
        """Rewrite trace.csv and poses.json with every query so far, if the journal holds any not in them."""
        if self.unwritten:
            self._save(lost_now=0)

    def _save(self, lost_now: int) -> None:
        try:
            with self.throttle.rewriting():
                if self._trace_chunks:
                    atomic_write_text(self.dir / TRACE_CSV, trace_csv_header() + "".join(self._trace_chunks))
                write_poses(self.poses_path, PosesDocument(frame=self.frame, queries=self.source,
                                                           records=list(self.records.values()), settings=self.settings))
                self.journal_path.unlink(missing_ok=True)
        except OSError as err:  # the journal could not be removed: it only repeats what poses.json holds now
            raise GslocError(f"cannot remove {self.journal_path}: {err}") from None
        except OutputError as err:
            self._fail(err, lost_now)
        self.saved = len(self.records)
        self.unwritten = 0

    def _fail(self, err: Exception, lost_now: int) -> None:
        """Stop with one error line: what is kept (poses.json, the journal) and what is lost."""
        if not self.records:
            raise SaveFailed(f"{err}; nothing was localized") from None
        left = self.total - len(self.records)
        lost = ("the query just finished and " if lost_now else "") + count(left, "query", "queries") + " not yet localized"
        raise SaveFailed(f"{err}; {self._kept()}; lost: {lost} (rerun with --resume once the folder can be "
                         "written)") from None

    def _kept(self) -> str:
        kept = (f"{self.poses_path} was not written" if not self.poses_path.is_file()
                else f"{self.poses_path} keeps {count(self.saved - self.unwritten, 'query', 'queries')} saved before")
        if self.unwritten:
            kept += f" and {self.journal_path} {self.unwritten} more (--resume folds them in)"
        return kept

    def write_summaries(self, metrics: Optional[Dict[str, Any]]) -> None:
        """metrics.json (when there is ground truth), then trace.png; a failed write names what is kept and lost."""
        todo = ([METRICS_FILE] if metrics is not None else []) + ([TRACE_PNG] if self.trace_rows else [])
        for name in todo:
            try:
                if name == METRICS_FILE:
                    atomic_write_text(self.dir / METRICS_FILE, to_strict_json(metrics, indent=2))
                else:
                    plot_trace(self.dir / TRACE_PNG, self.trace_rows)
            except OutputError as err:
                lost = todo[todo.index(name):]
                raise GslocError(f"{err}; kept: {self._kept_files()}; lost: {', '.join(lost)} (rerun with --resume "
                                 "once the folder can be written to write them)") from None
            self.summaries_written.append(name)

    def _kept_files(self) -> str:
        names = [f"{POSES_FILE} (every query)", TRACE_CSV] + self.summaries_written
        return ", ".join(names)

    def interrupted_message(self) -> str:
        """What is saved when Ctrl-C stops the run now (one line, for ``interrupted: ...``)."""
        if self.saved < self.total:
            return (f"{self.poses_path} holds {count(self.saved, 'query', 'queries')} of {self.total}; rerun with "
                    "--resume to continue")
        missing = [n for n in (METRICS_FILE, TRACE_PNG) if n not in self.summaries_written]
        if not missing:
            return f"{self.poses_path} holds every query ({count(self.total, 'query', 'queries')}); every file is written"
        return (f"{self.poses_path} holds every query ({count(self.total, 'query', 'queries')}); rerun with --resume "
                f"to write {' and '.join(missing)}")


def compute_metrics(records: Sequence[PoseRecord], frame: FrameTransform) -> Optional[Dict[str, Any]]:
    """metrics.json: the :mod:`nerfstudio_gsloc.metrics` summary of the records with ground truth (``None``: none).

    Failed (or rejected) queries are failures with infinite error in the success rates, means and medians, as in
    gsloc-bench's results.md. Success thresholds are in scene units, as the errors' ``trans_scene``.
    """
    summary = summarize_records(records, frame.scale)
    if summary is None:
        return None
    return {
        "num_queries": summary["num_queries"],
        "num_failed": summary["num_failed"],
        "rot_deg_mean": summary["rot_deg_mean"],
        "rot_deg_median": summary["rot_deg_median"],
        "trans_scene_mean": summary["trans_mean"],
        "trans_scene_median": summary["trans_median"],
        "trans_original_mean": summary["trans_mean"] / frame.scale,
        "trans_original_median": summary["trans_median"] / frame.scale,
        "success_rates_scene_units": summary["success_rates"],
        "seconds_per_query_mean": summary["seconds_mean"],
        "seconds_per_query_median": summary["seconds_median"],
        "iterations_median": summary["iterations_median"],
        "precision": summary["precision"],
        "recall": summary["recall"],
        "dataparser_scale": frame.scale,
    }


def metrics_table(metrics: Dict[str, Any]) -> Table:
    """Rich table of :func:`compute_metrics` output."""
    title = f"Localization of {metrics['num_queries']} queries ({metrics['num_failed']} failed"
    table = Table(title=title + (": infinite errors in means and medians)" if metrics["num_failed"] else ")"))
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("median", justify="right")
    table.add_row("rotation error (deg)", f"{metrics['rot_deg_mean']:.4f}", f"{metrics['rot_deg_median']:.4f}")
    table.add_row(
        "translation error (scene units)", f"{metrics['trans_scene_mean']:.5f}", f"{metrics['trans_scene_median']:.5f}"
    )
    table.add_row(
        "translation error (original units)",
        f"{metrics['trans_original_mean']:.5f}",
        f"{metrics['trans_original_median']:.5f}",
    )
    for deg, dist in SUCCESS_THRESHOLDS:
        rate = metrics["success_rates_scene_units"][threshold_key(deg, dist)]
        table.add_row(f"success at ({deg:g} deg, {dist:g} scene units)", f"{100.0 * rate:.1f}%", "")
    table.add_row("seconds per query", f"{metrics['seconds_per_query_mean']:.2f}", "")
    return table
