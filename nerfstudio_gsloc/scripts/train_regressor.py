"""`gsloc-train-regressor`: train the scene regressor of a run (for ``--method regression`` / ``--init regression``).

Examples::

    gsloc-train-regressor --load-config outputs/lego-200/gsloc/<ts>/config.yml            # train or reuse
    gsloc-train-regressor --load-config .../config.yml --training.max-minutes 5 --force   # retrain, 5 minutes
    gsloc-train-regressor --load-config .../config.yml --training.members 1              # one network

The network (:mod:`nerfstudio_gsloc.localize.regressor`) is trained from scratch on the CPU, no downloaded
weights, from the run's training photos and views rendered from its Gaussian scene around the training cameras
(:mod:`nerfstudio_gsloc.localize.regressor_training`). Weights and metadata go to ``<run>/gsloc_regressor/``
(``regressor.pt``, ``regressor.json``). By default three networks (bfloat16 convolutions, on CPUs that have them),
two (float32, AVX-512) or one (float32, narrower CPUs) train side by side and localize together
(``--training.members``, ``--training.precision``); a later call with the same settings reuses them while the
run's checkpoint is unchanged (path, size and modification time) and retrains when it changed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nerfstudio_gsloc.errors import GslocError, run_cli
from nerfstudio_gsloc.files import check_writable
from nerfstudio_gsloc.localize.regressor import SceneRegressor
from nerfstudio_gsloc.localize.regressor_files import (UNDISTORTED_VIEWS, is_up_to_date, load_regressor, read_meta,
                                                       regressor_dir, save_regressor, write_meta)
from nerfstudio_gsloc.localize.regressor_settings import RegressorTrainConfig, member_configs
from nerfstudio_gsloc.localize.regressor_training import calibrate_depth_scale, train_members
from nerfstudio_gsloc.localize.regressor_training_set import build_training_set
from nerfstudio_gsloc.localize.retrieval import checkpoint_fingerprint
from nerfstudio_gsloc.localize.scene_map import TrainingView, load_training_views, training_photos_have_lens_distortion

CONSOLE = Console(width=None if sys.stdout.isatty() else 160)


@dataclass
class TrainRegressorCLI:
    """Train the scene regressor of a gsloc run (global localization in one forward pass)."""

    load_config: Path
    """The run's config.yml."""
    training: RegressorTrainConfig = field(default_factory=RegressorTrainConfig)
    """Network size, data, losses, schedule."""
    output_dir: Optional[Path] = None
    """Where regressor.pt and regressor.json go (default: <run>/gsloc_regressor, where ns-localize looks)."""
    force: bool = False
    """Retrain even when up-to-date weights exist."""
    num_threads: Optional[int] = None
    """torch CPU threads (default: torch's choice)."""

    def main(self) -> None:
        from nerfstudio_gsloc.runs import check_run, load_run

        if self.num_threads is not None:
            if self.num_threads < 1:
                raise GslocError("--num-threads must be at least 1")
            torch.set_num_threads(self.num_threads)
        check_run(self.load_config)
        folder = Path(self.output_dir) if self.output_dir is not None else regressor_dir(Path(self.load_config).parent)
        check_writable(folder, "--output-dir")
        with CONSOLE.status("loading the run"):
            _, pipeline = load_run(self.load_config)
        train_or_reuse(pipeline.model, load_training_views(pipeline), pipeline.gsloc_checkpoint, folder,
                       self.training, self.force, console=CONSOLE,
                       lens_distortion=training_photos_have_lens_distortion(pipeline))


def train_or_reuse(model, views: Sequence[TrainingView], checkpoint: Optional[Path], folder: Path,
                   config: RegressorTrainConfig, force: bool = False, console: Optional[Console] = None,
                   show_progress: bool = True, lens_distortion: bool = False) -> Dict[str, Any]:
    """Train the regressor of ``model`` into ``folder``, or reuse what is there.

    Weights are reused when ``regressor.json`` records the same ``checkpoint`` (path, size, modification time)
    and the same settings (:meth:`RegressorTrainConfig.key`), unless ``force``.

    Args:
        model: the trained Gaussian scene; views: its training photos (scene frame).
        checkpoint: the checkpoint file the model was loaded from (``None``: weights are never reused).
        folder: where ``regressor.pt`` / ``regressor.json`` go.
        config: training settings.
        lens_distortion: the run's photos have a lens (``views`` are undistorted): weights not recorded as
            trained on undistorted photos are retrained (:func:`~nerfstudio_gsloc.localize.regressor_files.unusable_reason`).

    Returns:
        the metadata written (or read), with ``"reused": True/False``.
    """
    console = console or CONSOLE
    key = config.key()
    if not force and checkpoint is not None and is_up_to_date(folder, checkpoint, key, lens_distortion):
        meta = read_meta(folder) or {}
        console.print(f"regressor in {folder} is up to date (trained in {meta.get('training_seconds', 0):.0f} s for "
                      f"this checkpoint): reused; --force retrains it")
        if "depth_scale" not in meta:  # saved before the calibration existed: calibrate it now, keep the weights
            meta["depth_scale_calibration"] = calibrate_depth_scale(load_regressor(folder, checkpoint), views)
            meta["depth_scale"] = meta["depth_scale_calibration"]["depth_scale"]
            write_meta(folder, meta)  # the weights file stays as it is
            console.print(_depth_scale_line(meta["depth_scale_calibration"]))
        return {**meta, "reused": True}
    if (Path(folder) / "regressor.json").is_file() and not force:
        distorted = lens_distortion and (read_meta(folder) or {}).get("training_views") != UNDISTORTED_VIEWS
        why = "may have been trained on this capture's distorted photos" if distorted else \
            "was trained for another checkpoint or settings"
        console.print(f"regressor in {folder} {why}: retraining")
    started, cpu_started = time.perf_counter(), time.process_time()
    budget = 60.0 * config.max_minutes
    progress = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                        disable=not show_progress, transient=False)
    with progress:
        members = member_configs(config)
        per_member = len(views) + config.rendered_views
        render_task = progress.add_task("", total=len(members) * per_member, stage="training views")
        datasets = []
        for m, member in enumerate(members):  # each member its own rendered views (its seed), the same photos
            data, net_config = build_training_set(
                model, views, member,
                on_progress=lambda done, total, m=m: progress.update(render_task, completed=m * per_member + done))
            datasets.append(data)
        data_seconds = time.perf_counter() - started
        def member_callback(member: int):
            name = "training" if len(members) == 1 else f"training {member + 1}/{len(members)}"
            task = progress.add_task("", total=config.steps, stage=name)

            def on_step(step: int, total: int, losses: Dict[str, float]) -> None:
                if step % 5 == 0 or step == total:
                    text = " ".join(f"{key} {value:.3f}" for key, value in losses.items())
                    progress.update(task, completed=step, description=text)
                    if show_progress and not console.is_terminal and step % 250 == 0:  # no live bar in a log file
                        console.print(f"{name} step {step}/{total} ({time.perf_counter() - started:.0f} s): {text}")

            return on_step

        nets, summaries = train_members(datasets, net_config, config, budget_seconds=max(1.0, budget - data_seconds),
                                        on_step=member_callback)
    summary = summaries[0] if len(summaries) == 1 else {
        "steps": min(s["steps"] for s in summaries), "skipped_steps": sum(s["skipped_steps"] for s in summaries),
        "seconds": max(s["seconds"] for s in summaries), "final_losses": summaries[0]["final_losses"],
        "precision": summaries[0]["precision"], "members": summaries}
    calibration = calibrate_depth_scale(SceneRegressor(nets), views)
    seconds = time.perf_counter() - started
    meta = {
        "checkpoint": None if checkpoint is None else checkpoint_fingerprint(Path(checkpoint)),
        "settings_key": key,
        "settings": dataclasses.asdict(config),
        "training_seconds": round(seconds, 1),
        "training_cpu_seconds": round(time.process_time() - cpu_started, 1),
        "data_seconds": round(data_seconds, 1),
        "threads": torch.get_num_threads(),
        "views": {"real": int(data.real.sum()), "rendered": sum(int((~d.real).sum()) for d in datasets)},
        "input_size": [net_config.input_height, net_config.input_width],
        "parameters": sum(p.numel() for net in nets for p in net.parameters()),
        "training_views": UNDISTORTED_VIEWS,
        "depth_scale": calibration["depth_scale"],
        "depth_scale_calibration": calibration,
        **summary,
    }
    save_regressor(folder, nets, meta)
    networks = "" if len(nets) == 1 else f"{len(nets)} networks side by side, "
    console.print(f"regressor trained in {seconds / 60:.1f} min ({data_seconds:.0f} s rendering "
                  f"{sum(len(d.real) for d in datasets)} views, "
                  f"{networks}{summary['steps']} steps, {summary['precision']}, {torch.get_num_threads()} thread(s)); "
                  f"saved to {folder}")
    console.print(_depth_scale_line(calibration))
    return {**meta, "reused": False}


def _depth_scale_line(calibration: Dict[str, Any]) -> str:
    return (f"depth scale {calibration['depth_scale']:.4f}, calibrated on {calibration['views']} training photos "
            f"(median camera-centre error {calibration['median_error_unscaled']:.4g} -> "
            f"{calibration['median_error']:.4g} scene units)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    tyro.cli(TrainRegressorCLI, args=list(sys.argv[1:] if argv is None else argv)).main()


def entrypoint() -> None:
    """Console script ``gsloc-train-regressor``."""
    run_cli(main)


if __name__ == "__main__":
    entrypoint()
