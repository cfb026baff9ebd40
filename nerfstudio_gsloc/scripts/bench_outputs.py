"""gsloc-bench's result files: trial records, results.md / results.csv / trials.jsonl / bench.json and the plots,
the printed summary, and ``--merge`` of results folders (the run itself is
:mod:`nerfstudio_gsloc.scripts.bench_run`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from rich.console import Console

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation import report, report_plots
from nerfstudio_gsloc.evaluation.protocols import Protocol, protocol_from_dict
from nerfstudio_gsloc.evaluation.trials import Trial
from nerfstudio_gsloc.files import OutputError, atomic_write_text, check_writable
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.registry import LOCALIZERS
from nerfstudio_gsloc.localize.result import LocalizationResult
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.poses_file import QuerySource

# Outside a terminal rich would wrap the results table at 80 columns; give it room.
CONSOLE = Console(width=None if sys.stdout.isatty() else 160)
SAME_POSES_NOTE = (
    "every method starts from the same initial poses: trial t of query q is drawn from a generator seeded by "
    "(protocol seed, query index, t)"
)


def trial_records(method: str, queries: Sequence[Query], trials: Sequence[Trial], results: Sequence[LocalizationResult]) -> List[report.TrialRecord]:
    """Join trials and one method's results into records (errors against the ground truth, scene units)."""
    records = []
    for trial, result in zip(trials, results):
        query = queries[trial.query]
        rot = trans = None
        if not result.skipped and query.gt_c2w is not None and bool(torch.isfinite(result.c2w).all()):
            gt = query.gt_c2w[None, :3, :4].double()
            est = result.c2w[None, :3, :4].double().cpu()
            rot, trans = float(rotation_error_deg(est, gt)[0]), float(translation_error(est, gt)[0])
        records.append(
            report.TrialRecord(
                method=method, query=query.name, query_index=query.index, trial=trial.trial, seed=trial.seed,
                init_rot_deg=trial.init_rot_deg, init_trans=trial.init_trans, nominal_angle_deg=trial.nominal_angle_deg,
                final_rot_deg=rot, final_trans=trans, seconds=result.seconds, iterations=result.iterations,
                status=result.status, reason=result.reason, failed=result.failed, skipped=result.skipped,
                confidence=result.confidence,
            )
        )
    return records


def write_outputs(output_dir: Path, methods: Sequence[str], records: Sequence[report.TrialRecord], protocol: Protocol,
                  meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """results.md, results.csv, trials.jsonl, bench.json and the three plots. Returns the summary rows."""
    rows = [report.summarize_method(m, records) for m in methods]
    report.write_trials_jsonl(output_dir / "trials.jsonl", records)
    report.write_results_csv(output_dir / "results.csv", rows)
    lines = [
        f"# Localization benchmark: {protocol.name}",
        "",
        f"- run: `{meta['load_config']}`" + (
            f" (trained by gsloc-bench on `{meta['trained_from']['data']}` with preset `{meta['trained_from']['train_preset']}`)"
            if meta.get("trained_from") else ""),
        f"- queries: {QuerySource.from_json(meta['queries']).describe()} ({meta['num_queries']} queries x {protocol.trials_per_query} trials)",
        f"- protocol: {meta['protocol_summary']}",
        *([f"- with no prior the refining methods start from {meta['global_init']} poses (--global-init)"]
          if meta.get("global_init") else []),
        f"- camera-distance scale: {meta['camera_scale']:.4g} scene units (median distance of the training cameras "
        "to the scene origin)",
        f"- {SAME_POSES_NOTE}",
        f"- {meta['machine_line']}",
        *[f"- {line}" for line in meta.get("ray_workers", [])],
        *[f"- merged from `{source['dir']}`: `{source['command']}`" for source in meta.get("merged_from", [])],
        "",
        report.markdown_table(rows),
        "",
        *[f"{line}  " for line in report.skipped_notes(rows)],
        "",
        f"{report.SUMMARY_NOTE} Seconds: wall clock per trial measured inside the run; gsloc, photometric and depth "
        "optimise several trials in one batched rasterization call and share the batch's time among them; pnp "
        f"excludes the one-off map of the training views ({meta.get('pnp_map_seconds', 'n/a')} s).",
        "",
        "Methods:",
        "",
    ]
    for m in methods:
        line = f"- `{m}`: {LOCALIZERS[m]}"
        if m == "icomma" and "icomma_matcher" in meta:
            line += f"; matcher: {meta['icomma_matcher']}"
            if "LoFTR" not in meta["icomma_matcher"]:
                line += " standing in for LoFTR, whose weights cannot be downloaded here (pass a local checkpoint as --method-settings.icomma.loftr-weights-path)"
        lines.append(line)
    notes = report.comparisons(rows)
    if notes:
        lines += ["", "Comparison:", ""] + [f"- {n}" for n in notes]
    lines += ["", f"Command: `{meta['command']}`", ""]
    atomic_write_text(output_dir / "results.md", "\n".join(lines))
    atomic_write_text(output_dir / "bench.json", json.dumps(meta, indent=2, default=str))
    sweep = protocol.rotation.angles_deg if protocol.rotation.mode == "sweep" else None
    max_angle = max(abs(a) for a in protocol.rotation.range_deg) if sweep is None else None
    if protocol.has_prior:  # without a prior there is no initial angle to plot against
        report_plots.plot_success_vs_angle(output_dir / "success_vs_angle.png", records, methods, sweep,
                                           title=meta["protocol_summary"], max_angle=max_angle)
    report_plots.plot_error_cdf(output_dir / "error_cdf.png", records, methods, title=meta["protocol_summary"])
    report_plots.plot_precision_recall(output_dir / "precision_recall.png", records, methods,
                                       title=meta["protocol_summary"], default_threshold=meta.get("confidence_threshold"))
    return rows


def write_summaries(output_dir: Path, methods: Sequence[str], records: Sequence[report.TrialRecord],
                    protocol: Protocol, meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """:func:`write_outputs`, a failed write (disk full) being one error line that says what is kept and lost."""
    try:
        return write_outputs(output_dir, methods, records, protocol, meta)
    except OutputError as err:
        kept = "" if err.path.name == "trials.jsonl" else f"all {len(records)} trials are kept in trials.jsonl; "
        raise GslocError(f"{err}; {kept}the summaries (results.md, results.csv, bench.json, plots) are not "
                         "complete") from None


def print_results(rows: Sequence[Dict[str, Any]], title: str, machine_line: str, output_dir: Path) -> None:
    """The summary table, where the timings come from, notes and comparisons, and where the files are."""
    CONSOLE.print(report.rich_table(rows, title=title))
    CONSOLE.print(machine_line)
    for line in report.skipped_notes(rows) + report.comparisons(rows):
        CONSOLE.print(line)
    CONSOLE.print(f"results in {output_dir}")


#: bench.json fields a merge compares or reads.
_MERGE_KEYS = ("load_config", "queries", "num_queries", "protocol", "protocol_summary", "camera_scale", "methods",
               "machine_line", "command")


def _read_results_folder(folder: Path) -> Tuple[Dict[str, Any], List[report.TrialRecord]]:
    """bench.json and trials.jsonl of one finished gsloc-bench run. Raises :class:`GslocError`."""
    folder = Path(folder)
    if not (folder / "bench.json").is_file() or not (folder / "trials.jsonl").is_file():
        raise GslocError(f"{folder} is not a finished gsloc-bench results folder (no bench.json and trials.jsonl)")
    try:
        meta = json.loads((folder / "bench.json").read_text())
        records = report.read_trials_jsonl(folder / "trials.jsonl")
    except (ValueError, TypeError) as err:
        raise GslocError(f"{folder}: unreadable results ({err})") from err
    missing = [key for key in _MERGE_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise GslocError(f"{folder}/bench.json lacks {', '.join(missing)} (not written by gsloc-bench?)")
    return meta, records


def merge_results(folders: Sequence[Path], output_dir: Path) -> List[Dict[str, Any]]:
    """Combine gsloc-bench results folders with disjoint methods into one results folder.

    The folders must come from the same run, queries, protocol and camera-distance scale, and every trial
    ``(query index, trial)`` they share must have started from the same pose (same seed and initial errors);
    otherwise the comparison would not be on the same trials. Returns the summary rows.
    """
    if len(folders) < 2:
        raise GslocError("--merge needs at least two results folders")
    check_writable(output_dir, "--output-dir")
    metas, records, starts = [], [], {}
    methods: List[str] = []
    for folder in folders:
        meta, folder_records = _read_results_folder(folder)
        if metas:
            for key in ("load_config", "queries", "num_queries", "protocol", "camera_scale"):
                if meta.get(key) != metas[0].get(key):
                    raise GslocError(f"cannot merge {folder} with {folders[0]}: different {key} "
                                     f"({meta.get(key)!r} vs {metas[0].get(key)!r})")
        for method in meta["methods"]:
            if method in methods:
                raise GslocError(f"method {method!r} is in more than one of the folders to merge")
            methods.append(method)
        for r in folder_records:
            start = (r.seed, round(r.init_rot_deg, 9), round(r.init_trans, 9))
            if starts.setdefault((r.query_index, r.trial), start) != start:
                raise GslocError(f"cannot merge {folder}: trial {r.trial} of query {r.query} started from another pose")
        metas.append(meta)
        records.extend(folder_records)

    merged = dict(metas[0])
    for meta in metas[1:]:  # per-method notes and timings; the first folder's run description stays
        merged.update({k: v for k, v in meta.items() if k not in merged or k in ("icomma_matcher", "pnp_map_seconds")})
        merged["method_seconds"] = {**merged.get("method_seconds", {}), **meta.get("method_seconds", {})}
    methods = sorted(methods, key=lambda m: list(LOCALIZERS).index(m) if m in LOCALIZERS else len(LOCALIZERS))
    merged["methods"] = methods
    merged["merged_from"] = [{"dir": str(f), "command": m["command"]} for f, m in zip(folders, metas)]
    merged["command"] = "gsloc-bench --merge " + " ".join(str(f) for f in folders) + f" --output-dir {output_dir}"
    merged["machine_line"] = "; ".join(sorted({m["machine_line"] for m in metas}))
    protocol = protocol_from_dict(merged["protocol"])
    output_dir = Path(output_dir)
    rows = write_summaries(output_dir, methods, records, protocol, merged)
    print_results(rows, f"{protocol.name}: merged from {len(folders)} folders", merged["machine_line"], output_dir)
    return rows
