"""Rendering stage: a gsplat-compatible ``rasterization`` that also runs on the CPU.

``rasterization`` takes CUDA tensors to gsplat's kernels and CPU tensors to this project's own
implementation (PyTorch projection and tile binning, a C++ compositor with a PyTorch reference).
``render_splat_model`` renders any splatfacto-style model from nerfstudio camera poses.
"""

from nerfstudio_gsloc.rendering.rasterization import RENDER_MODES, rasterization
from nerfstudio_gsloc.rendering.splat_render import (
    RenderedViews,
    frustum_subset,
    rasterize_splat_model,
    render_splat_model,
)

__all__ = ["RENDER_MODES", "RenderedViews", "frustum_subset", "rasterization", "rasterize_splat_model",
           "render_splat_model"]
