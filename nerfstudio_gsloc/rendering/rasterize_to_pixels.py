"""Alpha compositing of tile-binned 2D Gaussians into pixels, on the CPU.

Two implementations of the same function:

* ``rasterize_to_pixels_torch``: vectorised PyTorch over padded per-tile lists; readable, autograd does
  the backward pass. It is the reference the fast path is tested against, and the fallback when no C++
  compiler is available.
* the C++ kernel in ``csrc/rasterize_cpu.cpp``, compiled on first use with ``torch.utils.cpp_extension``
  (cached in ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), with a hand-written
  backward pass. ``rasterize_to_pixels`` picks it when it builds.

Compositing rules (those of gsplat): front to back, ``alpha = min(0.999, opacity * exp(-sigma))`` with
``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``; Gaussians with ``alpha < 1/255`` or ``sigma < 0`` are
skipped; a pixel stops before the Gaussian that would bring its transmittance to ``<= 1e-4``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nerfstudio_gsloc.rendering.extension import load_cpu_extension
from nerfstudio_gsloc.rendering.tiles import TileIntersections

_ALPHA_MIN = 1.0 / 255.0
_ALPHA_MAX = 0.999
_TRANSMITTANCE_MIN = 1e-4
class _RasterizeCPU(torch.autograd.Function):
    """Autograd wrapper of the C++ kernel."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, extents, offsets, flatten_ids, width, height, tile_size):
        ext = load_cpu_extension()
        render, alphas, last_ids, used = ext.rasterize_forward(
            means2d, conics, colors, opacities, backgrounds, extents, offsets, flatten_ids, width, height, tile_size
        )
        ctx.save_for_backward(
            means2d, conics, colors, opacities, backgrounds, extents, offsets, flatten_ids, alphas, last_ids, used
        )
        ctx.size = (width, height, tile_size)
        ctx.has_background = backgrounds.numel() > 0
        return render, alphas

    @staticmethod
    def backward(ctx, v_render, v_alphas):
        means2d, conics, colors, opacities, backgrounds, extents, offsets, flatten_ids, alphas, last_ids, used = ctx.saved_tensors
        width, height, tile_size = ctx.size
        ext = load_cpu_extension()
        (per_gauss,) = ext.rasterize_backward(
            means2d, conics, colors, opacities, backgrounds, extents, offsets, flatten_ids, width, height, tile_size,
            alphas, last_ids, used, v_render.contiguous(), v_alphas.contiguous(),
        )
        num_cams, num_gauss, dim = colors.shape
        per_gauss = per_gauss.reshape(num_cams, num_gauss, -1)
        v_means2d = per_gauss[..., 0:2]
        v_conics = per_gauss[..., 2:5]
        v_opacities = per_gauss[..., 5]
        v_colors = per_gauss[..., 6:]
        v_backgrounds = None
        if ctx.has_background and ctx.needs_input_grad[4]:
            v_backgrounds = (v_render * (1.0 - alphas)[..., None]).sum(dim=(1, 2))
        return v_means2d, v_conics, v_colors, v_opacities, v_backgrounds, None, None, None, None, None, None


def rasterize_to_pixels_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    tiles: TileIntersections,
    width: int,
    height: int,
    backgrounds: Optional[Tensor] = None,
    max_pairs_per_chunk: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """PyTorch reference compositor (autograd backward). Same arguments as :func:`rasterize_to_pixels`."""
    num_cams, num_gauss, dim = colors.shape
    ts = tiles.tile_size
    counts = tiles.offsets[1:] - tiles.offsets[:-1]  # [T]
    num_tiles = counts.numel()
    tiles_per_cam = tiles.tiles_x * tiles.tiles_y
    flat_xy, flat_conic = means2d.reshape(-1, 2), conics.reshape(-1, 3)
    flat_col, flat_op = colors.reshape(-1, dim), opacities.reshape(-1)

    # Pixel centres of a tile relative to its corner, [P, 2] with P = ts * ts.
    ly, lx = torch.meshgrid(torch.arange(ts), torch.arange(ts), indexing="ij")
    local = torch.stack([lx.reshape(-1), ly.reshape(-1)], dim=-1).to(means2d.dtype) + 0.5

    canvas = torch.zeros(num_cams, tiles.tiles_y * ts, tiles.tiles_x * ts, dim + 1, dtype=means2d.dtype)
    pixels_per_tile = ts * ts
    chunk_rows = []
    start = 0
    while start < num_tiles:  # group tiles so that tiles x pixels x max-list-length stays bounded
        stop = start + 1
        longest = int(counts[start])
        while stop < num_tiles and (stop - start + 1) * pixels_per_tile * max(longest, int(counts[stop])) <= max_pairs_per_chunk:
            longest = max(longest, int(counts[stop]))
            stop += 1
        chunk_rows.append((start, stop, longest))
        start = stop

    for start, stop, longest in chunk_rows:
        tile_ids = torch.arange(start, stop)
        out = torch.zeros(stop - start, pixels_per_tile, dim + 1, dtype=means2d.dtype)
        if longest > 0:
            slot = torch.arange(longest)
            present = slot[None] < counts[tile_ids, None]  # [t, K]
            isect = torch.where(present, tiles.offsets[tile_ids, None] + slot[None], torch.zeros_like(slot[None]))
            gid = tiles.flatten_ids[isect]  # [t, K]
            tile_in_cam = tile_ids % tiles_per_cam
            corner = torch.stack([tile_in_cam % tiles.tiles_x, tile_in_cam // tiles.tiles_x], -1).to(means2d.dtype) * ts
            pix = corner[:, None, :] + local[None]  # [t, P, 2]
            delta = flat_xy[gid][:, None, :, :] - pix[:, :, None, :]  # [t, P, K, 2]
            q = flat_conic[gid][:, None]  # [t, 1, K, 3]
            dx, dy = delta[..., 0], delta[..., 1]
            sigma = 0.5 * (q[..., 0] * dx * dx + q[..., 2] * dy * dy) + q[..., 1] * dx * dy
            alpha = torch.clamp_max(flat_op[gid][:, None] * torch.exp(-sigma), _ALPHA_MAX)
            alpha = torch.where((sigma >= 0) & (alpha >= _ALPHA_MIN) & present[:, None], alpha, torch.zeros_like(alpha))
            inclusive = torch.cumprod(1.0 - alpha, dim=-1)
            alpha = alpha * (inclusive > _TRANSMITTANCE_MIN)  # the early stop, as a prefix mask
            transmittance = torch.cumprod(1.0 - alpha, dim=-1)
            before = torch.cat([torch.ones_like(transmittance[..., :1]), transmittance[..., :-1]], dim=-1)
            weights = alpha * before  # [t, P, K]
            out[..., :dim] = torch.einsum("tpk,tkd->tpd", weights, flat_col[gid])
            out[..., dim] = 1.0 - transmittance[..., -1]
        cams = tile_ids // tiles_per_cam
        tile_in_cam = tile_ids % tiles_per_cam
        block = out.reshape(-1, ts, ts, dim + 1)
        for row, (c, t) in enumerate(zip(cams.tolist(), tile_in_cam.tolist())):
            ty, tx = divmod(t, tiles.tiles_x)
            canvas[c, ty * ts : (ty + 1) * ts, tx * ts : (tx + 1) * ts] = block[row]

    canvas = canvas[:, :height, :width]
    render, alphas = canvas[..., :dim], canvas[..., dim]
    if backgrounds is not None:
        render = render + (1.0 - alphas)[..., None] * backgrounds[:, None, None, :]
    return render, alphas


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    tiles: TileIntersections,
    width: int,
    height: int,
    backgrounds: Optional[Tensor] = None,
    use_cpp: Optional[bool] = None,
    extents: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians into images (CPU).

    Args:
        means2d: ``[C, N, 2]`` pixel coordinates.
        conics: ``[C, N, 3]`` inverse 2D covariances ``(a, b, c)``.
        colors: ``[C, N, D]`` features to blend.
        opacities: ``[C, N]``.
        tiles: tile lists from :func:`~nerfstudio_gsloc.rendering.tiles.intersect_tiles`.
        width, height: image size.
        backgrounds: optional ``[C, D]`` colour behind the Gaussians.
        use_cpp: force (True) or forbid (False) the C++ kernel; None = use it when it builds.
        extents: optional ``[C, N, 2]`` footprint half-sizes from the projection (alpha < 1/255 beyond them);
            the C++ kernel then tests each Gaussian only on the tile rows it reaches. Same result, less work.

    Returns:
        ``(render [C, H, W, D], alphas [C, H, W])``; differentiable w.r.t. means2d, conics, colors,
        opacities and backgrounds.
    """
    if use_cpp is None:
        use_cpp = load_cpu_extension() is not None
    if not use_cpp:
        return rasterize_to_pixels_torch(means2d, conics, colors, opacities, tiles, width, height, backgrounds)
    if load_cpu_extension() is None:
        raise RuntimeError("the C++ CPU rasterizer is not available")
    bg = backgrounds.contiguous().float() if backgrounds is not None else torch.empty(0)
    ext = extents.detach().contiguous().float() if extents is not None else torch.empty(0)
    return _RasterizeCPU.apply(
        means2d.contiguous().float(), conics.contiguous().float(), colors.contiguous().float(),
        opacities.contiguous().float(), bg, ext, tiles.offsets.contiguous(), tiles.flatten_ids.contiguous(),
        width, height, tiles.tile_size,
    )
