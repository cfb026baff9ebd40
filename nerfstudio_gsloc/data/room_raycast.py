"""Ray caster and shading of the embedded procedural room: exact ray-primitive intersections in numpy.

:func:`trace` finds the nearest surface hit of each ray (objects are culled by their bounding spheres first),
:func:`shade` gives each hit its Lambertian colour from the scene's point light, with hard shadows plus an ambient
term (view independent, so a splat model can reproduce it exactly), and :func:`render_views` ray casts whole views.

Conventions: world frame in metres. Poses are OpenGL camera-to-world ``[N, 3|4, 4]``; the rays are built in OpenCV
camera axes (+z forward) with unit z, so the ray parameter of a hit is its z-depth (along the optical axis, not the
ray length). Pixel ``(u, v)`` covers ``[u, u + 1) x [v, v + 1)`` and its centre is at ``(u + 0.5, v + 0.5)`` in
the coordinates the intrinsics map to (as in gsplat and nerfstudio): the depth of a pixel is that of the ray
through its centre, its colour the average of ``supersample x supersample`` rays spread over the pixel. Colours
are RGB floats in ``[0, 1]`` until :func:`render_views` rounds them to uint8.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c, rigid_inverse
from nerfstudio_gsloc.data.room_geometry import Primitive, ProceduralScene, material_albedo


def _intersect_culled(prim: Primitive, origins: np.ndarray, dirs: np.ndarray, dir_sq: np.ndarray) -> np.ndarray:
    """``prim.intersect`` evaluated only on rays that hit its bounding sphere; ``t [M]`` (``inf`` elsewhere).

    Args:
        prim: an object (not a room face).
        origins: ``[M, 3]`` or shared ``[1, 3]`` ray origins.
        dirs: ``[M, 3]`` ray directions.
        dir_sq: ``[M]`` squared lengths of ``dirs``.
    """
    center, radius = prim.bounding_sphere()
    oc = origins - center
    if len(oc) == 1:
        # Shared origin (camera or light): matrix-vector products instead of per-ray dot products.
        b = dirs @ oc[0]
        c = float(oc[0] @ oc[0]) - radius**2
    else:
        b = np.einsum("ij,ij->i", oc, dirs)
        c = np.einsum("ij,ij->i", oc, oc) - radius**2
    disc = b * b - dir_sq * c
    # Candidates: the ray line meets the bounding sphere and its far crossing lies ahead of the origin.
    candidates = np.flatnonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0.0)) > 0))
    t = np.full(len(dirs), np.inf)
    if len(candidates):
        sub_origins = origins if len(origins) == 1 else origins[candidates]
        t[candidates] = prim.intersect(sub_origins, dirs[candidates])
    return t


def trace(scene: ProceduralScene, origins: np.ndarray, dirs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest surface hit of each ray.

    Args:
        scene: the scene.
        origins: ``[M, 3]`` or ``[1, 3]`` ray origins (inside the room).
        dirs: ``[M, 3]`` ray directions (need not be unit length; ``t`` is in units of ``dirs``).

    Returns:
        ``t [M]`` ray parameters of the hits and ``surface [M]`` int indices into ``scene.surfaces``
        (every ray inside the closed room hits something).
    """
    best_t = np.full(len(dirs), np.inf)
    best_s = np.full(len(dirs), -1, dtype=np.int64)
    dir_sq = np.einsum("ij,ij->i", dirs, dirs)
    for index, surface in enumerate(scene.surfaces):
        if index < 6:
            t = surface.intersect(origins, dirs)
        else:
            t = _intersect_culled(surface, origins, dirs, dir_sq)
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        best_s = np.where(closer, index, best_s)
    return best_t, best_s


def _shadowed(scene: ProceduralScene, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """``[M]`` bool: is the segment from the light to each surface point ``[M, 3]`` blocked by an object?

    Rays start at the light (a shared origin, cheaper to test) and end just off the surface, at ``t = 1``.
    """
    dirs = points + normals * 1e-3 - scene.light
    dir_sq = np.einsum("ij,ij->i", dirs, dirs)
    blocked = np.zeros(len(points), dtype=bool)
    for obj in scene.objects:
        blocked |= _intersect_culled(obj, scene.light[None], dirs, dir_sq) < 1.0
    return blocked


def shade(scene: ProceduralScene, points: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Lambertian colour of hit ``points [M, 3]`` on ``surface [M]`` (indices) -> ``[M, 3]`` RGB in ``[0, 1]``."""
    albedo = np.zeros_like(points)
    normals = np.zeros_like(points)
    for index, prim in enumerate(scene.surfaces):
        mask = surface == index
        if not mask.any():
            continue
        pts = points[mask]
        normal, uv = prim.normal_uv(pts)
        color = material_albedo(scene.materials[prim.material], uv, pts, scene.noise)
        for decal in scene.decals:
            if decal.plane != index:
                continue
            inside = np.all((uv >= decal.lo) & (uv <= decal.hi), axis=1)
            if inside.any():
                decal_color = material_albedo(scene.materials[decal.material], uv[inside], pts[inside], scene.noise)
                # A dark 3 cm frame around each decal.
                border = np.min(np.minimum(uv[inside] - decal.lo, decal.hi - uv[inside]), axis=1) < 0.03
                color[inside] = np.where(border[:, None], 0.08, decal_color)
        albedo[mask] = color
        normals[mask] = normal
    to_light = scene.light - points
    to_light /= np.linalg.norm(to_light, axis=1, keepdims=True)
    lambert = np.clip(np.einsum("ij,ij->i", normals, to_light), 0.0, 1.0)
    lit = lambert * ~_shadowed(scene, points, normals)
    return np.clip(albedo * (scene.ambient + (1.0 - scene.ambient) * lit)[:, None], 0.0, 1.0)


def _camera_dirs(
    width: int, height: int, fx: float, fy: float, cx: float, cy: float, offsets: np.ndarray
) -> np.ndarray:
    """OpenCV camera-frame ray directions with unit z: ``[S, H, W, 3]`` for sub-pixel ``offsets [S, 2]`` (x, y)."""
    u = np.arange(width)[None, None, :] + offsets[:, 0, None, None]
    v = np.arange(height)[None, :, None] + offsets[:, 1, None, None]
    x = np.broadcast_to((u - cx) / fx, (len(offsets), height, width))
    y = np.broadcast_to((v - cy) / fy, (len(offsets), height, width))
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def render_views(
    scene: ProceduralScene,
    c2w_opengl: np.ndarray,
    fx: Union[float, Sequence[float], np.ndarray],
    fy: Union[float, Sequence[float], np.ndarray],
    cx: Union[float, Sequence[float], np.ndarray],
    cy: Union[float, Sequence[float], np.ndarray],
    width: int,
    height: int,
    supersample: int = 2,
    on_view: Optional[Callable[[int, np.ndarray, np.ndarray], None]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Ray cast ``N`` views of ``scene``.

    Args:
        scene: from :func:`~nerfstudio_gsloc.data.room_layout.build_scene`.
        c2w_opengl: ``[N, 3|4, 4]`` OpenGL camera-to-world poses in the scene's (original) frame, metres.
        fx, fy, cx, cy: pinhole intrinsics in pixels (scalars or ``[N]``), pixel centres at ``+0.5``.
        width, height: image size in pixels.
        supersample: colour rays per pixel side (``supersample**2`` rays averaged per pixel).
        on_view: called as ``on_view(index, rgb [H, W, 3] uint8, depth [H, W] float)`` after each view.

    Returns:
        ``rgb`` uint8 ``[N, H, W, 3]`` and ``depth`` float32 ``[N, H, W]``: z-depth in metres (along the camera's
        optical axis) of the ray through each pixel centre.
    """
    c2w = torch.from_numpy(np.asarray(c2w_opengl, dtype=np.float64))
    if c2w.ndim != 3 or c2w.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"c2w_opengl must be [N, 3|4, 4], got {tuple(c2w.shape)}")
    num = c2w.shape[0]
    # Work with OpenCV camera axes (+z forward) so that a direction with unit z makes t the z-depth.
    c2w_cv = rigid_inverse(opengl_c2w_to_opencv_w2c(c2w)).numpy()
    intr = [np.broadcast_to(np.asarray(k, dtype=np.float64), (num,)) for k in (fx, fy, cx, cy)]
    sub = (np.arange(supersample) + 0.5) / supersample
    offsets = np.stack(np.meshgrid(sub, sub, indexing="xy"), axis=-1).reshape(-1, 2)
    centre = np.array([[0.5, 0.5]])

    rgb = np.zeros((num, height, width, 3), dtype=np.uint8)
    depth = np.zeros((num, height, width), dtype=np.float32)
    for i in range(num):
        rot, origin = c2w_cv[i, :3, :3], c2w_cv[i, None, :3, 3]
        k = [intr[j][i] for j in range(4)]
        # Depth: one ray through each pixel centre; t along a unit-z camera direction is the z-depth.
        dirs = _camera_dirs(width, height, *k, centre).reshape(-1, 3) @ rot.T
        t, _ = trace(scene, origin, dirs)
        depth[i] = t.reshape(height, width)
        # Colour: average of supersample x supersample rays per pixel.
        dirs = _camera_dirs(width, height, *k, offsets).reshape(-1, 3) @ rot.T
        t, surface = trace(scene, origin, dirs)
        color = shade(scene, origin + t[:, None] * dirs, surface)
        color = color.reshape(len(offsets), height, width, 3).mean(axis=0)
        rgb[i] = np.round(color * 255.0).astype(np.uint8)
        if on_view is not None:
            on_view(i, rgb[i], depth[i])
    return rgb, depth
