"""Benchmark of the scene regressor with no prior: the regressor alone, gsloc refining its poses, and the
retrieval + PnP route (``pnp``), side by side on a run's eval split (the ``global`` protocol).

Usage (a trained run; one torch thread)::

    OMP_NUM_THREADS=1 python scripts/bench_regressor.py --load-config RUN/config.yml --output-dir /tmp/regbench

Steps (each a command of this package, printed before it runs, so that any one can be rerun alone):

1. ``gsloc-train-regressor --load-config RUN --num-threads T`` (reuses up-to-date weights; ``--force`` retrains);
2. ``gsloc-bench --protocol global --methods regression pnp`` into ``OUT/regression_pnp``;
3. ``gsloc-bench --protocol global --methods gsloc --global-init regression`` into ``OUT/regression_gsloc``.

Then prints one table (success at (10 deg, 0.1) and (5 deg, 0.05) scene units, median errors, median ms per query:
for ``regression`` the forward pass and the alignment alone) and writes ``OUT/error_vs_distance.png``: each
query's error against the distance from its true camera centre to the nearest training camera centre.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from nerfstudio_gsloc.evaluation.report import TrialRecord, read_trials_jsonl
from nerfstudio_gsloc.metrics import failure_errors, success_rates, threshold_key

THRESHOLDS = ((10.0, 0.1), (5.0, 0.05))
ROWS = (("regression", "regression_pnp", "regression (one forward pass + alignment)"),
        ("gsloc", "regression_gsloc", "gsloc from the regression pose"),
        ("pnp", "regression_pnp", "pnp (retrieval + PnP route)"))


def run(command: List[str]) -> None:
    """Run one step (a module of this package) with this interpreter; stop on failure."""
    print("$ " + " ".join(command), flush=True)
    subprocess.run([sys.executable, "-m", *command], check=True)


def row(label: str, records: Sequence[TrialRecord]) -> Dict[str, object]:
    """Success rates, medians (failures infinite) and median ms per query of one method's records."""
    rot, trans = failure_errors([r.final_rot_deg for r in records], [r.final_trans for r in records],
                                [r.failed for r in records])
    rates = success_rates(rot, trans, THRESHOLDS)
    return {"method": label, "queries": len(records), "failed": int(sum(r.failed for r in records)),
            **{f"{deg:g}deg/{dist:g}": rates[threshold_key(deg, dist)] for deg, dist in THRESHOLDS},
            "rot_med": float(np.median(rot)), "trans_med": float(np.median(trans)),
            "ms_med": 1000.0 * float(np.median([r.seconds for r in records]))}


def print_table(rows: Sequence[Dict[str, object]]) -> str:
    header = ["method", "queries", "failed"] + [f"{deg:g}°/{dist:g}" for deg, dist in THRESHOLDS] + [
        "rot med °", "trans med", "ms/query med"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rates = [f"{100 * r[f'{deg:g}deg/{dist:g}']:.1f}%" for deg, dist in THRESHOLDS]
        lines.append("| " + " | ".join([str(r["method"]), str(r["queries"]), str(r["failed"]), *rates,
                                        f"{r['rot_med']:.3f}", f"{r['trans_med']:.4f}", f"{r['ms_med']:.1f}"]) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def nearest_training_distance(config: Path, names: Sequence[str]) -> Dict[str, float]:
    """Per eval query name, the distance (scene units) from its true camera centre to the nearest training camera."""
    import torch

    from nerfstudio_gsloc.localize.queries import load_eval_queries
    from nerfstudio_gsloc.localize.scene_map import training_camera_poses
    from nerfstudio_gsloc.runs import load_run

    _, pipeline = load_run(config)
    centres = training_camera_poses(pipeline)[:, :, 3].double()
    out = {}
    for query in load_eval_queries(pipeline):
        if query.name in names and query.gt_c2w is not None:
            out[query.name] = float(torch.linalg.norm(centres - query.gt_c2w[:3, 3].double(), dim=-1).min())
    return out


def plot_error_vs_distance(path: Path, by_method: Dict[str, Sequence[TrialRecord]], distance: Dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nerfstudio_gsloc.files import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in by_method.items():
        kept = [r for r in records if r.query in distance]
        x = [distance[r.query] for r in kept]
        # failures drawn at the top of the axis (their error is infinite)
        rot = [r.final_rot_deg if not r.failed and r.final_rot_deg is not None else 180.0 for r in kept]
        trans = [r.final_trans if not r.failed and r.final_trans is not None else 10.0 for r in kept]
        axes[0].scatter(x, rot, s=14, label=label)
        axes[1].scatter(x, trans, s=14, label=label)
    for ax, name, (thr_a, thr_b) in ((axes[0], "rotation error (deg)", (10.0, 5.0)),
                                     (axes[1], "translation error (scene units)", (0.1, 0.05))):
        ax.set_yscale("log")
        ax.axhline(thr_a, color="grey", ls="--", lw=0.8)
        ax.axhline(thr_b, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("distance to the nearest training camera (scene units)")
        ax.set_ylabel(name)
    axes[0].legend(fontsize=8)
    fig.suptitle("error against distance from the nearest training camera (global protocol, no prior)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_regressor"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--query-stride", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="retrain the regressor even if its weights are up to date")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="extra gsloc-train-regressor options (e.g. --training.max-minutes 10), given last")
    args = parser.parse_args()
    out = args.output_dir
    common = ["--load-config", str(args.load_config), "--protocol", "global", "--threads", str(args.threads),
              "--query-stride", str(args.query_stride)]
    run(["nerfstudio_gsloc.scripts.train_regressor", "--load-config", str(args.load_config), "--num-threads",
         str(args.threads), *(["--force"] if args.force else []), *args.train_args])
    run(["nerfstudio_gsloc.scripts.bench", *common, "--methods", "regression", "pnp", "--output-dir",
         str(out / "regression_pnp")])
    run(["nerfstudio_gsloc.scripts.bench", *common, "--methods", "gsloc", "--global-init", "regression",
         "--output-dir", str(out / "regression_gsloc")])

    by_method: Dict[str, List[TrialRecord]] = {}
    for method, folder, label in ROWS:
        by_method[label] = [r for r in read_trials_jsonl(out / folder / "trials.jsonl") if r.method == method]
    table = print_table([row(label, records) for label, records in by_method.items()])
    meta = json.loads((Path(args.load_config).parent / "gsloc_regressor" / "regressor.json").read_text())
    note = (f"regressor: {meta.get('steps')} steps, trained in {meta.get('training_seconds', 0) / 60:.1f} min "
            f"({meta.get('threads')} thread(s), {meta['views']['real']} photos + {meta['views']['rendered']} rendered views)")
    print(note)
    names = sorted({r.query for records in by_method.values() for r in records})
    distance = nearest_training_distance(args.load_config, names)
    plot_error_vs_distance(out / "error_vs_distance.png", by_method, distance)
    (out / "table.md").write_text(table + "\n\n" + note + "\n")
    print(f"table in {out / 'table.md'}, plot in {out / 'error_vs_distance.png'}")


if __name__ == "__main__":
    main()
