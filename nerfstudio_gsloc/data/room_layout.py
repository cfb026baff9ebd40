"""Layout of the embedded procedural room and of its cameras, all drawn from a seed.

:func:`build_scene` makes the room (5 m x 4 m, 2.6 m high): a texture on every face (each pattern kind on some
face), decals (posters on the walls, rugs on the floor, panels on the ceiling), objects with non-overlapping
footprints in the central region, and the point light. The camera functions place views in that room:
:func:`dataset_poses` (a wavy loop around the objects, looking inwards), :func:`forward_facing_poses` (an
LLFF-style capture) and :func:`query_poses` (random novel views in the band the dataset cameras cover), built on
:func:`look_at_opengl`, :func:`camera_is_valid` and :func:`focal_from_hfov`.

Conventions: world frame in metres, +z up, floor at ``z = 0``, the room centred on the origin in x and y. Poses
are ``[4, 4]`` OpenGL camera-to-world matrices (the camera looks along its local -z, +y up). The random draws come
from numpy generators seeded by the scene seed (and the query seed) plus a constant per purpose, so the same seeds
give the same scene and the same poses.
"""

from __future__ import annotations

import colorsys
import math
from typing import List, Optional, Tuple

import numpy as np

from nerfstudio_gsloc.data.room_geometry import (
    OTHER_AXES,
    PATTERN_KINDS,
    Box,
    Cylinder,
    Decal,
    Material,
    Plane,
    Primitive,
    ProceduralScene,
    Sphere,
    ValueNoise,
    rot_z,
)

#: Default horizontal field of view of the dataset cameras, degrees.
DEFAULT_HFOV_DEG = 65.0


# ----------------------------------------------------------------------------------------------------------
# Scene construction
# ----------------------------------------------------------------------------------------------------------

ROOM_HALF_X = 2.5
ROOM_HALF_Y = 2.0
_ROOM_HEIGHT = 2.6
_OBJECT_REGION = (0.9, 0.6)
# Dataset cameras sit on an ellipse at these fractions of the room half extents.
RING_FRACTION = (0.75, 0.72)
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
        The scene description that :func:`~nerfstudio_gsloc.data.room_raycast.render_views` ray casts.
    """
    rng = np.random.default_rng([seed, 2024])
    noise = ValueNoise(rng)
    room_min = np.array([-ROOM_HALF_X, -ROOM_HALF_Y, 0.0])
    room_max = np.array([ROOM_HALF_X, ROOM_HALF_Y, _ROOM_HEIGHT])

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
        u_axis = OTHER_AXES[axis][0]
        u_range = (room_min[u_axis] + 0.2, room_max[u_axis] - 0.2)
        decal_specs += _place_decals(rng, face, u_range, (0.3, _ROOM_HEIGHT - 0.25), int(rng.integers(3, 5)))
    inner = ((-ROOM_HALF_X + 0.3, ROOM_HALF_X - 0.3), (-ROOM_HALF_Y + 0.3, ROOM_HALF_Y - 0.3))
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


def clamp_pitch(forward: np.ndarray, lo_deg: float = -40.0, hi_deg: float = 15.0) -> np.ndarray:
    """Unit ``forward [3]`` with its elevation clamped to ``[lo_deg, hi_deg]`` (never near vertical)."""
    horiz = math.hypot(forward[0], forward[1])
    pitch = min(max(math.atan2(forward[2], horiz), math.radians(lo_deg)), math.radians(hi_deg))
    yaw = math.atan2(forward[1], forward[0])
    return np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])


def yawed(forward: np.ndarray, angle: float) -> np.ndarray:
    """``forward [3]`` turned by ``angle`` radians about the world +z axis."""
    return rot_z(angle) @ forward


def camera_is_valid(scene: ProceduralScene, position: np.ndarray, clearance: float = _CAMERA_CLEARANCE) -> bool:
    """True when ``position [3]`` is inside the room (with a margin) and ``clearance`` metres from every object."""
    if np.any(position < scene.room_min + 0.2) or np.any(position > scene.room_max - 0.2):
        return False
    for obj in scene.objects:
        if isinstance(obj, Sphere):
            dist = np.linalg.norm(position - obj.center) - obj.radius
        elif isinstance(obj, Box):
            q = np.abs((position - obj.center) @ rot_z(obj.yaw)) - obj.half_size
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
    half = np.array([ROOM_HALF_X * RING_FRACTION[0], ROOM_HALF_Y * RING_FRACTION[1]])
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
        forward = yawed(target - position, math.radians(30.0) * math.sin(2.0 * theta + phases[1]))
        if not camera_is_valid(scene, position):
            raise RuntimeError(f"dataset camera {i} collides with the scene (generator bug)")
        poses.append(look_at_opengl(position, clamp_pitch(forward)))
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
    half = np.array([ROOM_HALF_X * RING_FRACTION[0], ROOM_HALF_Y * RING_FRACTION[1]])
    region = np.array(scene.object_region)
    poses = []
    while len(poses) < num_views:
        theta = rng.uniform(0.0, 2.0 * np.pi)
        radius = rng.uniform(0.92, 1.06)
        position = np.array([half[0] * radius * math.cos(theta), half[1] * radius * math.sin(theta), rng.uniform(1.1, 1.6)])
        if not camera_is_valid(scene, position):
            continue
        target = np.array([*rng.uniform(-0.6 * region, 0.6 * region), rng.uniform(0.35, 0.8)])
        forward = yawed(target - position, math.radians(rng.uniform(-25.0, 25.0)))
        poses.append(look_at_opengl(position, clamp_pitch(forward), roll=math.radians(rng.uniform(-5.0, 5.0))))
    return np.stack(poses)
