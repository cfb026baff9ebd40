"""``rasterization``: gsplat 1.4's entry point, with a CPU implementation.

CUDA tensors are handed to ``gsplat.rasterization`` unchanged. CPU tensors go through this project's
pipeline: :func:`~nerfstudio_gsloc.rendering.projection.project_gaussians_fused` (C++ kernel, or the PyTorch
:func:`~nerfstudio_gsloc.rendering.projection.project_gaussians` without a compiler),
:func:`~nerfstudio_gsloc.rendering.tiles.intersect_tiles` (no gradient needed) and
:func:`~nerfstudio_gsloc.rendering.rasterize_to_pixels.rasterize_to_pixels` (C++ kernel or PyTorch).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from nerfstudio_gsloc.rendering.extension import load_cpu_extension
from nerfstudio_gsloc.rendering.projection import (
    evaluate_sh_colors,
    evaluate_sh_colors_fused,
    project_gaussians,
    project_gaussians_fused,
    quat_scale_to_covariance,
)
from nerfstudio_gsloc.rendering.rasterize_to_pixels import rasterize_to_pixels
from nerfstudio_gsloc.rendering.tiles import intersect_tiles

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
# Smaller tiles than gsplat's 16: on the CPU they waste fewer pixel x Gaussian tests on tile borders.
CPU_TILE_SIZE = 8


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = True,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    render_mode: Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"] = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    **kwargs,
) -> tuple[Tensor, Tensor, dict]:
    """Rasterize ``N`` 3D Gaussians into ``C`` pinhole cameras (gsplat 1.4 call and return).

    Args:
        means: ``[N, 3]`` Gaussian centres (world).
        quats: ``[N, 4]`` rotations ``(w, x, y, z)``.
        scales: ``[N, 3]`` standard deviations (not log).
        opacities: ``[N]`` in ``[0, 1]``.
        colors: ``[N, D]`` (or ``[C, N, D]``) features, or ``[N, K, 3]`` SH coefficients with ``sh_degree``.
        viewmats: ``[C, 4, 4]`` OpenCV world-to-camera matrices.
        Ks: ``[C, 3, 3]`` pinhole intrinsics (pixel centres at +0.5).
        width, height: image size.
        near_plane, far_plane: depth range of Gaussian centres that are drawn.
        radius_clip: Gaussians with a footprint radius at most this many pixels are skipped.
        eps2d: low-pass filter added to every 2D covariance.
        sh_degree: use SH colours up to this degree (``colors`` must then be ``[N, K, 3]``).
        packed, sparse_grad: accepted for compatibility; the CPU path is always dense.
        tile_size: tile size of the CUDA path (the CPU path uses ``CPU_TILE_SIZE``).
        backgrounds: ``[C, D]`` background colours (depth channels get 0).
        render_mode: "RGB", "D" (accumulated depth), "ED" (expected depth = D / alpha), "RGB+D", "RGB+ED".
        absgrad: CUDA only (gsplat's absolute means2d gradients); rejected on CPU.
        rasterize_mode: "classic" or "antialiased" (opacity compensation for the eps2d blur).

    Returns:
        ``render_colors [C, H, W, X]``, ``render_alphas [C, H, W, 1]`` and ``meta``, a dict with at least
        ``means2d [C, N, 2]`` (its ``.grad`` is what densification reads), ``radii [C, N]``, ``depths``,
        ``conics``, ``opacities``, ``width``, ``height``, ``n_cameras``, ``tile_size``, ``flatten_ids``,
        ``isect_offsets``, ``camera_ids``/``gaussian_ids`` (None: not packed).
    """
    if render_mode not in RENDER_MODES:
        raise ValueError(f"unknown render_mode {render_mode!r}; expected one of {', '.join(RENDER_MODES)}")
    if rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(f"unknown rasterize_mode {rasterize_mode!r}; expected one of {', '.join(RASTERIZE_MODES)}")

    if means.is_cuda:
        return _rasterization_cuda(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
            far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d, sh_degree=sh_degree, packed=packed,
            tile_size=tile_size, backgrounds=backgrounds, render_mode=render_mode, sparse_grad=sparse_grad,
            absgrad=absgrad, rasterize_mode=rasterize_mode, **kwargs,
        )
    if absgrad:
        raise ValueError("absgrad needs gsplat's CUDA kernels; set use_absgrad=False on the CPU")

    num_gauss, num_cams = means.shape[0], viewmats.shape[0]
    _check_shapes(means, quats, scales, opacities, viewmats, Ks, num_gauss, num_cams)

    project_kwargs = dict(near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, antialiased=rasterize_mode == "antialiased")
    if load_cpu_extension() is not None and not Ks.requires_grad:
        projected = project_gaussians_fused(means, quats, scales, opacities, viewmats, Ks, width, height, **project_kwargs)
    else:  # no compiler, or gradients to the intrinsics wanted: the PyTorch reference
        projected = project_gaussians(
            means, quat_scale_to_covariance(quats, scales), opacities, viewmats, Ks, width, height, **project_kwargs
        )
    radii = projected.radii
    if radius_clip > 0:
        radii = torch.where(radii.float() > radius_clip, radii, torch.zeros_like(radii))

    features = _features_per_camera(colors, means, viewmats, sh_degree, num_cams, num_gauss)
    if render_mode == "RGB":
        pass
    elif render_mode in ("D", "ED"):
        features = projected.depths[..., None]
        backgrounds = torch.zeros(num_cams, 1) if backgrounds is not None else None
    else:
        features = torch.cat([features, projected.depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, torch.zeros(num_cams, 1, dtype=backgrounds.dtype)], dim=-1)

    extents = projected.extents * (radii > 0)[..., None]
    tiles = intersect_tiles(projected.means2d, extents, projected.depths, width, height, CPU_TILE_SIZE)
    render, alphas = rasterize_to_pixels(
        projected.means2d, projected.conics, features, projected.opacities, tiles, width, height, backgrounds,
        extents=extents,
    )
    alphas = alphas[..., None]
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)

    meta = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": projected.means2d,
        "depths": projected.depths,
        "conics": projected.conics,
        "opacities": projected.opacities,
        "tile_width": tiles.tiles_x,
        "tile_height": tiles.tiles_y,
        "flatten_ids": tiles.flatten_ids,
        "isect_offsets": tiles.offsets,
        "width": width,
        "height": height,
        "tile_size": tiles.tile_size,
        "n_cameras": num_cams,
    }
    return render, alphas, meta


def _rasterization_cuda(*args, **kwargs):
    """The CUDA path: gsplat's own kernels. Only reached with CUDA tensors on a machine with a GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA tensors given but torch.cuda.is_available() is False")
    from gsplat import rasterization as gsplat_rasterization

    return gsplat_rasterization(*args, **kwargs)


def _features_per_camera(
    colors: Tensor, means: Tensor, viewmats: Tensor, sh_degree: Optional[int], num_cams: int, num_gauss: int
) -> Tensor:
    """Turn ``colors`` (features or SH coefficients) into ``[C, N, D]`` features."""
    if sh_degree is None:
        if colors.dim() == 2 and colors.shape[0] == num_gauss:
            return colors[None].expand(num_cams, -1, -1)
        if colors.dim() == 3 and colors.shape[:2] == (num_cams, num_gauss):
            return colors
        raise ValueError(f"colors must be [N, D] or [C, N, D] without sh_degree, got {tuple(colors.shape)}")
    if colors.dim() != 3 or colors.shape[0] != num_gauss or colors.shape[-1] != 3:
        raise ValueError(f"colors must be SH coefficients [N, K, 3] with sh_degree, got {tuple(colors.shape)}")
    camera_centers = torch.linalg.inv(viewmats)[:, :3, 3]
    if load_cpu_extension() is not None:
        return evaluate_sh_colors_fused(sh_degree, colors, means, camera_centers)
    return evaluate_sh_colors(sh_degree, colors, means, camera_centers)


def _check_shapes(means, quats, scales, opacities, viewmats, Ks, num_gauss, num_cams) -> None:
    expected = {
        "means": (means, (num_gauss, 3)),
        "quats": (quats, (num_gauss, 4)),
        "scales": (scales, (num_gauss, 3)),
        "opacities": (opacities, (num_gauss,)),
        "viewmats": (viewmats, (num_cams, 4, 4)),
        "Ks": (Ks, (num_cams, 3, 3)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
