"""Outputs of a tracked sequence (``ns-localize --sequence``, ``gsloc-bench --protocol sequence``).

* ``trajectory.tum`` (``trajectory_<method>.tum`` in the benchmark) and ``trajectory_gt.tum``: TUM files
  (:mod:`nerfstudio_gsloc.tum_file`: camera-to-world, OpenCV camera axes, the dataset's original frame and units,
  timestamps ``frame / fps``);
* ``sequence.json``: per method the trajectory metrics of :func:`nerfstudio_gsloc.metrics.summarize_trajectory`
  (scene units, ATE without alignment) and the event of every frame;
* ``sequence.png``: the camera centres seen from above (scene x-y; nerfstudio's dataparser turns the scene's up
  direction to +z) against the ground truth, re-localized and lost frames marked, and the errors along the sequence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import FrameTransform
from nerfstudio_gsloc.files import atomic_write_text, save_figure
from nerfstudio_gsloc.metrics import summarize_trajectory, to_strict_json
from nerfstudio_gsloc.tum_file import write_tum

SEQUENCE_JSON = "sequence.json"
SEQUENCE_PNG = "sequence.png"
GT_TUM = "trajectory_gt.tum"


def stack_poses(poses: Sequence[Optional[Tensor]]) -> Tensor:
    """``[N, 3, 4]`` float64 of ``[3|4, 4]`` poses (``None`` -> NaN)."""
    return torch.stack([torch.full((3, 4), math.nan, dtype=torch.float64) if p is None else p[:3, :4].double().cpu()
                        for p in poses])


def write_trajectories(output_dir: Path, tum_name: str, est: Tensor, gt: Optional[Tensor], frame: FrameTransform,
                       fps: float) -> None:
    """The estimate's TUM file ``tum_name`` and (when known) the ground truth's, in the original frame.

    Args:
        est, gt: ``[N, 3, 4]`` scene-frame OpenGL camera-to-world poses (NaN rows: no pose).
    """
    stamps = [i / fps for i in range(est.shape[0])]
    write_tum(output_dir / tum_name, stamps, [frame.to_original(p) for p in est])
    if gt is not None:
        write_tum(output_dir / GT_TUM, stamps, [frame.to_original(p) for p in gt])


def sequence_summary(est: Tensor, gt: Optional[Tensor], events: Sequence[str], seconds: Sequence[float],
                     depth_aligned: Optional[Sequence[Optional[bool]]] = None) -> Dict[str, Any]:
    """One method's entry of sequence.json: the trajectory metrics (when ``gt`` is known) and the events.

    ``depth_aligned``: per frame whether its depth alignment was kept (``None``: none ran); counted as
    ``num_depth_aligned``."""
    lost = [e == "lost" for e in events]
    reloc = [e == "relocalized" for e in events]
    if gt is not None:
        summary = summarize_trajectory(est, gt, lost, reloc, seconds)
    else:
        secs = np.asarray(seconds, dtype=np.float64)
        summary = {"num_frames": len(events), "num_lost": int(sum(lost)), "num_relocalized": int(sum(reloc)),
                   "seconds_per_frame_mean": float(secs.mean()), "seconds_per_frame_median": float(np.median(secs)),
                   "seconds_per_frame_max": float(secs.max())}
    summary["events"] = list(events)
    summary["seconds"] = [round(float(s), 4) for s in seconds]
    if depth_aligned is not None:
        summary["num_depth_aligned"] = int(sum(bool(a) for a in depth_aligned))
        summary["depth_aligned"] = list(depth_aligned)
    return summary


def write_sequence_json(path: Path, summaries: Mapping[str, Dict[str, Any]], notes: Mapping[str, Any]) -> None:
    """sequence.json (strict JSON: infinite / NaN values as strings)."""
    atomic_write_text(path, to_strict_json({**notes, "methods": dict(summaries)}, indent=2))


def plot_sequence(path: Path, estimates: Mapping[str, Tensor], gt: Tensor, summaries: Mapping[str, Dict[str, Any]],
                  title: str = "") -> None:
    """sequence.png: top view of the camera centres against the ground truth, and the errors along the sequence.

    Args:
        estimates: per method ``[N, 3, 4]`` scene-frame poses.
        gt: ``[N, 3, 4]`` ground truth.
        summaries: per method its :func:`sequence_summary` (errors and events).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, err_t, err_r) = plt.subplots(1, 3, figsize=(17, 5))
    centres = gt[:, :3, 3].numpy()
    top.plot(centres[:, 0], centres[:, 1], "k-", linewidth=2.5, alpha=0.35, label="ground truth")
    top.plot(centres[:1, 0], centres[:1, 1], "ko", label="first frame")
    frames = np.arange(gt.shape[0])
    for name, est in estimates.items():
        xy = est[:, :3, 3].numpy()
        line, = top.plot(xy[:, 0], xy[:, 1], "-", linewidth=0.9, label=name)
        events = summaries[name]["events"]
        for event, marker in (("relocalized", "^"), ("lost", "x")):
            pick = [i for i, e in enumerate(events) if e == event]
            if pick:
                top.plot(xy[pick, 0], xy[pick, 1], marker, color=line.get_color(), markersize=7,
                         label=f"{name}: {event} ({len(pick)})")
        for ax, key in ((err_t, "trans_err"), (err_r, "rot_err_deg")):
            values = np.asarray(summaries[name].get(key, [math.nan] * len(frames)), dtype=np.float64)
            ax.plot(frames, np.maximum(values, 1e-6), "-", linewidth=0.9, color=line.get_color(), label=name)
    top.set_aspect("equal", adjustable="datalim")
    top.set_xlabel("x (scene units)")
    top.set_ylabel("y (scene units)")
    top.set_title("camera centres, top view")
    top.legend(fontsize=7)
    for ax, label in ((err_t, "camera centre error (scene units)"), (err_r, "rotation error (deg)")):
        ax.set_yscale("log")
        ax.set_xlabel("frame")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)


#: Columns of the sequence table: (key of the summary, header, format).
TABLE_COLUMNS = (
    ("ate_rmse", "ATE RMSE", "{:.5f}"), ("rot_rmse_deg", "rot RMSE (deg)", "{:.4f}"),
    ("rpe_trans_rmse", "RPE trans RMSE", "{:.5f}"), ("rpe_rot_rmse_deg", "RPE rot RMSE (deg)", "{:.4f}"),
    ("num_lost", "lost", "{}"), ("num_relocalized", "re-localized", "{}"), ("num_depth_aligned", "depth ICP", "{}"),
    ("seconds_per_frame_mean", "s/frame mean", "{:.3f}"), ("seconds_per_frame_max", "s/frame max", "{:.2f}"),
)


def table_cells(summary: Mapping[str, Any]) -> List[str]:
    """One method's cells of the sequence table (:data:`TABLE_COLUMNS`; ``n/a`` where not measured)."""
    cells = []
    for key, _, fmt in TABLE_COLUMNS:
        value = summary.get(key)
        cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
    return cells


def markdown_table(summaries: Mapping[str, Dict[str, Any]]) -> List[str]:
    """The per-method table (scene units, ATE not aligned) as markdown lines."""
    lines = ["| method | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |",
             "|---|" + "---:|" * len(TABLE_COLUMNS)]
    return lines + [f"| {name} | " + " | ".join(table_cells(summary)) + " |" for name, summary in summaries.items()]
