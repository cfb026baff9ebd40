"""Benchmark outputs: per-trial records, the per-method summary (markdown, CSV, rich table), the comparisons and
the machine line (the plots are :mod:`nerfstudio_gsloc.evaluation.report_plots`).

Conventions of the summary (stated in every results.md, :data:`SUMMARY_NOTE`), those of
:mod:`nerfstudio_gsloc.metrics`, which ``ns-localize``'s metrics.json follows too:

* a trial *fails* when the method reports a failure or returns no pose; a failure is an infinite error in the
  success rates, the means and the medians (one failure makes the mean infinite; more than half, the median);
* skipped trials (a method that does not apply, e.g. ``depth`` on queries without depth) are left out entirely;
* success at ``(deg, dist)``: rotation error <= deg and translation error <= dist, distances in scene units.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from rich.table import Table

from nerfstudio_gsloc.files import atomic_write_text, read_json_lines
from nerfstudio_gsloc.metrics import SUCCESS_THRESHOLDS, precision_recall, summarize, threshold_key

#: Columns of results.csv, in order.
CSV_FIELDS = (
    "method", "trials", "failed", "success_1deg_0.01", "success_2deg_0.02", "success_5deg_0.05",
    "rot_median_deg", "rot_mean_deg", "trans_median", "trans_mean", "precision", "recall", "seconds_median",
    "iterations_median",
)
#: How the table counts failures (printed under every results table).
SUMMARY_NOTE = (
    "Success at (deg, dist): rotation error <= deg and translation error <= dist (scene units). A failed trial is a "
    "failure with infinite error in the success rates, means and medians (`inf`: at least one failure in a mean, "
    "more than half failed in a median), as in ns-localize's metrics.json. A `rejected` trial (confidence under the "
    "threshold) is a failure too; `prec` is the share of accepted poses within (5°, 0.05), `recall` the share of "
    "poses within (5°, 0.05) that were accepted."
)


@dataclass
class TrialRecord:
    """One line of trials.jsonl (errors in degrees and scene units; ``None`` where there is no pose)."""

    method: str
    query: str
    query_index: int
    trial: int
    seed: int
    init_rot_deg: float
    init_trans: float
    nominal_angle_deg: float
    final_rot_deg: Optional[float]
    final_trans: Optional[float]
    seconds: float
    iterations: int
    status: str
    reason: str
    failed: bool
    skipped: bool
    confidence: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def write_trials_jsonl(path: Path, records: Sequence[TrialRecord]) -> None:
    """All trial records as JSON lines."""
    atomic_write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in records))


def read_trials_jsonl(path: Path) -> List[TrialRecord]:
    """Inverse of :func:`write_trials_jsonl`; also reads a run's file while it grows (a line appended per trial),
    skipping a torn last line (a run killed while appending)."""
    return [TrialRecord(**value) for value in read_json_lines(path)]


# ----------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------


def summarize_method(method: str, records: Sequence[TrialRecord]) -> Dict[str, Any]:
    """The summary row of one method: :func:`nerfstudio_gsloc.metrics.summarize` of its trials.

    Returns:
        a dict with the :data:`CSV_FIELDS` keys (NaN where undefined, e.g. no usable trial) and ``skipped``.
    """
    used = [r for r in records if not r.skipped and r.method == method]
    skipped = [r for r in records if r.skipped and r.method == method]
    summary = summarize([r.final_rot_deg for r in used], [r.final_trans for r in used], [r.failed for r in used],
                        seconds=[r.seconds for r in used], iterations=[r.iterations for r in used])
    row: Dict[str, Any] = {"method": method, "trials": len(used), "failed": summary["num_failed"],
                           "skipped": len(skipped), "skip_reason": skipped[0].reason if skipped else ""}
    for key, rate in summary["success_rates"].items():
        row[f"success_{key}"] = rate
    row.update(rot_median_deg=summary["rot_deg_median"], rot_mean_deg=summary["rot_deg_mean"],
               trans_median=summary["trans_median"], trans_mean=summary["trans_mean"],
               seconds_median=summary["seconds_median"], iterations_median=summary["iterations_median"])
    # The confidence's precision and recall at (5 deg, 0.05): errors of every pose, rejected ones included.
    precision, recall = precision_recall([r.final_rot_deg for r in used], [r.final_trans for r in used],
                                         [not r.failed for r in used])
    row.update(precision=precision, recall=recall)
    return row


def _fmt(value: Any, kind: str) -> str:
    """Table cell text."""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if kind == "pct":
        return f"{100.0 * value:.1f}%"
    # Errors that small (depth-aligned RGB-D poses reach 0.001 deg / 2e-5 units) keep two significant digits.
    if kind == "deg":
        return f"{value:.4f}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
    if kind == "dist":
        return f"{value:.6f}" if 0 < abs(value) < 0.001 else f"{value:.4f}"
    if kind == "sec":
        return f"{value:.2f}"
    if kind == "int":
        return f"{value:.0f}"
    return str(value)


#: (header, key, kind) of the printed/markdown table.
TABLE_COLUMNS = (
    ("method", "method", "str"),
    ("trials", "trials", "int"),
    ("failed", "failed", "int"),
    ("1°/0.01", "success_1deg_0.01", "pct"),
    ("2°/0.02", "success_2deg_0.02", "pct"),
    ("5°/0.05", "success_5deg_0.05", "pct"),
    ("rot med °", "rot_median_deg", "deg"),
    ("rot mean °", "rot_mean_deg", "deg"),
    ("trans med", "trans_median", "dist"),
    ("trans mean", "trans_mean", "dist"),
    ("prec", "precision", "pct"),
    ("recall", "recall", "pct"),
    ("s/query med", "seconds_median", "sec"),
    ("iters med", "iterations_median", "int"),
)


def _cells(row: Dict[str, Any]) -> List[str]:
    if row["trials"] == 0:
        return [row["method"], "0", "-"] + ["n/a"] * (len(TABLE_COLUMNS) - 3)
    return [_fmt(row[key], kind) for _, key, kind in TABLE_COLUMNS]


def skipped_notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per method with skipped trials (why it did not apply)."""
    return [f"{r['method']}: {r['skipped']} trials skipped ({r.get('skip_reason') or 'not applicable'})"
            for r in rows if r.get("skipped")]


def rich_table(rows: Sequence[Dict[str, Any]], title: str) -> Table:
    """The summary as a rich table."""
    table = Table(title=title)
    for header, _, kind in TABLE_COLUMNS:
        table.add_column(header, justify="left" if kind == "str" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The summary as a GitHub markdown table."""
    lines = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if kind == "str" else "---:" for _, _, kind in TABLE_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    return "\n".join(lines)


def write_results_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """results.csv: one row per method, :data:`CSV_FIELDS` columns, numbers unformatted (``inf`` = failures)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def read_results_csv(path: Path) -> List[Dict[str, Any]]:
    """results.csv back as dicts (numbers as floats, method as str)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (v if k == "method" else float(v)) for k, v in row.items()} for row in rows]


def _success_comparison(ref: Dict[str, Any], row: Dict[str, Any]) -> Tuple[bool, str]:
    """Whether ``ref`` succeeds on more trials than ``row``, and the words saying so.

    Compared at the loosest threshold, (5°, 0.05); when both succeed on every trial there, a tie that cannot be
    broken at that threshold, the tightest threshold decides (and the text says so).
    """
    loose, tight = SUCCESS_THRESHOLDS[-1], SUCCESS_THRESHOLDS[0]
    key, tight_key = f"success_{threshold_key(*loose)}", f"success_{threshold_key(*tight)}"
    text = f"success at {loose[0]:g}°/{loose[1]:g} {_fmt(ref[key], 'pct')} vs {_fmt(row[key], 'pct')}"
    if ref[key] == row[key] == 1.0:
        more = ref[tight_key] > row[tight_key]
        return more, (f"{text} (tie: both succeed on every trial), at {tight[0]:g}°/{tight[1]:g} "
                      f"{_fmt(ref[tight_key], 'pct')} vs {_fmt(row[tight_key], 'pct')} ({'more' if more else 'not more'})")
    more = ref[key] > row[key]
    return more, f"{text} ({'more' if more else 'not more'})"


def comparisons(rows: Sequence[Dict[str, Any]], reference: str = "gsloc") -> List[str]:
    """Plain-language comparison of ``reference`` with every other method (says where it does not win).

    ``reference`` beats a method when it succeeds on more trials (see :func:`_success_comparison`) and its median
    rotation and translation errors are at most half of that method's.
    """
    by_name = {r["method"]: r for r in rows}
    ref = by_name.get(reference)
    if ref is None or ref["trials"] == 0:
        return []
    lines = []
    for row in rows:
        if row["method"] == reference or row["trials"] == 0:
            continue
        more, success_text = _success_comparison(ref, row)
        rot_half = ref["rot_median_deg"] <= 0.5 * row["rot_median_deg"]
        trans_half = ref["trans_median"] <= 0.5 * row["trans_median"]
        verdict = "beats" if more and rot_half and trans_half else "does NOT beat"
        lines.append(
            f"{reference} {verdict} {row['method']}: {success_text}; median rotation "
            f"{_fmt(ref['rot_median_deg'], 'deg')}° vs {_fmt(row['rot_median_deg'], 'deg')}° "
            f"({'at most half' if rot_half else 'more than half'}); median translation {_fmt(ref['trans_median'], 'dist')} "
            f"vs {_fmt(row['trans_median'], 'dist')} ({'at most half' if trans_half else 'more than half'})"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------
# machine description
# ----------------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the timings were measured on: CPU model, cores, torch threads, device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: Dict[str, Any], image_sizes: Sequence[Tuple[int, int]]) -> str:
    """One line for beside the timings."""
    sizes = ", ".join(f"{w}x{h}" for w, h in image_sizes)
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"timings: wall clock per query on {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch "
        f"threads, device {info['device']}{gpu}), query images {sizes}"
    )
