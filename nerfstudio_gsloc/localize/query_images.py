"""Query images as tensors: decoding of image, depth and mask files, and the image fields of a query.

* :func:`read_rgb`, :func:`read_depth`, :func:`read_mask` decode a file fully (``where`` names the query in the
  :class:`~nerfstudio_gsloc.errors.GslocError` they raise): ``[H, W, 3]`` uint8 colours plus ``[H, W]`` uint8
  alpha or ``None``; ``[H, W]`` float32 depth in the file's raw units; ``[H, W]`` bool mask (non-zero = use).
* :func:`make_view` turns those arrays into the ``image, K, width, height, mask, depth, background`` fields of a
  :class:`~nerfstudio_gsloc.localize.queries.Query`: undistorted first when the lens is distorted (like
  nerfstudio undistorts training images, see :mod:`~nerfstudio_gsloc.localize.undistort`), then alpha
  composited onto the background. ``K`` is ``[3, 3]`` in pixels with pixel centres at ``+0.5``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.undistort import undistort_view


def read_rgb(path: Path, where: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Decode an image fully. Returns ``([H, W, 3] uint8, alpha [H, W] uint8 or None)``."""
    if not path.is_file():
        raise GslocError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
            rgba = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except Exception as err:  # PIL raises many types for corrupt files
        raise GslocError(f"{where}: cannot read image {path}: {type(err).__name__}: {err}") from None
    if has_alpha:
        return rgba[..., :3], rgba[..., 3]
    return rgba, None


def read_depth(path: Path, where: str) -> np.ndarray:
    """Decode a depth map (16/32-bit image or ``.npy``) to ``[H, W]`` float32 raw units."""
    if not path.is_file():
        raise GslocError(f"{where}: depth file not found: {path}")
    try:
        if path.suffix == ".npy":
            depth = np.load(path).astype(np.float32)
        else:
            with Image.open(path) as img:
                img.load()
                depth = np.asarray(img).astype(np.float32)
    except Exception as err:
        raise GslocError(f"{where}: cannot read depth {path}: {type(err).__name__}: {err}") from None
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise GslocError(f"{where}: depth {path} must have one channel, got shape {depth.shape}")
    return depth


def read_mask(path: Path, where: str) -> np.ndarray:
    """Decode a mask image to ``[H, W]`` bool (non-zero = valid)."""
    if not path.is_file():
        raise GslocError(f"{where}: mask not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mask = np.asarray(img.convert("L")) > 0
    except Exception as err:
        raise GslocError(f"{where}: cannot read mask {path}: {type(err).__name__}: {err}") from None
    return mask


def make_view(
    rgb: np.ndarray,
    alpha: Optional[np.ndarray],
    K: np.ndarray,
    mask: Optional[np.ndarray],
    depth: Optional[np.ndarray],
    distortion: Optional[tuple],
    background: Tensor,
    alpha_as_mask: bool,
) -> Dict[str, Any]:
    """The image fields of a :class:`~nerfstudio_gsloc.localize.queries.Query`: undistorted when ``distortion`` is given, alpha composited after.

    Args:
        rgb: ``[H, W, 3]`` uint8; alpha: ``[H, W]`` uint8 or ``None``; K: ``[3, 3]`` intrinsics of ``rgb``.
        mask: ``[H, W]`` bool or ``None``; depth: ``[H, W]`` float32 scene units (0 = missing) or ``None``.
        distortion: ``None`` or ``(params [6], fisheye)`` from a query file's lens model / the eval cameras.
        background: ``[3]`` colour that alpha is composited onto.
        alpha_as_mask: alpha ``> 0.5`` joins the mask (when transparency means "not part of the scene").

    Returns:
        keyword arguments ``image, K, width, height, mask, depth, background`` of ``Query``.
    """
    if distortion is not None:
        # Colour and alpha go through nerfstudio's remap together (uint8, like gsloc's training image cache).
        pixels = rgb if alpha is None else np.concatenate([rgb, alpha[..., None]], axis=-1)
        view = undistort_view(pixels, K, distortion[0], distortion[1], mask, depth)
        rgb, alpha = view.image[..., :3], (None if alpha is None else view.image[..., 3])
        K, depth = view.K, view.depth
        mask = None if mask is None and view.valid.all() else view.mask
    image = torch.from_numpy(rgb.astype(np.float32) / 255.0)
    mask_t = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    used_background: Optional[Tensor] = None
    if alpha is not None:
        alpha_t = torch.from_numpy(alpha.astype(np.float32) / 255.0)[..., None]
        used_background = background
        image = image * alpha_t + background * (1.0 - alpha_t)
        if alpha_as_mask:
            mask_t = alpha_t[..., 0] > 0.5 if mask_t is None else mask_t & (alpha_t[..., 0] > 0.5)
    return {
        "image": image.contiguous(),
        "K": torch.from_numpy(np.asarray(K, dtype=np.float32)),
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "mask": mask_t,
        "depth": None if depth is None else torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32)),
        "background": used_background,
    }
