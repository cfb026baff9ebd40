"""Embedded default scene: a procedurally textured room rendered by an analytic numpy ray caster.

The project's main job (train a Gaussian splat, then localize query images against it) must run without any
download. This module builds such a dataset from a seed:

* a closed box room (metres, world +z up, floor at ``z = 0``) whose walls, floor and ceiling carry rich
  procedural textures (checkers, stripes, value noise, colour ramps, random mosaics) plus "posters" and "rugs"
  (rectangles with their own texture), so that SIFT finds features and photometric alignment has gradients;
* a few textured spheres, boxes (rotated about ``z``) and cylinders in the middle of the room;
* Lambertian shading from one point light with hard shadows plus an ambient term (view independent, so a
  splat model can reproduce it exactly).

Images are *ray cast* (exact ray–primitive intersections, vectorised over all pixels of a view), not rendered
with Gaussians, so the splat model is trained against an independent ground truth.

Outputs follow nerfstudio's ``transforms.json`` format: OPENCV camera model without distortion, OpenGL
camera-to-world ``transform_matrix`` per frame, RGB PNGs and 16-bit depth PNGs that hold **z-depth** (along the
camera's optical axis, not the ray length) in **millimetres**, which nerfstudio's default
``depth_unit_scale_factor = 1e-3`` turns into metres. The train/eval split is stored in ``train_filenames`` /
``val_filenames`` / ``test_filenames`` (val and test are the same frames) so nerfstudio's own dataparser uses it.

Pixel convention: pixel ``(u, v)`` (column, row) covers ``[u, u + 1) x [v, v + 1)`` and its centre is at
``(u + 0.5, v + 0.5)`` in the coordinates that the intrinsics ``K`` map to, as in gsplat and nerfstudio.
The depth stored for a pixel is that of the ray through its centre; its colour is the average of
``supersample x supersample`` rays spread over the pixel (anti-aliasing).

Public API: :func:`build_scene`, :func:`render_views`, :func:`generate_scene`, :func:`write_query_set`,
:func:`load_depth_png`, :func:`focal_from_hfov`.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c, rigid_inverse
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_output, atomic_write_text, check_writable

#: Largest image side (pixels) the generator accepts; the ray caster is CPU numpy, keep images small.
MAX_IMAGE_SIDE = 160
#: Smallest image side (pixels) the generator accepts.
MIN_IMAGE_SIDE = 16
#: Default horizontal field of view of the dataset cameras, degrees.
DEFAULT_HFOV_DEG = 65.0
#: Ray-offset epsilon (metres) so that rays leaving a surface do not hit it again.
_EPS = 1e-4
#: Texture kinds the generator draws from.
PATTERN_KINDS: Tuple[str, ...] = ("checker", "stripes", "noise", "gradient", "mosaic")


# ----------------------------------------------------------------------------------------------------------
# Procedural noise and textures
# ----------------------------------------------------------------------------------------------------------


class ValueNoise:
    """Deterministic 3D value noise: random values on the integer lattice, smoothstep-interpolated.

    Args:
        rng: generator that draws the lattice permutation and values (so the noise is fixed by the seed).
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.perm = rng.permutation(256).astype(np.int64)
        self.values = rng.random(256)
        self._perm3 = np.concatenate([self.perm] * 3)

    def lattice(self, ix: np.ndarray, iy: np.ndarray, iz: np.ndarray) -> np.ndarray:
        """Hashed lattice value in ``[0, 1)`` for integer coordinates (any equal shapes, negatives fine)."""
        p = self.perm
        return self.values[p[(p[(p[ix & 255] + iy) & 255] + iz) & 255]]

    def value(self, points: np.ndarray) -> np.ndarray:
        """Value noise at ``points [M, 3]`` -> ``[M]`` in ``[0, 1]``, C1-smooth (smoothstep weights)."""
        base = np.floor(points)
        frac = points - base
        ix, iy, iz = (base.astype(np.intp) & 255).T
        weight = frac * frac * (3.0 - 2.0 * frac)
        wx = (1.0 - weight[:, 0], weight[:, 0])
        wy = (1.0 - weight[:, 1], weight[:, 1])
        # The tripled table lets sums of up to three indices skip the "& 255" (same hash as `lattice`).
        p = self._perm3
        out = np.zeros(points.shape[0])
        for dx in (0, 1):
            hx = p[ix + dx]
            for dy in (0, 1):
                hxy = p[hx + iy + dy]
                low, high = self.values[p[hxy + iz]], self.values[p[hxy + iz + 1]]
                out += wx[dx] * wy[dy] * (low + weight[:, 2] * (high - low))
        return out

    def fbm(self, points: np.ndarray, octaves: int = 4) -> np.ndarray:
        """Fractal sum of ``octaves`` noise octaves at ``points [M, 3]`` -> ``[M]`` in ``[0, 1]``."""
        total = np.zeros(points.shape[0])
        amplitude, norm = 1.0, 0.0
        for octave in range(octaves):
            # A per-octave shift keeps the lattices of different octaves from lining up.
            total += amplitude * self.value(points * (2.0**octave) + 17.31 * octave)
            norm += amplitude
            amplitude *= 0.5
        return total / norm


@dataclass(frozen=True)
class Material:
    """A procedural texture.

    Attributes:
        kind: one of :data:`PATTERN_KINDS`.
        colors: ``[K, 3]`` RGB colours in ``[0, 1]`` the pattern blends between (K >= 2).
        scale: pattern period in metres.
        angle: rotation of the pattern in its surface ``(u, v)`` plane, radians.
        offset: ``[3]`` shift of the noise domain so that every material's noise differs.
        seed_id: integer that makes the mosaic cell colours of this material unique.
    """

    kind: str
    colors: np.ndarray
    scale: float
    angle: float
    offset: np.ndarray
    seed_id: int


def _ramp(colors: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Piecewise-linear colour ramp through ``colors [K, 3]`` at ``t [M]`` in ``[0, 1]`` -> ``[M, 3]``."""
    t = np.clip(t, 0.0, 1.0) * (len(colors) - 1)
    lo = np.minimum(np.floor(t).astype(np.int64), len(colors) - 2)
    w = (t - lo)[:, None]
    return colors[lo] * (1.0 - w) + colors[lo + 1] * w


def _material_albedo(material: Material, uv: np.ndarray, points: np.ndarray, noise: ValueNoise) -> np.ndarray:
    """Albedo of ``material`` at surface coordinates ``uv [M, 2]`` (metres) and world ``points [M, 3]``.

    Returns:
        ``[M, 3]`` RGB albedo in ``[0, 1]``.
    """
    cos_a, sin_a = math.cos(material.angle), math.sin(material.angle)
    u = (cos_a * uv[:, 0] - sin_a * uv[:, 1]) / material.scale
    v = (sin_a * uv[:, 0] + cos_a * uv[:, 1]) / material.scale
    colors = material.colors
    local = points + material.offset
    if material.kind == "checker":
        parity = (np.floor(u) + np.floor(v)) % 2.0
        # A slow third-colour tint makes each checker cell look a little different.
        tint = noise.fbm(local * 0.9, octaves=2)[:, None]
        albedo = colors[0] * (1.0 - parity[:, None]) + colors[1] * parity[:, None]
        albedo = albedo * (1.0 - 0.35 * tint) + colors[-1] * 0.35 * tint
    elif material.kind == "stripes":
        # Soft-edged stripes (clipped sine) whose colours drift along the stripe direction.
        t = np.clip(0.5 + 1.6 * np.sin(2.0 * np.pi * u), 0.0, 1.0)
        drift = noise.fbm(local * 1.3, octaves=3)
        albedo = _ramp(colors[1:], drift) * t[:, None] + colors[0] * (1.0 - t[:, None])
    elif material.kind == "noise":
        albedo = _ramp(colors, noise.fbm(local / material.scale, octaves=4))
    elif material.kind == "gradient":
        wave = u + 0.35 * np.sin(2.0 * np.pi * v * 0.5)
        albedo = _ramp(colors, np.abs((wave % 2.0) - 1.0))
    elif material.kind == "mosaic":
        cell_u, cell_v = np.floor(u), np.floor(v)
        cell_value = noise.lattice(cell_u.astype(np.int64), cell_v.astype(np.int64), np.full(u.shape, material.seed_id))
        albedo = _ramp(colors, cell_value)
        # Dark grout lines between the tiles give corners for keypoint detectors.
        grout = (np.minimum(u - cell_u, v - cell_v) < 0.08) | (np.maximum(u - cell_u, v - cell_v) > 0.92)
        albedo = np.where(grout[:, None], albedo * 0.35, albedo)
    else:
        raise ValueError(f"unknown material kind {material.kind!r}")
    # Broad multiplicative noise on every material: no two places of a surface look the same.
    shade = 0.78 + 0.44 * noise.fbm(local * 2.1 + 5.0, octaves=2)
    return np.clip(albedo * shade[:, None], 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Primitives (all vectorised over M rays / points)
# ----------------------------------------------------------------------------------------------------------

# For a face normal along axis a, the surface coordinates are the two other axes.
_OTHER_AXES = np.array([[1, 2], [0, 2], [0, 1]])


def _rot_z(yaw: float) -> np.ndarray:
    """``[3, 3]`` rotation by ``yaw`` radians about the world +z axis."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Plane:
    """One inner face of the room: the plane ``x[axis] = value`` seen from the side its ``normal`` points to.

    Attributes:
        axis: 0, 1 or 2 (x, y, z).
        value: plane offset along ``axis`` (metres).
        inward: +1 if the visible side is towards +axis, else -1.
        material: index into the scene's materials.
    """

    axis: int
    value: float
    inward: float
    material: int

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameters ``t [M]`` of the hits (``inf`` for misses) for ``origins [M|1, 3]``, ``dirs [M, 3]``."""
        dn = dirs[:, self.axis] * self.inward
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.value - origins[:, self.axis]) / dirs[:, self.axis]
        # Only rays travelling against the inward normal see the face.
        return np.where((dn < 0) & (t > _EPS), t, np.inf)

    def normal_uv(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Unit normals ``[M, 3]`` and surface coordinates ``[M, 2]`` (metres) at ``points [M, 3]``."""
        normal = np.zeros_like(points)
        normal[:, self.axis] = self.inward
        return normal, points[:, _OTHER_AXES[self.axis]]


@dataclass(frozen=True)
class Sphere:
    """A sphere with centre ``[3]`` and ``radius`` (metres)."""

    center: np.ndarray
    radius: float
    material: int

    def bounding_sphere(self) -> Tuple[np.ndarray, float]:
        """``(centre [3], radius)`` of a sphere enclosing the primitive (for ray culling)."""
        return self.center, self.radius

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameters ``t [M]`` of the first hit after ``_EPS`` (``inf`` for misses)."""
        oc = np.broadcast_to(origins - self.center, dirs.shape)
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = np.einsum("ij,ij->i", oc, dirs)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = (-b - root) / a, (-b + root) / a
        t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
        return np.where(disc >= 0, t, np.inf)

    def normal_uv(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Outward normals ``[M, 3]`` and (longitude, colatitude) arc lengths ``[M, 2]`` at ``points [M, 3]``."""
        q = (points - self.center) / self.radius
        uv = np.stack([np.arctan2(q[:, 1], q[:, 0]), np.arccos(np.clip(q[:, 2], -1.0, 1.0))], axis=1)
        return q, uv * self.radius


@dataclass(frozen=True)
class Box:
    """A box with ``center [3]``, ``half_size [3]`` (metres) and ``yaw`` (radians, about world +z)."""

    center: np.ndarray
    half_size: np.ndarray
    yaw: float
    material: int

    def bounding_sphere(self) -> Tuple[np.ndarray, float]:
        """``(centre [3], radius)`` of a sphere enclosing the primitive (for ray culling)."""
        return self.center, float(np.linalg.norm(self.half_size))

    def _to_local(self, vectors: np.ndarray) -> np.ndarray:
        """World ``[M, 3]`` vectors -> box frame (rows times R, i.e. ``R^T v``)."""
        return vectors @ _rot_z(self.yaw)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Slab test in the box frame: ray parameters ``t [M]`` (``inf`` for misses)."""
        o = self._to_local(origins - self.center)
        d = self._to_local(dirs)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_a = (-self.half_size - o) / d
            t_b = (self.half_size - o) / d
        t_near = np.nanmax(np.minimum(t_a, t_b), axis=1)
        t_far = np.nanmin(np.maximum(t_a, t_b), axis=1)
        hit = t_far >= np.maximum(t_near, _EPS)
        return np.where(hit, np.where(t_near > _EPS, t_near, t_far), np.inf)

    def normal_uv(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Outward face normals ``[M, 3]`` and in-face box coordinates ``[M, 2]`` at ``points [M, 3]``."""
        q = self._to_local(points - self.center)
        axis = np.argmax(np.abs(q) / self.half_size, axis=1)
        rows = np.arange(len(points))
        normal_local = np.zeros_like(q)
        normal_local[rows, axis] = np.sign(q[rows, axis])
        uv = np.take_along_axis(q, _OTHER_AXES[axis], axis=1)
        return normal_local @ _rot_z(self.yaw).T, uv


@dataclass(frozen=True)
class Cylinder:
    """A capped cylinder with vertical axis through ``base [3]`` (centre of the bottom cap), ``radius``, ``height``."""

    base: np.ndarray
    radius: float
    height: float
    material: int

    def bounding_sphere(self) -> Tuple[np.ndarray, float]:
        """``(centre [3], radius)`` of a sphere enclosing the primitive (for ray culling)."""
        return self.base + np.array([0.0, 0.0, 0.5 * self.height]), math.hypot(self.radius, 0.5 * self.height)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Nearest of the side and cap hits: ray parameters ``t [M]`` (``inf`` for misses)."""
        o = origins - self.base
        o = np.broadcast_to(o, dirs.shape)
        a = dirs[:, 0] ** 2 + dirs[:, 1] ** 2
        b = o[:, 0] * dirs[:, 0] + o[:, 1] * dirs[:, 1]
        c = o[:, 0] ** 2 + o[:, 1] ** 2 - self.radius**2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(len(dirs), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for t in ((-b - root) / a, (-b + root) / a):
                z = o[:, 2] + t * dirs[:, 2]
                ok = (disc >= 0) & (a > 1e-12) & (t > _EPS) & (z >= 0.0) & (z <= self.height)
                best = np.where(ok & (t < best), t, best)
            for cap_z in (0.0, self.height):
                t = (cap_z - o[:, 2]) / dirs[:, 2]
                x, y = o[:, 0] + t * dirs[:, 0], o[:, 1] + t * dirs[:, 1]
                ok = (t > _EPS) & (x * x + y * y <= self.radius**2)
                best = np.where(ok & (t < best), t, best)
        return best

    def normal_uv(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Outward normals ``[M, 3]`` and surface coordinates ``[M, 2]`` (side: arc length, height; caps: x, y)."""
        q = points - self.base
        radial = np.hypot(q[:, 0], q[:, 1])
        on_side = np.abs(radial - self.radius) < np.minimum(np.abs(q[:, 2]), np.abs(q[:, 2] - self.height))
        safe = np.maximum(radial, 1e-9)
        side_n = np.stack([q[:, 0] / safe, q[:, 1] / safe, np.zeros_like(safe)], axis=1)
        cap_n = np.zeros_like(q)
        cap_n[:, 2] = np.where(q[:, 2] > 0.5 * self.height, 1.0, -1.0)
        normal = np.where(on_side[:, None], side_n, cap_n)
        side_uv = np.stack([self.radius * np.arctan2(q[:, 1], q[:, 0]), q[:, 2]], axis=1)
        uv = np.where(on_side[:, None], side_uv, q[:, :2])
        return normal, uv


Primitive = Union[Plane, Sphere, Box, Cylinder]


@dataclass(frozen=True)
class Decal:
    """A textured rectangle (poster, rug, ceiling panel) on room face ``plane`` (index into the surfaces).

    Attributes:
        plane: index of the room face (0..5) it is on.
        lo: ``[2]`` lower corner in the face's surface coordinates (metres).
        hi: ``[2]`` upper corner.
        material: index into the scene's materials.
    """

    plane: int
    lo: np.ndarray
    hi: np.ndarray
    material: int


@dataclass(frozen=True)
class ProceduralScene:
    """Everything the ray caster needs; built deterministically by :func:`build_scene`.

    Attributes:
        seed: the seed it was built from.
        room_min: ``[3]`` lower room corner (metres); the floor is at ``room_min[2] = 0``.
        room_max: ``[3]`` upper room corner.
        surfaces: room faces (indices 0..5: -x, +x, -y, +y walls, floor, ceiling) followed by the objects.
        materials: textures the surfaces and decals index.
        decals: rectangles with their own texture on the room faces.
        light: ``[3]`` point-light position (inside the room, casts hard shadows).
        ambient: ambient fraction of the lighting in ``[0, 1]``.
        noise: the value noise all textures sample.
        object_region: ``(x_half, y_half)`` of the floor rectangle around the origin that holds all objects.
    """

    seed: int
    room_min: np.ndarray
    room_max: np.ndarray
    surfaces: Tuple[Primitive, ...]
    materials: Tuple[Material, ...]
    decals: Tuple[Decal, ...]
    light: np.ndarray
    ambient: float
    noise: ValueNoise
    object_region: Tuple[float, float]

    @property
    def objects(self) -> Tuple[Primitive, ...]:
        """The primitives inside the room (everything after the six room faces)."""
        return self.surfaces[6:]


# ----------------------------------------------------------------------------------------------------------
# Scene construction
# ----------------------------------------------------------------------------------------------------------

_ROOM_HALF_X = 2.5
_ROOM_HALF_Y = 2.0
_ROOM_HEIGHT = 2.6
_OBJECT_REGION = (0.9, 0.6)
# Dataset cameras sit on an ellipse at these fractions of the room half extents.
_RING_FRACTION = (0.75, 0.72)
_CAMERA_CLEARANCE = 0.35


def _palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` contrasting colours ``[count, 3]``: spread hues and alternating dark/bright values."""
    hue0 = rng.random()
    colors = []
    for k in range(count):
        hue = (hue0 + k / count + rng.uniform(-0.08, 0.08)) % 1.0
        sat = rng.uniform(0.35, 0.9)
        val = rng.uniform(0.75, 0.98) if k % 2 else rng.uniform(0.2, 0.5)
        colors.append(colorsys.hsv_to_rgb(hue, sat, val))
    return np.asarray(colors)


def _random_material(rng: np.random.Generator, seed_id: int, kind: Optional[str] = None) -> Material:
    """A random texture; ``kind`` forces the pattern kind."""
    kind = kind if kind is not None else PATTERN_KINDS[rng.integers(len(PATTERN_KINDS))]
    scale_range = {
        "checker": (0.15, 0.4),
        "stripes": (0.12, 0.35),
        "noise": (0.25, 0.7),
        "gradient": (0.4, 1.0),
        "mosaic": (0.12, 0.3),
    }[kind]
    return Material(
        kind=kind,
        colors=_palette(rng, int(rng.integers(3, 5))),
        scale=float(rng.uniform(*scale_range)),
        angle=float(rng.uniform(0.0, np.pi)),
        offset=rng.uniform(-50.0, 50.0, size=3),
        seed_id=seed_id,
    )


def _place_decals(
    rng: np.random.Generator, plane: int, u_range: Tuple[float, float], v_range: Tuple[float, float], count: int
) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """Up to ``count`` non-overlapping rectangles ``(plane, lo [2], hi [2])`` inside the given face ranges."""
    rects: List[Tuple[int, np.ndarray, np.ndarray]] = []
    for _ in range(60):
        if len(rects) == count:
            break
        size = np.array([rng.uniform(0.5, 1.4), rng.uniform(0.4, 1.0)])
        lo = np.array([rng.uniform(u_range[0], u_range[1] - size[0]), rng.uniform(v_range[0], v_range[1] - size[1])])
        hi = lo + size
        # Keep 10 cm of base texture between decals.
        if all(np.any(lo > h + 0.1) or np.any(hi < l - 0.1) for _, l, h in rects):
            rects.append((plane, lo, hi))
    return rects


def build_scene(seed: int = 0) -> ProceduralScene:
    """Build the procedural room for ``seed`` (deterministic: same seed, same scene).

    Args:
        seed: any integer; it picks the textures, decals, objects and light position.

    Returns:
        The scene description that :func:`render_views` ray casts.
    """
    rng = np.random.default_rng([seed, 2024])
    noise = ValueNoise(rng)
    room_min = np.array([-_ROOM_HALF_X, -_ROOM_HALF_Y, 0.0])
    room_max = np.array([_ROOM_HALF_X, _ROOM_HALF_Y, _ROOM_HEIGHT])

    materials: List[Material] = []

    def new_material(kind: Optional[str] = None) -> int:
        materials.append(_random_material(rng, seed_id=len(materials), kind=kind))
        return len(materials) - 1

    # Room faces: every pattern kind appears on some face, the rest are random.
    kinds = list(rng.permutation(PATTERN_KINDS)) + [None]
    surfaces: List[Primitive] = []
    for face in range(6):
        axis, side = face // 2, face % 2
        value = room_max[axis] if side else room_min[axis]
        surfaces.append(Plane(axis=axis, value=float(value), inward=-1.0 if side else 1.0, material=new_material(kinds[face])))

    # Posters on the walls, rugs on the floor, panels on the ceiling.
    decal_specs: List[Tuple[int, np.ndarray, np.ndarray]] = []
    for face in range(4):
        axis = face // 2
        u_axis = _OTHER_AXES[axis][0]
        u_range = (room_min[u_axis] + 0.2, room_max[u_axis] - 0.2)
        decal_specs += _place_decals(rng, face, u_range, (0.3, _ROOM_HEIGHT - 0.25), int(rng.integers(3, 5)))
    inner = ((-_ROOM_HALF_X + 0.3, _ROOM_HALF_X - 0.3), (-_ROOM_HALF_Y + 0.3, _ROOM_HALF_Y - 0.3))
    decal_specs += _place_decals(rng, 4, inner[0], inner[1], int(rng.integers(2, 4)))
    decal_specs += _place_decals(rng, 5, inner[0], inner[1], int(rng.integers(2, 4)))
    decals = tuple(Decal(plane=p, lo=lo, hi=hi, material=new_material()) for p, lo, hi in decal_specs)

    # Objects: non-overlapping footprints inside the central region, cameras stay outside it.
    region = np.array(_OBJECT_REGION)
    footprints: List[Tuple[np.ndarray, float]] = []
    kinds_to_place = ["sphere"] * int(rng.integers(2, 4)) + ["box"] * int(rng.integers(2, 4)) + ["cylinder"] * 2
    for kind in kinds_to_place:
        for _ in range(200):
            radius = rng.uniform(0.18, 0.34)
            xy = rng.uniform(-region, region)
            if all(np.linalg.norm(xy - c) > radius + r + 0.12 for c, r in footprints):
                break
        else:
            continue
        footprints.append((xy, radius))
        mat = new_material()
        if kind == "sphere":
            # Some spheres rest on the floor, some float.
            z = radius if rng.random() < 0.6 else rng.uniform(radius + 0.3, 1.0)
            surfaces.append(Sphere(center=np.array([xy[0], xy[1], z]), radius=float(radius), material=mat))
        elif kind == "box":
            half = np.array([radius / math.sqrt(2.0) * rng.uniform(0.8, 1.0), radius / math.sqrt(2.0) * rng.uniform(0.6, 1.0), 0.0])
            half[2] = rng.uniform(0.15, 0.5)
            box = Box(center=np.array([xy[0], xy[1], half[2]]), half_size=half, yaw=float(rng.uniform(0, np.pi)), material=mat)
            surfaces.append(box)
            if rng.random() < 0.5:
                # A small ball resting on top of the box.
                r_top = float(min(half[0], half[1]) * 0.9)
                top = np.array([xy[0], xy[1], 2.0 * half[2] + r_top])
                surfaces.append(Sphere(center=top, radius=r_top, material=new_material()))
        else:
            height = rng.uniform(0.4, 1.1)
            surfaces.append(Cylinder(base=np.array([xy[0], xy[1], 0.0]), radius=float(radius * 0.85), height=float(height), material=mat))

    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5), _ROOM_HEIGHT - 0.35])
    return ProceduralScene(
        seed=seed,
        room_min=room_min,
        room_max=room_max,
        surfaces=tuple(surfaces),
        materials=tuple(materials),
        decals=decals,
        light=light,
        ambient=0.38,
        noise=noise,
        object_region=_OBJECT_REGION,
    )


# ----------------------------------------------------------------------------------------------------------
# Ray casting
# ----------------------------------------------------------------------------------------------------------


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
        color = _material_albedo(scene.materials[prim.material], uv, pts, scene.noise)
        for decal in scene.decals:
            if decal.plane != index:
                continue
            inside = np.all((uv >= decal.lo) & (uv <= decal.hi), axis=1)
            if inside.any():
                decal_color = _material_albedo(scene.materials[decal.material], uv[inside], pts[inside], scene.noise)
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
        scene: from :func:`build_scene`.
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


# ----------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------


def focal_from_hfov(width: int, hfov_deg: float = DEFAULT_HFOV_DEG) -> float:
    """Focal length in pixels for an image ``width`` pixels wide with horizontal field of view ``hfov_deg``."""
    return 0.5 * width / math.tan(math.radians(hfov_deg) / 2.0)


def look_at_opengl(position: np.ndarray, forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """OpenGL camera-to-world ``[4, 4]`` at ``position [3]`` looking along ``forward [3]``, world +z up.

    The OpenGL camera looks along its local -z with +y up, so the rotation columns are
    (right, up, -forward). ``roll`` (radians) turns the camera about its viewing direction.
    """
    fwd = forward / np.linalg.norm(forward)
    right = np.cross(fwd, np.array([0.0, 0.0, 1.0]))
    norm = np.linalg.norm(right)
    if norm < 1e-6:
        raise ValueError("look-at direction is parallel to the world up axis")
    right /= norm
    up = np.cross(right, fwd)
    c, s = math.cos(roll), math.sin(roll)
    right, up = c * right + s * up, -s * right + c * up
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -fwd, position
    return c2w


def _clamp_pitch(forward: np.ndarray, lo_deg: float = -40.0, hi_deg: float = 15.0) -> np.ndarray:
    """Unit ``forward [3]`` with its elevation clamped to ``[lo_deg, hi_deg]`` (never near vertical)."""
    horiz = math.hypot(forward[0], forward[1])
    pitch = min(max(math.atan2(forward[2], horiz), math.radians(lo_deg)), math.radians(hi_deg))
    yaw = math.atan2(forward[1], forward[0])
    return np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])


def _yawed(forward: np.ndarray, angle: float) -> np.ndarray:
    """``forward [3]`` turned by ``angle`` radians about the world +z axis."""
    return _rot_z(angle) @ forward


def camera_is_valid(scene: ProceduralScene, position: np.ndarray, clearance: float = _CAMERA_CLEARANCE) -> bool:
    """True when ``position [3]`` is inside the room (with a margin) and ``clearance`` metres from every object."""
    if np.any(position < scene.room_min + 0.2) or np.any(position > scene.room_max - 0.2):
        return False
    for obj in scene.objects:
        if isinstance(obj, Sphere):
            dist = np.linalg.norm(position - obj.center) - obj.radius
        elif isinstance(obj, Box):
            q = np.abs((position - obj.center) @ _rot_z(obj.yaw)) - obj.half_size
            dist = np.linalg.norm(np.maximum(q, 0.0)) + min(q.max(), 0.0)
        else:
            q = position - obj.base
            dr = math.hypot(q[0], q[1]) - obj.radius
            dz = max(-q[2], q[2] - obj.height)
            dist = math.hypot(max(dr, 0.0), max(dz, 0.0)) + min(max(dr, dz), 0.0)
        if dist < clearance:
            return False
    return True


def dataset_poses(scene: ProceduralScene, num_views: int) -> np.ndarray:
    """Training/eval camera trajectory: a wavy loop around the objects, views looking inwards.

    Neighbouring views differ by ``360 / num_views`` degrees around the room, so consecutive frames overlap
    strongly; smooth (sinusoidal) changes of height, radius, target and yaw give every view a different look
    at objects, walls, floor and some ceiling.

    Returns:
        ``[num_views, 4, 4]`` OpenGL camera-to-world poses (metres).
    """
    rng = np.random.default_rng([scene.seed, 7])
    phases = rng.uniform(0.0, 2.0 * np.pi, size=6)
    half = np.array([_ROOM_HALF_X * _RING_FRACTION[0], _ROOM_HALF_Y * _RING_FRACTION[1]])
    region = np.array(scene.object_region)
    poses = []
    for i in range(num_views):
        theta = 2.0 * np.pi * i / num_views + phases[0]
        radius = 1.0 + 0.05 * math.sin(5.0 * theta + phases[1])
        position = np.array(
            [half[0] * radius * math.cos(theta), half[1] * radius * math.sin(theta), 1.35 + 0.3 * math.sin(3.0 * theta + phases[2])]
        )
        target = np.array(
            [
                0.6 * region[0] * math.cos(2.0 * theta + phases[3]),
                0.6 * region[1] * math.sin(3.0 * theta + phases[4]),
                0.55 + 0.25 * math.sin(theta + phases[5]),
            ]
        )
        forward = _yawed(target - position, math.radians(30.0) * math.sin(2.0 * theta + phases[1]))
        if not camera_is_valid(scene, position):
            raise RuntimeError(f"dataset camera {i} collides with the scene (generator bug)")
        poses.append(look_at_opengl(position, _clamp_pitch(forward)))
    return np.stack(poses)


def forward_facing_poses(scene: ProceduralScene, num_views: int) -> np.ndarray:
    """A forward-facing capture (LLFF-style): cameras on a small vertical rectangle near the +x wall, all looking
    towards -x at the objects and the far wall, optical axes within a few degrees of each other.

    Frames go row by row (serpentine) so that evenly spaced eval frames lie between training neighbours.

    Returns:
        ``[num_views, 4, 4]`` OpenGL camera-to-world poses (metres).
    """
    rng = np.random.default_rng([scene.seed, 13])
    cols = max(2, int(math.ceil(math.sqrt(num_views * 1.5))))
    rows = int(math.ceil(num_views / cols))
    poses = []
    for i in range(num_views):
        row, col = divmod(i, cols)
        col = col if row % 2 == 0 else cols - 1 - col
        y = -0.6 + 1.2 * (col + 0.5) / cols + rng.uniform(-0.03, 0.03)
        z = 1.05 + 0.45 * (row + 0.5) / rows + rng.uniform(-0.03, 0.03)
        position = np.array([scene.room_max[0] - 0.6, y, z])
        # all cameras look at points of the far wall near its centre: nearly parallel axes
        target = np.array([scene.room_min[0], 0.3 * y + rng.uniform(-0.1, 0.1), 0.9 + 0.3 * (z - 1.3)])
        if not camera_is_valid(scene, position, clearance=0.15):
            raise RuntimeError(f"forward-facing camera {i} collides with the scene (generator bug)")
        poses.append(look_at_opengl(position, target - position))
    return np.stack(poses)


def query_poses(scene: ProceduralScene, num_views: int, seed: int) -> np.ndarray:
    """Random novel poses inside the band the dataset cameras cover (so the splat model has seen the view).

    Positions, targets, yaw offsets and a small roll are drawn at random from ``seed``; none coincides with a
    dataset pose.

    Returns:
        ``[num_views, 4, 4]`` OpenGL camera-to-world poses (metres).
    """
    rng = np.random.default_rng([scene.seed, seed, 11])
    half = np.array([_ROOM_HALF_X * _RING_FRACTION[0], _ROOM_HALF_Y * _RING_FRACTION[1]])
    region = np.array(scene.object_region)
    poses = []
    while len(poses) < num_views:
        theta = rng.uniform(0.0, 2.0 * np.pi)
        radius = rng.uniform(0.92, 1.06)
        position = np.array([half[0] * radius * math.cos(theta), half[1] * radius * math.sin(theta), rng.uniform(1.1, 1.6)])
        if not camera_is_valid(scene, position):
            continue
        target = np.array([*rng.uniform(-0.6 * region, 0.6 * region), rng.uniform(0.35, 0.8)])
        forward = _yawed(target - position, math.radians(rng.uniform(-25.0, 25.0)))
        poses.append(look_at_opengl(position, _clamp_pitch(forward), roll=math.radians(rng.uniform(-5.0, 5.0))))
    return np.stack(poses)


# ----------------------------------------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------------------------------------


def _validate(output_dir: Path, num_views: int, width: int, height: int, hfov_deg: float, min_views: int) -> Path:
    """Check user arguments (raising :class:`GslocError`), then create ``output_dir``/images and /depth."""
    if not 10.0 <= hfov_deg <= 120.0:
        raise GslocError(f"hfov_deg must be between 10 and 120 degrees, got {hfov_deg}")
    if num_views < min_views:
        raise GslocError(f"num_views must be at least {min_views}, got {num_views}")
    for name, size in (("width", width), ("height", height)):
        if not MIN_IMAGE_SIDE <= size <= MAX_IMAGE_SIDE:
            raise GslocError(f"{name} must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels, got {size}")
    output_dir = check_writable(output_dir, "output directory")
    try:
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        (output_dir / "depth").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GslocError(f"cannot create output directory {output_dir}: {err.strerror}") from err
    return output_dir


def _progress(console: Optional[Console]) -> Progress:
    """A rich progress bar (spinner, bar, count, elapsed, remaining)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
        transient=True,  # gone when done, so an error or an interruption is the one line left on stderr
    )


def depth_to_png_units(depth_m: np.ndarray) -> np.ndarray:
    """z-depth in metres ``[H, W]`` -> uint16 millimetres ``[H, W]`` (what the depth PNGs hold)."""
    if np.nanmax(depth_m) * 1000.0 > 65535:
        raise ValueError("depth does not fit in 16-bit millimetres")
    return np.round(depth_m * 1000.0).astype(np.uint16)


def load_depth_png(path: Path) -> np.ndarray:
    """Read a depth PNG written here -> float32 z-depth in metres ``[H, W]`` (0 would mean invalid)."""
    image = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise GslocError(f"cannot read depth image {path}")
    return image.astype(np.float32) / 1000.0


def _render_and_write(
    scene: ProceduralScene,
    output_dir: Path,
    poses: np.ndarray,
    width: int,
    height: int,
    focal: float,
    description: str,
    show_progress: bool,
    with_depth: bool = True,
) -> List[str]:
    """Render ``poses [N, 4, 4]`` and write ``images/frame_XXXXX.png`` and (``with_depth``) ``depth/frame_XXXXX.png``.

    Returns:
        The ``N`` frame names ``frame_XXXXX.png``.
    """
    names = [f"frame_{i:05d}.png" for i in range(len(poses))]

    with _progress(Console(stderr=True) if show_progress else None) as progress:
        task = progress.add_task(description, total=len(poses))

        def write(index: int, rgb: np.ndarray, depth: np.ndarray) -> None:
            # Atomic: an interrupted run never leaves a truncated image (transforms.json, written last, marks
            # a complete dataset).
            with atomic_output(output_dir / "images" / names[index]) as tmp:
                Image.fromarray(rgb).save(tmp)
            if with_depth:
                with atomic_output(output_dir / "depth" / names[index]) as tmp:
                    if not cv2.imwrite(str(tmp), depth_to_png_units(depth)):
                        raise OSError(f"OpenCV could not write {tmp}")
            progress.advance(task)

        render_views(scene, poses, focal, focal, width / 2.0, height / 2.0, width, height, on_view=write)
    return names


def eval_indices(num_views: int, eval_fraction: float) -> np.ndarray:
    """Evenly spaced eval frame indices (between training neighbours): ``round(num_views * eval_fraction)``, >= 1."""
    num_eval = min(max(1, round(num_views * eval_fraction)), num_views - 1)
    step = num_views / num_eval
    return np.unique(np.floor(np.arange(num_eval) * step + step / 2.0).astype(np.int64))


def generate_scene(
    output_dir: Path,
    seed: int = 0,
    num_views: int = 80,
    width: int = 128,
    height: int = 96,
    eval_fraction: float = 1.0 / 8.0,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    show_progress: bool = True,
    layout: str = "ring",
    with_depth: bool = True,
) -> Path:
    """Write the procedural room as a nerfstudio dataset.

    Layout of ``output_dir``: ``transforms.json``, ``images/frame_XXXXX.png`` (RGB),
    ``depth/frame_XXXXX.png`` (uint16 z-depth in millimetres).

    Args:
        output_dir: destination folder (created; existing frames are overwritten).
        seed: scene seed; the same seed writes byte-identical files.
        num_views: number of frames (train + eval), at least 2.
        width, height: image size in pixels (16..160).
        eval_fraction: fraction of frames held out for eval (evenly spaced along the trajectory).
        hfov_deg: horizontal field of view.
        show_progress: show a rich progress bar on stderr.
        layout: ``ring`` (a loop around the objects, looking inwards: :func:`dataset_poses`) or ``forward``
            (a forward-facing capture: :func:`forward_facing_poses`).
        with_depth: write depth images (without them the dataset is RGB-only, like most real captures).

    Returns:
        Path of the written ``transforms.json``.
    """
    if layout not in ("ring", "forward"):
        raise GslocError(f"layout must be 'ring' or 'forward', got {layout!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise GslocError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    output_dir = _validate(output_dir, num_views, width, height, hfov_deg, min_views=2)
    scene = build_scene(seed)
    poses = dataset_poses(scene, num_views) if layout == "ring" else forward_facing_poses(scene, num_views)
    focal = focal_from_hfov(width, hfov_deg)
    names = _render_and_write(scene, output_dir, poses, width, height, focal, f"rendering scene {seed}", show_progress,
                              with_depth)
    if not with_depth and not any((output_dir / "depth").iterdir()):
        (output_dir / "depth").rmdir()  # an RGB-only dataset has no depth folder

    eval_set = set(eval_indices(num_views, eval_fraction).tolist())
    train = [f"images/{n}" for i, n in enumerate(names) if i not in eval_set]
    evals = [f"images/{n}" for i, n in enumerate(names) if i in eval_set]
    meta = {
        "camera_model": "OPENCV",
        "fl_x": focal,
        "fl_y": focal,
        "cx": width / 2.0,
        "cy": height / 2.0,
        "w": width,
        "h": height,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": [
            {"file_path": f"images/{n}", **({"depth_file_path": f"depth/{n}"} if with_depth else {}),
             "transform_matrix": pose.tolist()}
            for n, pose in zip(names, poses)
        ],
        "train_filenames": train,
        "val_filenames": evals,
        "test_filenames": evals,
        "gsloc_scene": _scene_info(scene),
    }
    path = output_dir / "transforms.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path


def _scene_info(scene: ProceduralScene) -> dict:
    """Provenance stored in transforms.json (ignored by nerfstudio)."""
    return {
        "generator": "nerfstudio_gsloc.data.procedural_scene",
        "scene_seed": scene.seed,
        "units": "metres",
        "depth_units": "millimetres, z-depth along the optical axis",
        "room_min": scene.room_min.tolist(),
        "room_max": scene.room_max.tolist(),
    }


def write_query_set(
    output_dir: Path,
    seed: int,
    num_views: int,
    width: int,
    height: int,
    scene_seed: int = 0,
    hfov_deg: float = DEFAULT_HFOV_DEG,
    show_progress: bool = True,
) -> Path:
    """Write novel views of scene ``scene_seed`` (never in its dataset) for localization tests.

    The poses are in the same original frame as :func:`generate_scene`'s ``transforms.json`` (so a trained
    model's ``dataparser_transforms.json`` maps them with ``camera_conventions.original_to_scene_frame``).
    Do not feed this file to nerfstudio's dataparser for poses: it re-centres and re-scales by *these* poses.
    Intrinsics are written per frame (``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``); all frames are listed
    in every split.

    Args:
        output_dir: destination folder (created).
        seed: query seed (poses differ per seed).
        num_views: number of query images, at least 1.
        width, height: query image size (may differ from the dataset's).
        scene_seed: which scene (same as ``generate_scene``'s ``seed``).
        hfov_deg: horizontal field of view.
        show_progress: show a rich progress bar on stderr.

    Returns:
        Path of the written ``transforms.json``.
    """
    output_dir = _validate(output_dir, num_views, width, height, hfov_deg, min_views=1)
    scene = build_scene(scene_seed)
    poses = query_poses(scene, num_views, seed)
    focal = focal_from_hfov(width, hfov_deg)
    names = _render_and_write(scene, output_dir, poses, width, height, focal, f"rendering queries {seed}", show_progress)
    files = [f"images/{n}" for n in names]
    meta = {
        "camera_model": "OPENCV",
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": [
            {
                "file_path": f"images/{n}",
                "depth_file_path": f"depth/{n}",
                "transform_matrix": pose.tolist(),
                "fl_x": focal,
                "fl_y": focal,
                "cx": width / 2.0,
                "cy": height / 2.0,
                "w": width,
                "h": height,
            }
            for n, pose in zip(names, poses)
        ],
        "train_filenames": files,
        "val_filenames": files,
        "test_filenames": files,
        "gsloc_scene": {**_scene_info(scene), "query_seed": seed},
    }
    path = output_dir / "transforms.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path
