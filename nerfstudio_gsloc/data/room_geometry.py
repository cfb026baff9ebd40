"""Geometry and textures of the embedded procedural room: value noise, materials, primitives, the scene record.

Holds :class:`ValueNoise`, :class:`Material` with :func:`material_albedo` (the colour of a procedural texture at
surface points), the ray-intersectable primitives (:class:`Plane` room faces, :class:`Sphere`, :class:`Box`,
:class:`Cylinder`, each with ``intersect`` and ``normal_uv``), :class:`Decal` rectangles on the room faces and the
:class:`ProceduralScene` record that ties them together. The room is laid out from a seed by
:mod:`nerfstudio_gsloc.data.room_layout` and ray cast by :mod:`nerfstudio_gsloc.data.room_raycast`.

Conventions: world frame in metres, +z up, floor at ``z = 0``. Everything is vectorised over ``M`` rays or points:
ray origins ``[M, 3]`` (or one shared ``[1, 3]``), directions ``[M, 3]`` (any length; a ray parameter ``t`` is in
units of its direction), misses are ``t = inf`` and hits count only beyond ``_EPS``. Surface coordinates
``uv [M, 2]`` are in metres (arc lengths on curved surfaces); colours are RGB floats in ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np

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


def material_albedo(material: Material, uv: np.ndarray, points: np.ndarray, noise: ValueNoise) -> np.ndarray:
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

#: For a face normal along axis a, the surface coordinates are the two other axes.
OTHER_AXES = np.array([[1, 2], [0, 2], [0, 1]])


def rot_z(yaw: float) -> np.ndarray:
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
        return normal, points[:, OTHER_AXES[self.axis]]


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
        return vectors @ rot_z(self.yaw)

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
        uv = np.take_along_axis(q, OTHER_AXES[axis], axis=1)
        return normal_local @ rot_z(self.yaw).T, uv


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
    """Everything the ray caster needs; :func:`~nerfstudio_gsloc.data.room_layout.build_scene` builds it from a seed.

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
