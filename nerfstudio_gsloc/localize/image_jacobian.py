"""The Jacobian of a render with respect to the camera pose from one render: image gradient times pixel motion.

Over a step of a fraction of a pixel the render of an opaque scene moves as a warp of itself: the surface point
seen at pixel ``x`` (rendered depth ``z``) is seen at ``x + f`` after the pose changes by ``d xi``, with the flow
``f = (d pi / d xi) d xi`` of its back-projected 3D point. Brightness constancy, ``I'(x + f) = I(x)``, then gives
the change of the render at the fixed pixel, ``dI(x) = -grad I(x) . f``, and for the depth map, whose value also
changes with the point's distance along the new optical axis, ``dD(x) = dz - grad D(x) . f``. This is the
linearisation direct visual odometry uses (forward compositional), and it replaces the 6 extra renders of the
finite-difference Jacobian with arithmetic on the current render. It ignores what a warp cannot express
(disocclusion at depth edges, view-dependent colour), which the Levenberg-Marquardt acceptance test absorbs.

Conventions: images ``[h, w, C]`` at the level ``K`` belongs to, pixel centres at ``+0.5``; poses are OpenGL
camera-to-world ``[3, 4]``; ``moved`` are the base pose moved along each of the 6 parameters by ``steps`` (the
solver's own parametrisation), so the pixel motion per unit parameter is their projected difference divided by
the step (the projection is smooth; float64 keeps the difference exact enough at these steps).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import project_points
from nerfstudio_gsloc.localize.absolute_pose import lift_keypoints


def image_gradients(image: Tensor) -> Tuple[Tensor, Tensor]:
    """Central differences ``(d/dx, d/dy)`` of ``image [h, w, C]`` per pixel, one-sided at the borders (kornia's
    ``spatial_gradient(mode="diff", normalized=True)`` inside; its replicate padding halves them at the borders)."""
    padded_x = torch.cat([image[:, :1], image, image[:, -1:]], dim=1)
    padded_y = torch.cat([image[:1], image, image[-1:]], dim=0)
    gx = 0.5 * (padded_x[:, 2:] - padded_x[:, :-2])
    gy = 0.5 * (padded_y[2:] - padded_y[:-2])
    # one-sided differences at the borders are half the central formula above: restore their scale
    gx[:, 0], gx[:, -1] = 2.0 * gx[:, 0], 2.0 * gx[:, -1]
    gy[0], gy[-1] = 2.0 * gy[0], 2.0 * gy[-1]
    return gx, gy


def pixel_motion(base: Tensor, moved: Tensor, steps: Tensor, K: Tensor, depth: Tensor, pixels: Tensor) -> Tuple[Tensor, Tensor]:
    """How the surface points under ``pixels`` move in the image and in depth per unit of each pose parameter.

    Args:
        base: ``[3, 4]`` OpenGL camera-to-world pose of the render.
        moved: ``[6, 3, 4]`` the base moved by ``steps [6]`` along each parameter.
        K: ``[3, 3]`` intrinsics of the level.
        depth: ``[h, w]`` the render's z-depth (OpenCV camera axis), positive at ``pixels``.
        pixels: ``[m, 2]`` integer pixel indices ``(x, y)``.

    Returns:
        ``flow [6, m, 2]`` pixels per unit parameter and ``dz [6, m]`` depth per unit parameter.
    """
    centres = pixels.double() + 0.5
    world, _ = lift_keypoints(centres, depth.double(), K, base, interpolation="nearest")
    uv, z = project_points(moved, K, world)
    scale = steps.to(device=uv.device, dtype=torch.float64)[:, None]
    flow = (uv - centres[None]) / scale[..., None]
    dz = (z - depth.double()[pixels[:, 1], pixels[:, 0]][None]) / scale
    return flow, dz


def photometric_jacobian(rgb: Tensor, mask: Tensor, flow: Tensor) -> Tensor:
    """``[m * 3, 6]`` rows of the colour residuals ``(render - query)[mask]`` flattened pixel-major, channel-minor.

    Args:
        rgb: ``[h, w, 3]`` the render as the residuals see it (after any colour transform).
        mask: ``[h, w]`` bool, the ``m`` residual pixels.
        flow: ``[6, m, 2]`` from :func:`pixel_motion` for those pixels (same order as ``mask.nonzero()``).
    """
    gx, gy = image_gradients(rgb)
    gx, gy = gx[mask].double(), gy[mask].double()  # [m, 3]
    J = -(gx[None] * flow[..., 0:1] + gy[None] * flow[..., 1:2])  # [6, m, 3]
    return J.permute(1, 2, 0).reshape(-1, 6)


def depth_jacobian(depth: Tensor, mask: Tensor, flow: Tensor, dz: Tensor) -> Tensor:
    """``[d, 6]`` rows of the depth residuals ``(render - query)[mask]``: ``dz - grad D . flow``.

    Args:
        depth: ``[h, w]`` rendered depth; ``mask``: ``[h, w]`` the ``d`` residual pixels.
        flow, dz: ``[6, d, 2]``, ``[6, d]`` from :func:`pixel_motion` for those pixels.
    """
    gx, gy = image_gradients(depth[..., None])
    gx, gy = gx[mask][:, 0].double(), gy[mask][:, 0].double()
    return (dz - gx[None] * flow[..., 0] - gy[None] * flow[..., 1]).T


def render_jacobian(base: Tensor, moved: Tensor, steps: Tensor, K: Tensor, depth: Tensor, mask: Tensor,
                    rgb: Optional[Tensor], depth_mask: Optional[Tensor]) -> Tensor:
    """``[N, 6]`` rows of the colour residuals over ``mask`` (when ``rgb [h, w, 3]`` is given) followed by those of
    the depth residuals over ``depth_mask`` (a subset of ``mask``, when given), from one render.

    Args:
        base, moved, steps, K: as in :func:`pixel_motion`.
        depth: ``[h, w]`` the render's depth.
    """
    pixels = mask.nonzero()[:, [1, 0]]  # (x, y), in the order of [mask] selections
    flow, dz = pixel_motion(base, moved, steps, K, depth, pixels)
    rows = []
    if rgb is not None:
        rows.append(photometric_jacobian(rgb, mask, flow))
    if depth_mask is not None:
        keep = depth_mask[mask]
        rows.append(depth_jacobian(depth, depth_mask, flow[:, keep], dz[:, keep]))
    return torch.cat(rows) if rows else torch.zeros(0, 6, dtype=torch.float64, device=depth.device)
