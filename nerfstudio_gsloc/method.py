"""`ns-train gsloc`: the method specification registered with nerfstudio (entry point `nerfstudio.method_configs`).

The default schedule is splatfacto's, shortened and retuned for CPU training of small scenes (a few
hundred pixels): no resolution schedule, plain-gradient densification (absgrad is CUDA-only) with the
matching threshold, the Gaussians' Adam stepped by a one-pass CPU kernel (:mod:`~nerfstudio_gsloc.gaussian_adam`), and
the viewer quits when training finishes so scripted runs end.

The first Gaussians come from :class:`~nerfstudio_gsloc.data.seeding.GSLocDatamanager`, with whatever dataparser
the user names: the dataset's point cloud, else back-projected depth, else points triangulated from the training
images with their poses (cached as ``seed_points.npz`` beside config.yml), else random points in the cameras' frusta.
Note that ``--max-num-iterations`` alone does not shorten the means' learning-rate decay
(``--optimizers.means.scheduler.max-steps``) or densification (``--pipeline.model.stop-split-at``).
"""

from __future__ import annotations

from pathlib import Path

from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from nerfstudio_gsloc import compat
from nerfstudio_gsloc.data.depth import GSLocDataParserConfig
from nerfstudio_gsloc.data.seeding import GSLocDatamanagerConfig
from nerfstudio_gsloc.gaussian_adam import GaussianAdamConfig
from nerfstudio_gsloc.model import GSLocModelConfig

compat.allow_nerfstudio_checkpoints()
compat.install_gsloc_excepthook()

DEFAULT_ITERATIONS = 7000


#: What a run folder holds before its first checkpoint (nerfstudio's config, logs and viewer log, our seed cache).
_UNFINISHED_RUN_FILES = ("config.yml", "dataparser_transforms.json", "seed_points.npz", "seed_points.json",
                         "viewer_log_filename.txt", "nerfstudio_models")


def remove_unfinished_run(base_dir: Path, output_dir: Path) -> bool:
    """Remove a run folder that holds nothing but what a run writes before training (no checkpoint).

    ``ns-train`` writes config.yml before the data is loaded, so a run that stops on a data error would leave
    ``<output>/<dataset>/gsloc/<timestamp>/config.yml`` behind, which looks like a run but cannot be loaded. The
    folder is removed only when every entry in it is a known pre-training file (or a tensorboard log) and
    ``nerfstudio_models`` holds no checkpoint; then its parents are removed while they are empty, up to (not
    including) ``output_dir``. Returns whether the folder was removed.
    """
    import shutil

    base_dir, output_dir = Path(base_dir), Path(output_dir)
    if not base_dir.is_dir():
        return False
    for entry in base_dir.iterdir():
        known = entry.name in _UNFINISHED_RUN_FILES or entry.name.startswith("events.out.tfevents")
        if not known or (entry.is_dir() and any(entry.iterdir())):
            return False
    shutil.rmtree(base_dir)
    for parent in base_dir.parents:
        if parent == output_dir or output_dir not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: other runs
            break
    return True


class GSLocTrainer(Trainer):
    """nerfstudio's trainer, telling the datamanager where the run's seed-point cache lives before it seeds, and
    removing the run folder again when set-up fails (bad data, Ctrl-C) before anything was trained."""

    def setup(self, test_mode="val") -> None:
        datamanager = self.config.pipeline.datamanager
        if hasattr(datamanager, "seed_cache_dirs"):
            # a new cache goes into this run's folder; a resumed run (--load-dir) also finds its source run's
            dirs = [self.base_dir]
            if self.config.load_dir is not None:
                dirs.append(Path(self.config.load_dir).parent)
            datamanager.seed_cache_dirs = tuple(dirs)
        try:
            super().setup(test_mode=test_mode)
        except BaseException:
            remove_unfinished_run(self.base_dir, self.config.output_dir)
            raise


def gsloc_trainer_config(max_iterations: int = DEFAULT_ITERATIONS) -> TrainerConfig:
    """The `gsloc` training schedule for ``max_iterations`` steps (learning-rate decay follows it)."""
    return TrainerConfig(
        _target=GSLocTrainer,
        method_name="gsloc",
        steps_per_eval_image=250,
        steps_per_eval_batch=0,
        steps_per_save=1000,
        steps_per_eval_all_images=1_000_000,  # ns-eval does the full evaluation; mid-training it costs minutes on a CPU
        max_num_iterations=max_iterations,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=GSLocDatamanagerConfig(
                dataparser=GSLocDataParserConfig(load_3D_points=True),
                cache_images_type="uint8",
            ),
            model=GSLocModelConfig(
                num_downscales=0,
                use_absgrad=False,
                densify_grad_thresh=0.0002,
                warmup_length=300,
                refine_every=100,
                stop_split_at=max_iterations // 2,
                sh_degree_interval=500,
                num_random=20_000,
                random_scale=3.0,
            ),
        ),
        optimizers={
            "means": {
                "optimizer": GaussianAdamConfig(lr=1.6e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_iterations),
            },
            "features_dc": {"optimizer": GaussianAdamConfig(lr=0.0025, eps=1e-15), "scheduler": None},
            "features_rest": {"optimizer": GaussianAdamConfig(lr=0.0025 / 20, eps=1e-15), "scheduler": None},
            "opacities": {"optimizer": GaussianAdamConfig(lr=0.05, eps=1e-15), "scheduler": None},
            "scales": {"optimizer": GaussianAdamConfig(lr=0.005, eps=1e-15), "scheduler": None},
            "quats": {"optimizer": GaussianAdamConfig(lr=0.001, eps=1e-15), "scheduler": None},
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(
                    lr_final=5e-7, max_steps=max_iterations, warmup_steps=1000, lr_pre_warmup=0
                ),
            },
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, quit_on_train_completion=True),
        vis="viewer",
        machine=MachineConfig(device_type=compat.default_device_type()),
    )


gsloc_method = MethodSpecification(
    config=gsloc_trainer_config(),
    description="Gaussian splatting for camera localization (splatfacto-compatible, trains on CPU or CUDA)",
)
