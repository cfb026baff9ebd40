"""The benchmark's plots, drawn from trial records (:class:`~nerfstudio_gsloc.evaluation.report.TrialRecord`):
success_vs_angle.png, error_cdf.png and precision_recall.png (PNG files written with matplotlib's Agg backend).

Conventions of :mod:`nerfstudio_gsloc.evaluation.report`: errors in degrees and scene units, a failed trial an
infinite error (it never counts as a success and never arrives in a CDF), skipped trials left out; "correct" is
within (5°, 0.05), the loosest success threshold.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from nerfstudio_gsloc.evaluation.report import TrialRecord
from nerfstudio_gsloc.files import save_figure
from nerfstudio_gsloc.metrics import SUCCESS_THRESHOLDS, failure_errors, precision_recall


#: The threshold the success-vs-angle plot uses.
PLOT_THRESHOLD = SUCCESS_THRESHOLDS[-1]


def _errors(records: Sequence[TrialRecord]) -> Tuple[np.ndarray, np.ndarray]:
    """``[N]`` rotation and translation errors with failures as ``inf`` (skipped records excluded by the caller)."""
    return failure_errors([r.final_rot_deg for r in records], [r.final_trans for r in records],
                          [r.failed for r in records])


def _angle_bins(records: Sequence[TrialRecord], sweep_angles: Optional[Sequence[float]], max_angle: Optional[float]) -> np.ndarray:
    """Bin edges of the initial rotation angle: one bin per sweep angle, else 8 equal bins up to ``max_angle``."""
    if sweep_angles:
        angles = np.array(sorted(set(float(a) for a in sweep_angles)))
        mids = (angles[1:] + angles[:-1]) / 2 if len(angles) > 1 else np.array([])
        return np.concatenate([[angles[0] - 5.0], mids, [angles[-1] + 5.0]])
    top = max([r.init_rot_deg for r in records] + [max_angle or 0.0, 1e-3])
    return np.linspace(0.0, top * 1.0001, 9)


#: Line styles that keep overlapping curves distinguishable (markers shrink so a covered one still shows).
_STYLES = (("o", "-", 9), ("s", "--", 7.5), ("^", "-.", 6), ("D", ":", 4.5), ("v", "-", 3.5), ("x", "--", 6))


def plot_success_vs_angle(path: Path, records: Sequence[TrialRecord], methods: Sequence[str],
                          sweep_angles: Optional[Sequence[float]] = None, title: str = "",
                          max_angle: Optional[float] = None) -> None:
    """success_vs_angle.png: success rate at the (5°, 0.05) threshold against the initial rotation angle.

    Args:
        path: the PNG to write.
        records: trial records of all methods.
        methods: methods to draw, in legend order.
        sweep_angles: the angles of a sweep protocol (one bin each); otherwise 8 equal bins.
        title: figure title (wrapped).
        max_angle: upper end of the bins for non-sweep protocols (default: the largest initial angle).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = [r for r in records if not r.skipped]
    edges = _angle_bins(used, sweep_angles, max_angle)
    centres = (edges[1:] + edges[:-1]) / 2
    deg, dist = PLOT_THRESHOLD
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    for number, method in enumerate(methods):
        mine = [r for r in used if r.method == method]
        if not mine:
            continue
        angle = np.array([r.init_rot_deg for r in mine])
        rot, trans = _errors(mine)
        ok = (rot <= deg) & (trans <= dist)
        which = np.clip(np.digitize(angle, edges) - 1, 0, len(centres) - 1)
        filled = [b for b in range(len(centres)) if (which == b).any()]
        rates = [ok[which == b].mean() for b in filled]
        marker, line, size = _STYLES[number % len(_STYLES)]
        ax.plot(centres[filled], rates, marker=marker, ls=line, ms=size, label=method)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("initial rotation error (degrees)")
    ax.set_ylabel(f"success rate ({deg:g}°, {dist:g} scene units)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    # Below the axes: curves at 0% and 100% fill both ends of the plot, where a legend inside would cover them.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=max(1, len(methods)), frameon=False)
    if title:
        ax.set_title(textwrap.fill(title, 90), fontsize=8)
    save_figure(fig, path)


def plot_error_cdf(path: Path, records: Sequence[TrialRecord], methods: Sequence[str], title: str = "") -> None:
    """error_cdf.png: cumulative distribution of the final rotation and translation errors (failures never arrive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    used = [r for r in records if not r.skipped]
    for method in methods:
        mine = [r for r in used if r.method == method]
        if not mine:
            continue
        rot, trans = _errors(mine)
        for ax, errors in zip(axes, (rot, trans)):
            finite = np.sort(errors[np.isfinite(errors)])
            if finite.size == 0:
                continue
            frac = np.arange(1, finite.size + 1) / errors.size
            ax.step(np.maximum(finite, 1e-6), frac, where="post", label=method)
    for ax, label in zip(axes, ("rotation error (degrees)", "translation error (scene units)")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of trials")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, which="both")
    for deg, dist in SUCCESS_THRESHOLDS:
        axes[0].axvline(deg, color="grey", lw=0.6, ls="--")
        axes[1].axvline(dist, color="grey", lw=0.6, ls="--")
    axes[0].legend()
    if title:
        fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    save_figure(fig, path)


def plot_precision_recall(path: Path, records: Sequence[TrialRecord], methods: Sequence[str], title: str = "",
                          default_threshold: Optional[float] = None) -> None:
    """precision_recall.png: precision and recall of the accepted poses at (5 deg, 0.05) as the confidence
    threshold sweeps ``[0, 1]`` (methods without a confidence are left out); the default threshold is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    thresholds = np.linspace(0.0, 1.0, 101)
    for method in methods:
        mine = [r for r in records if not r.skipped and r.method == method and r.confidence is not None]
        if not mine:
            continue
        rot = [r.final_rot_deg for r in mine]
        trans = [r.final_trans for r in mine]
        # A pose a method itself failed has no confidence to threshold (rejected ones do).
        has_pose = np.array([r.status != "failed" for r in mine])
        conf = np.array([r.confidence for r in mine], dtype=np.float64)
        curve = np.array([precision_recall(rot, trans, has_pose & (conf >= t)) for t in thresholds])
        axes[0].plot(thresholds, curve[:, 0], label=f"{method} precision")
        axes[0].plot(thresholds, curve[:, 1], ls="--", label=f"{method} recall")
        axes[1].plot(curve[:, 1], curve[:, 0], marker=".", ms=3, label=method)
    axes[0].set_xlabel("confidence threshold")
    axes[0].set_ylabel("share")
    axes[1].set_xlabel("recall")
    axes[1].set_ylabel("precision")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no line when no method reports a confidence
            ax.legend(fontsize=7)
    if default_threshold is not None:
        axes[0].axvline(default_threshold, color="grey", lw=0.6, ls="--")
    fig.suptitle(textwrap.fill((title + " " if title else "") + "(correct: within 5 deg and 0.05 units)", 140), fontsize=8)
    save_figure(fig, path)
