"""Tile binning: which Gaussians may touch which image tile, sorted front to back.

The image of every camera is cut into square tiles of ``tile_size`` pixels. A Gaussian is listed in
every tile that its footprint ellipse's bounding box (centre +- extents) overlaps. The lists are stored the way
gsplat stores them: one flat array of Gaussian ids, grouped by (camera, tile) and sorted by depth within
a group, plus offsets saying where each group starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nerfstudio_gsloc.rendering.extension import load_cpu_extension


@dataclass
class TileIntersections:
    """Flattened per-tile Gaussian lists for ``C`` cameras.

    Attributes:
        tile_size: tile edge in pixels.
        tiles_x, tiles_y: number of tiles across and down.
        offsets: ``[C * tiles_y * tiles_x + 1]`` int64; tile ``t`` (row-major within its camera, cameras
            concatenated) owns ``flatten_ids[offsets[t]:offsets[t + 1]]``.
        flatten_ids: ``[M]`` int64 indices into the flattened ``C * N`` projected Gaussians, front to back
            within each tile.
    """

    tile_size: int
    tiles_x: int
    tiles_y: int
    offsets: Tensor
    flatten_ids: Tensor

    @property
    def num_intersections(self) -> int:
        return int(self.flatten_ids.numel())


@torch.no_grad()
def intersect_tiles(
    means2d: Tensor, extents: Tensor, depths: Tensor, width: int, height: int, tile_size: int, use_cpp: bool | None = None
) -> TileIntersections:
    """Bin projected Gaussians into tiles.

    Args:
        means2d: ``[C, N, 2]`` pixel coordinates.
        extents: ``[C, N, 2]`` footprint half-width and half-height in pixels; 0 means culled.
        depths: ``[C, N]`` camera-space depths used for the front-to-back order.
        width, height: image size.
        tile_size: tile edge in pixels.
        use_cpp: use the C++ counting sort (default: when the extension builds) instead of PyTorch sorts.

    Returns:
        :class:`TileIntersections`.
    """
    num_cams, num_gauss = extents.shape[:2]
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    tiles_per_cam = tiles_x * tiles_y

    visible = (extents[..., 0] > 0).reshape(-1).nonzero().squeeze(-1)  # flat ids c * N + n
    if use_cpp is None:
        use_cpp = load_cpu_extension() is not None
    if use_cpp:  # the same stable depth sort and counting sort, in C++
        offsets, flatten_ids = load_cpu_extension().bin_tiles(
            means2d.detach().float().contiguous(), extents.float().contiguous(), depths.detach().float().contiguous(),
            visible, width, height, tile_size,
        )
        return TileIntersections(tile_size, tiles_x, tiles_y, offsets, flatten_ids)
    # Front-to-back order first; the stable sort by tile below keeps it within each tile.
    visible = visible[torch.argsort(depths.reshape(-1)[visible], stable=True)]

    cam = visible // num_gauss
    xy = means2d.detach().reshape(-1, 2)[visible]
    ext = extents.reshape(-1, 2)[visible].to(xy.dtype)

    x_min = torch.clamp(torch.floor((xy[:, 0] - ext[:, 0]) / tile_size), 0, tiles_x).long()
    x_max = torch.clamp(torch.ceil((xy[:, 0] + ext[:, 0]) / tile_size), 0, tiles_x).long()
    y_min = torch.clamp(torch.floor((xy[:, 1] - ext[:, 1]) / tile_size), 0, tiles_y).long()
    y_max = torch.clamp(torch.ceil((xy[:, 1] + ext[:, 1]) / tile_size), 0, tiles_y).long()
    span_x = x_max - x_min
    counts = span_x * (y_max - y_min)

    owner = torch.repeat_interleave(torch.arange(visible.numel(), device=xy.device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.numel(), device=xy.device) - first[owner]
    span_owner = span_x[owner]
    tile_x = x_min[owner] + local % span_owner
    tile_y = y_min[owner] + local // span_owner
    tile_key = cam[owner] * tiles_per_cam + tile_y * tiles_x + tile_x

    tile_key, order = torch.sort(tile_key, stable=True)
    flatten_ids = visible[owner[order]]
    per_tile = torch.bincount(tile_key, minlength=num_cams * tiles_per_cam)
    offsets = torch.zeros(num_cams * tiles_per_cam + 1, dtype=torch.int64, device=xy.device)
    offsets[1:] = torch.cumsum(per_tile, 0)
    return TileIntersections(tile_size, tiles_x, tiles_y, offsets, flatten_ids)
