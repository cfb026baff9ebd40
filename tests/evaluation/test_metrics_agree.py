"""ns-localize's metrics.json and gsloc-bench's results.md/results.csv give identical numbers for the same records."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.camera_conventions import FrameTransform, to_homogeneous
from nerfstudio_gsloc.evaluation import report
from nerfstudio_gsloc.evaluation.protocols import load_protocol
from nerfstudio_gsloc.poses_file import PoseRecord, PosesDocument, QuerySource, read_poses, write_poses
from nerfstudio_gsloc.scripts.bench_outputs import write_outputs
from nerfstudio_gsloc.metrics import to_strict_json
from nerfstudio_gsloc.scripts.localize_outputs import METRICS_FILE, compute_metrics
from nerfstudio_gsloc.scripts.localize_outputs import read_metrics

FRAME = FrameTransform(
    torch.cat([axis_angle_to_rotation_matrix(torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)),
               torch.tensor([[0.5], [-0.3], [1.0]], dtype=torch.float64)], dim=1),
    0.25, "test",
)


def _records(statuses):
    """One record per status; refined poses at growing distances from the ground truth (original frame)."""
    gen = torch.Generator().manual_seed(0)
    records = []
    for i, status in enumerate(statuses):
        gt = to_homogeneous(torch.cat([axis_angle_to_rotation_matrix(torch.randn(3, generator=gen, dtype=torch.float64)),
                                       torch.randn(3, 1, generator=gen, dtype=torch.float64)], dim=1))
        delta = to_homogeneous(torch.cat([axis_angle_to_rotation_matrix(torch.randn(3, generator=gen, dtype=torch.float64) * 0.01 * i),
                                          torch.randn(3, 1, generator=gen, dtype=torch.float64) * 0.02 * i], dim=1))
        refined = None if status == "failed" and i % 2 else gt @ delta  # a failed query with and without a pose
        records.append(PoseRecord(f"q{i}.png", status, refined, c2w_init=gt, c2w_gt=gt, index=i, iterations=10 + 7 * i,
                                  seconds=0.5 + 0.25 * i))
    return records


def _trial_records(records, scale):
    """The same records as gsloc-bench's trial records (errors in scene units, failures flagged)."""
    out = []
    for r in records:
        rot, trans = r.errors(scale)
        out.append(report.TrialRecord("gsloc", r.image, r.index, 0, 0, 10.0, 0.1, 10.0, rot, trans, r.seconds,
                                      r.iterations, r.status, r.reason, r.failed, False))
    return out


@pytest.mark.parametrize(
    "statuses",
    [
        ["converged", "max_iterations", "converged", "converged", "max_iterations"],
        ["converged", "failed", "converged", "rejected", "converged", "max_iterations", "failed"],
        ["failed", "converged", "failed", "rejected", "failed"],
    ],
)
def test_metrics_json_and_results_md_agree(tmp_path, statuses):
    records = _records(statuses)
    # ns-localize: records -> poses.json -> metrics.json (as written to disk).
    write_poses(tmp_path / "poses.json", PosesDocument(FRAME, QuerySource.eval_split(), records))
    stored = read_poses(tmp_path / "poses.json")
    (tmp_path / METRICS_FILE).write_text(to_strict_json(compute_metrics(stored.records, stored.frame)))
    metrics = read_metrics(tmp_path / METRICS_FILE)

    # gsloc-bench: the same records -> results.md and results.csv.
    protocol = load_protocol("inerf", trials=1)
    meta = {"load_config": "run/config.yml", "queries": QuerySource.eval_split().to_json(),
            "num_queries": len(records), "methods": ["gsloc"], "protocol": protocol.to_dict(),
            "protocol_summary": protocol.summary(1.0), "camera_scale": 1.0, "machine_line": "test", "command": "test"}
    write_outputs(tmp_path / "bench", ["gsloc"], _trial_records(stored.records, stored.frame.scale), protocol, meta)
    with open(tmp_path / "bench" / "results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))

    pairs = {
        "failed": "num_failed", "trials": "num_queries",
        "rot_median_deg": "rot_deg_median", "rot_mean_deg": "rot_deg_mean",
        "trans_median": "trans_scene_median", "trans_mean": "trans_scene_mean",
        "seconds_median": "seconds_per_query_median", "iterations_median": "iterations_median",
    }
    for bench_key, metrics_key in pairs.items():
        assert float(row[bench_key]) == float(metrics[metrics_key]), bench_key  # exactly the same number
    for key, rate in metrics["success_rates_scene_units"].items():
        assert float(row[f"success_{key}"]) == rate, key
    failures = sum(s in ("failed", "rejected") for s in statuses)
    assert metrics["num_failed"] == failures
    assert math.isinf(metrics["rot_deg_mean"]) == (failures > 0)
    assert math.isinf(metrics["rot_deg_median"]) == (failures > len(statuses) / 2)

    # results.md shows those numbers, formatted.
    table = (tmp_path / "bench" / "results.md").read_text()
    summary_row = {"method": "gsloc", "trials": metrics["num_queries"], "failed": metrics["num_failed"],
                   "rot_median_deg": metrics["rot_deg_median"], "rot_mean_deg": metrics["rot_deg_mean"],
                   "trans_median": metrics["trans_scene_median"], "trans_mean": metrics["trans_scene_mean"],
                   "seconds_median": metrics["seconds_per_query_median"],
                   "iterations_median": metrics["iterations_median"],
                   "precision": metrics["precision"], "recall": metrics["recall"],
                   **{f"success_{k}": v for k, v in metrics["success_rates_scene_units"].items()}}
    assert report.markdown_table([summary_row]).splitlines()[-1] in table.splitlines()
