"""GSLocModel: splatfacto that also trains and renders on the CPU, with depth and alpha outputs.

The model keeps splatfacto's config fields, parameter names and checkpoint layout, so a gsloc run opens
in ns-viewer, ns-render, ns-eval and ns-export like a splatfacto run. What differs:

* rendering goes through :func:`nerfstudio_gsloc.rendering.rasterization` (gsplat on CUDA, this project's
  rasterizer on the CPU) and never calls ``.cuda()``;
* gsplat's absgrad densification is CUDA-only, so it is switched off on the CPU (with a note);
* LPIPS needs AlexNet weights that torchvision would download; it is computed only when they are already
  on disk, otherwise skipped with one warning;
* outputs include expected depth (``depth``, z-depth in scene units) and ``accumulation`` (alpha); a training
  step draws depth only when a depth loss reads it (colour and its gradients are bit-identical without it, and
  one channel less is 5-10% less compositing);
* an optional L1 depth loss when the batch has ``depth_image`` (datasets with ``depth_file_path``);
* the loss's and metrics' SSIM is :class:`~nerfstudio_gsloc.fused_ssim.FusedSSIM` (pytorch_msssim's, fused
  into one C++ pass on the CPU; the same value to float rounding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple, Type, Union

import torch
from gsplat.strategy import DefaultStrategy
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import (
    RGB2SH,
    SplatfactoModel,
    SplatfactoModelConfig,
    num_sh_bases,
    random_quat_tensor,
)
from nerfstudio.utils.colors import get_color
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.fused_ssim import FusedSSIM
from nerfstudio_gsloc.rendering.splat_render import rasterize_splat_model

# torchvision's AlexNet checkpoint, which torchmetrics' LPIPS loads (and would otherwise download).
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


@dataclass
class GSLocModelConfig(SplatfactoModelConfig):
    """Splatfacto's config plus the depth options of gsloc."""

    _target: Type = field(default_factory=lambda: GSLocModel)
    depth_loss_weight: float = 0.1
    """Weight of the L1 loss between rendered expected depth and the dataset's depth (when it has depth)."""
    depth_loss_max_depth: float = 1e3
    """Dataset depths at or beyond this (scene units) are treated as invalid for the depth loss."""


def lpips_weights_available() -> bool:
    """Whether the AlexNet weights that LPIPS needs are already in torch's hub cache."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS).is_file()


class GSLocModel(SplatfactoModel):
    """Splatfacto on any device, with depth/alpha outputs for localization. See the module docstring."""

    config: GSLocModelConfig

    def populate_modules(self) -> None:
        # Written without splatfacto's populate_modules, which calls .cuda() and downloads LPIPS weights.
        if self.seed_points is not None and not self.config.random_init:
            means = torch.nn.Parameter(self.seed_points[0].float())
        else:
            means = torch.nn.Parameter((torch.rand((self.config.num_random, 3)) - 0.5) * self.config.random_scale)
        distances, _ = self.k_nearest_sklearn(means.data, 3)
        avg_dist = torch.from_numpy(distances).float().mean(dim=-1, keepdim=True).clamp_min(1e-7)
        num_points = means.shape[0]
        dim_sh = num_sh_bases(self.config.sh_degree)
        has_seed_colors = (
            self.seed_points is not None and not self.config.random_init and self.seed_points[1].shape[0] > 0
        )
        if has_seed_colors:
            shs = torch.zeros((num_points, dim_sh, 3))
            seed_rgb = self.seed_points[1].float() / 255.0
            shs[:, 0, :] = RGB2SH(seed_rgb) if self.config.sh_degree > 0 else torch.logit(seed_rgb, eps=1e-10)
            # Separate contiguous copies, not views of one tensor: an optimizer that writes a parameter as flat
            # memory (torch's fused CPU Adam ignores strides) would otherwise spill features_dc's updates into
            # features_rest (fox, 1,000 iterations: 2 dB lost until the first densification replaced both).
            features_dc, features_rest = shs[:, 0, :].contiguous(), shs[:, 1:, :].contiguous()
        else:
            features_dc, features_rest = torch.rand(num_points, 3), torch.zeros((num_points, dim_sh - 1, 3))
        self.gauss_params = torch.nn.ParameterDict(
            {
                "means": means,
                "scales": torch.nn.Parameter(torch.log(avg_dist.repeat(1, 3))),
                "quats": torch.nn.Parameter(random_quat_tensor(num_points)),
                "features_dc": torch.nn.Parameter(features_dc),
                "features_rest": torch.nn.Parameter(features_rest),
                "opacities": torch.nn.Parameter(torch.logit(0.1 * torch.ones(num_points, 1))),
            }
        )
        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")

        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = FusedSSIM(data_range=1.0, size_average=True, channel=3)  # splatfacto's SSIM, fused on the CPU
        self.lpips = None
        if lpips_weights_available():
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(normalize=True)
        else:
            warnings.warn(
                f"gsloc: LPIPS skipped: AlexNet weights ({ALEXNET_WEIGHTS}) are not in {torch.hub.get_dir()}/checkpoints "
                "and are never downloaded at run time"
            )
        self.step = 0
        self.crop_box = None
        if self.config.background_color == "random":
            # viser's default background, used when rendering outside training
            self.background_color = torch.tensor([0.1490, 0.1647, 0.2157])
        else:
            self.background_color = get_color(self.config.background_color)
        if self.config.use_bilateral_grid:
            from nerfstudio.model_components.lib_bilagrid import BilateralGrid

            self.bil_grids = BilateralGrid(
                num=self.num_train_data,
                grid_X=self.config.grid_shape[0],
                grid_Y=self.config.grid_shape[1],
                grid_W=self.config.grid_shape[2],
            )

        dataset_metadata = self.kwargs.get("metadata") or {}
        self.trains_on_depth = self.config.depth_loss_weight > 0 and dataset_metadata.get("depth_filenames") is not None
        self.absgrad = self.config.use_absgrad and torch.cuda.is_available()
        if self.config.use_absgrad and not self.absgrad:
            CONSOLE.log("gsloc: absgrad needs CUDA; densifying with plain 2D mean gradients")
        self.strategy = DefaultStrategy(
            prune_opa=self.config.cull_alpha_thresh,
            grow_grad2d=self.config.densify_grad_thresh,
            grow_scale3d=self.config.densify_size_thresh,
            grow_scale2d=self.config.split_screen_size,
            prune_scale3d=self.config.cull_scale_thresh,
            prune_scale2d=self.config.cull_screen_size,
            refine_scale2d_stop_iter=self.config.stop_screen_size_at,
            refine_start_iter=self.config.warmup_length,
            refine_stop_iter=self.config.stop_split_at,
            reset_every=self.config.reset_alpha_every * self.config.refine_every,
            refine_every=self.config.refine_every,
            pause_refine_after_reset=self.num_train_data + self.config.refine_every,
            absgrad=self.absgrad,
            revised_opacity=False,
            verbose=False,
        )
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise GslocError(
                "CUDA was requested (--machine.device-type cuda) but no GPU is usable here; "
                "use --machine.device-type cpu"
            )
        return super().to(*args, **kwargs)

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, list]]:
        """Render one camera.

        Returns:
            ``rgb [H, W, 3]``, ``depth [H, W, 1]`` (expected z-depth; the far value where nothing is drawn, as in
            splatfacto; absent from a training step without a depth loss), ``accumulation [H, W, 1]`` and
            ``background``.
        """
        if not isinstance(camera, Cameras):
            raise TypeError("GSLocModel.get_outputs expects a nerfstudio Cameras object")
        if camera.shape[0] != 1:
            raise ValueError(f"GSLocModel.get_outputs renders one camera at a time, got {camera.shape[0]}")
        if self.training:
            camtoworld = self.camera_optimizer.apply_to_camera(camera)
        else:
            camtoworld = camera.camera_to_worlds

        keep = None
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(self.means).squeeze()
            if keep.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)

        scale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale)
        Ks = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        self.last_size = (height, width)
        camera.rescale_output_resolution(scale)

        if self.config.sh_degree > 0:
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            sh_degree = None
        with_depth = not self.training or self.trains_on_depth
        render, alpha, self.info = rasterize_splat_model(
            self, camtoworld, Ks, width, height, sh_degree=sh_degree, render_mode="RGB+ED" if with_depth else "RGB",
            keep=keep, absgrad=self.absgrad,
        )
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1.0 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], height, width)
        if not self.training:
            background = background.expand(height, width, 3)
        outputs = {"rgb": rgb[0], "accumulation": alpha[0], "background": background}
        if with_depth:
            outputs["depth"] = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max())[0]
        return outputs

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        # the same decision as the render's (get_outputs draws depth in training exactly when this loss reads it)
        if self.trains_on_depth and "depth_image" in batch:
            gt_depth = self._downscale_if_required(batch["depth_image"].to(self.device))
            valid = (gt_depth > 0) & (gt_depth < self.config.depth_loss_max_depth) & (outputs["accumulation"] > 0.5)
            if valid.any():
                error = torch.abs(outputs["depth"] - gt_depth)[valid]
                loss_dict["depth_loss"] = self.config.depth_loss_weight * error.mean()
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        if self.lpips is not None:
            return super().get_image_metrics_and_images(outputs, batch)
        gt_rgb = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        predicted = outputs["rgb"]
        gt_chw, pred_chw = gt_rgb.permute(2, 0, 1)[None], predicted.permute(2, 0, 1)[None]
        metrics = {"psnr": float(self.psnr(gt_chw, pred_chw).item()), "ssim": float(self.ssim(gt_chw, pred_chw))}
        return metrics, {"img": torch.cat([gt_rgb, predicted], dim=1)}
