"""Render a trained splatfacto-style model from arbitrary nerfstudio camera poses.

This is the interface between a trained scene and localization: poses in, RGB, expected depth and
alpha out, differentiable with respect to the poses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c
from nerfstudio_gsloc.rendering.rasterization import rasterization


@dataclass
class RenderedViews:
    """Renders of ``B`` cameras.

    Attributes:
        rgb: ``[B, H, W, 3]`` colours in ``[0, 1]``, composited over the background.
        depth: ``[B, H, W, 1]`` expected z-depth (OpenCV camera axis, scene units); 0 where alpha is 0.
        alpha: ``[B, H, W, 1]`` accumulated opacity.
    """

    rgb: Tensor
    depth: Tensor
    alpha: Tensor


def render_splat_model(
    model,
    camtoworlds: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    background: Optional[Tensor] = None,
) -> RenderedViews:
    """Render a splatfacto-compatible model (``SplatfactoModel`` or ``GSLocModel``).

    Args:
        model: a model with ``means``, ``scales`` (log), ``quats``, ``opacities`` (logit), ``features_dc``
            and ``features_rest`` and a splatfacto config (``sh_degree``, ``rasterize_mode``).
        camtoworlds: ``[B, 3|4, 4]`` OpenGL camera-to-world poses in the model's (dataparser) frame.
        Ks: ``[B, 3, 3]`` intrinsics in pixels for the ``width`` x ``height`` images.
        width, height: output size.
        background: ``[3]`` background colour; default: the model's own background colour.

    Returns:
        :class:`RenderedViews`, differentiable w.r.t. ``camtoworlds`` (and the model's parameters).
    """
    device = model.means.device
    viewmats = opengl_c2w_to_opencv_w2c(camtoworlds.to(device))
    colors = torch.cat([model.features_dc[:, None, :], model.features_rest], dim=1)
    sh_degree = model.config.sh_degree
    if sh_degree > 0:
        sh_degree_to_use: Optional[int] = sh_degree
    else:
        colors, sh_degree_to_use = torch.sigmoid(colors).squeeze(1), None
    render, alpha, _ = rasterization(
        means=model.means,
        quats=model.quats,
        scales=torch.exp(model.scales),
        opacities=torch.sigmoid(model.opacities).squeeze(-1),
        colors=colors,
        viewmats=viewmats,
        Ks=Ks.to(device),
        width=width,
        height=height,
        sh_degree=sh_degree_to_use,
        render_mode="RGB+ED",
        rasterize_mode=model.config.rasterize_mode,
        packed=False,
        absgrad=False,
    )
    if background is None:
        background = model.background_color
    background = background.to(device=device, dtype=render.dtype)
    rgb = torch.clamp(render[..., :3] + (1.0 - alpha) * background, 0.0, 1.0)
    depth = torch.where(alpha > 0, render[..., 3:4], torch.zeros_like(alpha))
    return RenderedViews(rgb=rgb, depth=depth, alpha=alpha)
