"""Render a trained splatfacto-style model from arbitrary nerfstudio camera poses.

This is the interface between a trained scene and localization: poses in, RGB, expected depth and
alpha out, differentiable with respect to the poses.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
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


def rasterize_splat_model(
    model,
    camtoworlds: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int],
    render_mode: str = "RGB+ED",
    keep: Optional[Tensor] = None,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor, dict]:
    """Rasterize a splatfacto-style model's Gaussians (no background, no clamping).

    Args:
        model: has ``means``, ``scales`` (log), ``quats``, ``opacities`` (logit), ``features_dc``,
            ``features_rest`` and a splatfacto config (``sh_degree``, ``rasterize_mode``).
        camtoworlds: ``[B, 3|4, 4]`` OpenGL camera-to-world poses in the model's (dataparser) frame.
        Ks: ``[B, 3, 3]`` intrinsics for ``width`` x ``height`` images.
        sh_degree: SH degree to evaluate; None when the model stores plain colours (``sh_degree == 0``).
        render_mode: as in :func:`~nerfstudio_gsloc.rendering.rasterization.rasterization`.
        keep: optional ``[N]`` bool mask of Gaussians to draw (a crop box).
        absgrad: gsplat's absolute gradients (CUDA only).

    Returns:
        ``render [B, H, W, X]``, ``alpha [B, H, W, 1]`` and the rasterizer's ``meta``.
    """
    device = model.means.device
    params = {
        "means": model.means,
        "quats": model.quats,
        "scales": model.scales,
        "opacities": model.opacities,
        "features_dc": model.features_dc,
        "features_rest": model.features_rest,
    }
    if keep is not None:
        params = {name: value[keep] for name, value in params.items()}
    colors = torch.cat([params["features_dc"][:, None, :], params["features_rest"]], dim=1)
    if model.config.sh_degree == 0:
        colors, sh_degree = torch.sigmoid(colors).squeeze(1), None
    return rasterization(
        means=params["means"],
        quats=params["quats"],
        scales=torch.exp(params["scales"]),
        opacities=torch.sigmoid(params["opacities"]).squeeze(-1),
        colors=colors,
        viewmats=opengl_c2w_to_opencv_w2c(camtoworlds.to(device)),
        Ks=Ks.to(device),
        width=width,
        height=height,
        sh_degree=sh_degree,
        render_mode=render_mode,
        rasterize_mode=model.config.rasterize_mode,
        packed=False,
        absgrad=absgrad,
    )


def render_splat_model(
    model,
    camtoworlds: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    background: Optional[Tensor] = None,
) -> RenderedViews:
    """Render a trained splatfacto-compatible model (``SplatfactoModel`` or ``GSLocModel``) at full SH degree.

    Args:
        model: see :func:`rasterize_splat_model`.
        camtoworlds: ``[B, 3|4, 4]`` OpenGL camera-to-world poses in the model's (dataparser) frame.
        Ks: ``[B, 3, 3]`` intrinsics in pixels for the ``width`` x ``height`` images.
        width, height: output size.
        background: ``[3]`` background colour; default: the model's own background colour.

    Returns:
        :class:`RenderedViews`, differentiable w.r.t. ``camtoworlds`` (and the model's parameters).
    """
    sh_degree = model.config.sh_degree if model.config.sh_degree > 0 else None
    render, alpha, _ = rasterize_splat_model(model, camtoworlds, Ks, width, height, sh_degree=sh_degree)
    if background is None:
        background = model.background_color
    background = background.to(device=render.device, dtype=render.dtype)
    rgb = torch.clamp(render[..., :3] + (1.0 - alpha) * background, 0.0, 1.0)
    depth = torch.where(alpha > 0, render[..., 3:4], torch.zeros_like(alpha))
    return RenderedViews(rgb=rgb, depth=depth, alpha=alpha)


def frustum_subset(model, camtoworlds: Tensor, Ks: Tensor, width: int, height: int, margin: float = 0.25):
    """The model's Gaussians that can reach the images of ``camtoworlds`` or of poses close to them.

    A Gaussian is kept when its centre is in front of any of the cameras (z > 0.01) and projects within the
    image grown by ``margin`` x its size on every side plus the Gaussian's own 3-sigma footprint. Refinement
    steps of a fraction of a degree move the image by a few pixels, far less than the margin, so the renders of
    the subset equal those of the whole model while projection, colours and binning skip the rest (a room view
    sees a fraction of its Gaussians).

    Args:
        model: see :func:`rasterize_splat_model`.
        camtoworlds: ``[B, 3|4, 4]`` OpenGL camera-to-world poses; ``Ks``: ``[B, 3, 3]`` for ``width x height``.
        margin: extra border as a fraction of the image size.

    Returns:
        An object with the model's Gaussian attributes restricted to the kept ones (same names, detached), its
        ``config`` and ``background_color``: renders with :func:`render_splat_model` like the model.
    """
    with torch.no_grad():
        means = model.means.detach()
        w2c = opengl_c2w_to_opencv_w2c(camtoworlds.to(means))
        cam = torch.einsum("bij,nj->bni", w2c[:, :3, :3], means) + w2c[:, None, :3, 3]  # [B, N, 3]
        z = cam[..., 2]
        Ks = Ks.to(means)
        u = Ks[:, None, 0, 0] * cam[..., 0] / z.clamp_min(1e-6) + Ks[:, None, 0, 2]
        v = Ks[:, None, 1, 1] * cam[..., 1] / z.clamp_min(1e-6) + Ks[:, None, 1, 2]
        radius = 3.0 * torch.exp(model.scales.detach()).amax(dim=-1)[None] * Ks[:, None, 0, 0] / z.clamp_min(1e-6)
        pad_u, pad_v = margin * width + radius, margin * height + radius
        inside = (z > 0.01) & (u > -pad_u) & (u < width + pad_u) & (v > -pad_v) & (v < height + pad_v)
        keep = inside.any(dim=0)
        names = ("means", "quats", "scales", "opacities", "features_dc", "features_rest")
        subset = {name: getattr(model, name).detach()[keep] for name in names}
    return SimpleNamespace(**subset, config=model.config, background_color=model.background_color)
