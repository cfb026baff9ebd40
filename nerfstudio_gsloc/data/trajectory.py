"""A smooth camera path through the embedded procedural room: a query sequence for tracking (``ns-localize --sequence``).

The camera walks along the band the dataset cameras cover (the loop around the objects, so the trained model has
seen what it looks at), looking inwards at a slowly wandering target, with a little roll. Its speed is ``step``
metres per frame (a few centimetres; the view turns by a degree or two per frame), raised smoothly to
``fast_factor`` times that in two segments of the path (a faster hand-held move). The frames are new renders (RGB
and 16-bit depth) at poses that are not in the dataset, so none was used for training.

The path depends only on the scene seed, the trajectory ``seed`` and the arguments (deterministic). Frame 0 also
gets a ``prior_transform_matrix``: its true pose moved by ``prior_deg`` about a random axis and ``prior_trans``
metres in a random direction, the start a tracker gets (every later frame starts from the one before).

Poses: ``[N, 4, 4]`` OpenGL camera-to-world in the scene's original frame (metres), like
:func:`~nerfstudio_gsloc.data.room_layout.query_poses`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from nerfstudio_gsloc.data.procedural_scene import render_and_write, scene_info, validate_request
from nerfstudio_gsloc.data.room_geometry import ProceduralScene
from nerfstudio_gsloc.data.room_layout import (
    DEFAULT_HFOV_DEG,
    RING_FRACTION,
    ROOM_HALF_X,
    ROOM_HALF_Y,
    build_scene,
    camera_is_valid,
    clamp_pitch,
    focal_from_hfov,
    look_at_opengl,
    yawed,
)
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_write_text

#: Fraction of the path (centre, half width) of the two faster segments.
FAST_SEGMENTS: Tuple[Tuple[float, float], ...] = ((0.3, 0.06), (0.72, 0.05))


def speed_profile(num_frames: int, step: float, fast_factor: float) -> np.ndarray:
    """Metres travelled between frame ``i`` and ``i + 1``: ``step``, raised smoothly (raised-cosine windows) to
    ``fast_factor * step`` in :data:`FAST_SEGMENTS`. Shape ``[num_frames - 1]``."""
    u = (np.arange(num_frames - 1) + 0.5) / max(1, num_frames - 1)
    boost = np.zeros_like(u)
    for centre, half in FAST_SEGMENTS:
        inside = np.abs(u - centre) < half
        boost[inside] = np.maximum(boost[inside], 0.5 * (1.0 + np.cos(np.pi * (u[inside] - centre) / half)))
    return step * (1.0 + (fast_factor - 1.0) * boost)


def trajectory_poses(scene: ProceduralScene, num_frames: int, seed: int, step: float = 0.025,
                     fast_factor: float = 2.5) -> np.ndarray:
    """The camera path (see the module docstring).

    Args:
        scene: from :func:`~nerfstudio_gsloc.data.room_layout.build_scene`.
        num_frames: number of frames ``N`` (at least 2).
        seed: picks the start on the loop and the phases of the height, radius, target and roll waves.
        step: metres between consecutive frames outside the fast segments.
        fast_factor: speed-up in the fast segments.

    Returns:
        ``[N, 4, 4]`` OpenGL camera-to-world poses (metres).
    """
    rng = np.random.default_rng([scene.seed, seed, 17])
    phases = rng.uniform(0.0, 2.0 * np.pi, size=7)
    direction = 1.0 if rng.uniform() < 0.5 else -1.0
    half = np.array([ROOM_HALF_X * RING_FRACTION[0], ROOM_HALF_Y * RING_FRACTION[1]])
    region = np.array(scene.object_region)

    def position(theta: np.ndarray) -> np.ndarray:
        radius = 0.98 + 0.04 * np.sin(3.0 * theta + phases[1])
        height = 1.3 + 0.2 * np.sin(2.0 * theta + phases[2])
        return np.stack([half[0] * radius * np.cos(theta), half[1] * radius * np.sin(theta), height], axis=-1)

    # Arc length along a dense sampling of the loop (several turns, for long paths), then the frames' angles.
    steps = speed_profile(num_frames, step, fast_factor)
    travel = np.concatenate([[0.0], np.cumsum(steps)])
    turns = int(math.ceil(travel[-1] / 8.0)) + 1  # the loop is longer than 8 m
    dense = phases[0] + direction * np.linspace(0.0, 2.0 * np.pi * turns, 4000 * turns)
    points = position(dense)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    thetas = np.interp(travel, arc, dense)

    poses = []
    for theta in thetas:
        pos = position(np.array(theta))
        target = np.array([
            0.5 * region[0] * math.cos(1.5 * theta + phases[3]),
            0.5 * region[1] * math.sin(2.0 * theta + phases[4]),
            0.6 + 0.2 * math.sin(theta + phases[5]),
        ])
        forward = yawed(target - pos, math.radians(15.0) * math.sin(2.0 * theta + phases[6]))
        roll = math.radians(3.0) * math.sin(3.0 * theta + phases[5])
        if not camera_is_valid(scene, pos):
            raise RuntimeError("trajectory camera collides with the scene (generator bug)")
        poses.append(look_at_opengl(pos, clamp_pitch(forward), roll=roll))
    return np.stack(poses)


def perturbed(c2w: np.ndarray, angle_deg: float, distance: float, rng: np.random.Generator) -> np.ndarray:
    """``c2w [4, 4]`` turned by exactly ``angle_deg`` about a random axis through its centre and moved by exactly
    ``distance`` in a random direction (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(angle_deg)
    skew = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    rot = np.eye(3) + math.sin(angle) * skew + (1.0 - math.cos(angle)) * skew @ skew
    shift = rng.normal(size=3)
    out = c2w.copy()
    out[:3, :3] = rot @ c2w[:3, :3]
    out[:3, 3] = c2w[:3, 3] + distance * shift / np.linalg.norm(shift)
    return out


def motion_stats(poses: np.ndarray) -> Dict[str, float]:
    """Median and largest camera motion between consecutive frames (metres, degrees)."""
    moves = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    rel = np.einsum("nji,njk->nik", poses[:-1, :3, :3], poses[1:, :3, :3])
    turns = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)))
    return {"step_median_m": float(np.median(moves)), "step_max_m": float(moves.max()),
            "turn_median_deg": float(np.median(turns)), "turn_max_deg": float(turns.max())}


def write_trajectory(output_dir: Path, seed: int = 0, num_frames: int = 300, width: int = 128, height: int = 96,
                     scene_seed: int = 0, hfov_deg: float = DEFAULT_HFOV_DEG, step: float = 0.025,
                     fast_factor: float = 2.5, prior_deg: float = 2.0, prior_trans: float = 0.03,
                     show_progress: bool = True) -> Path:
    """Render the path and write it as a query transforms.json (frames in path order) with RGB and depth.

    The layout is that of :func:`~nerfstudio_gsloc.data.procedural_scene.write_query_set` (per-frame intrinsics,
    ``depth/`` in millimetres, poses in the dataset's original frame; do not train on it). Frame 0 carries a
    ``prior_transform_matrix`` (see the module docstring).

    Returns:
        Path of the written ``transforms.json``.
    """
    if not (0.0 < step <= 0.5 and fast_factor >= 1.0 and prior_deg >= 0.0 and prior_trans >= 0.0):
        raise GslocError("the trajectory needs 0 < step <= 0.5 m, fast_factor >= 1 and a prior offset >= 0")
    output_dir = validate_request(output_dir, num_frames, width, height, hfov_deg, min_views=2)
    scene = build_scene(scene_seed)
    poses = trajectory_poses(scene, num_frames, seed, step, fast_factor)
    focal = focal_from_hfov(width, hfov_deg)
    names = render_and_write(scene, output_dir, poses, width, height, focal, f"rendering trajectory {seed}",
                             show_progress)
    prior = perturbed(poses[0], prior_deg, prior_trans, np.random.default_rng([scene_seed, seed, 19]))
    frames = []
    for i, (name, pose) in enumerate(zip(names, poses)):
        frame = {"file_path": f"images/{name}", "depth_file_path": f"depth/{name}", "transform_matrix": pose.tolist(),
                 "fl_x": focal, "fl_y": focal, "cx": width / 2.0, "cy": height / 2.0, "w": width, "h": height}
        if i == 0:
            frame["prior_transform_matrix"] = prior.tolist()
        frames.append(frame)
    files = [f"images/{n}" for n in names]
    meta = {
        "camera_model": "OPENCV", "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "frames": frames,
        "train_filenames": files, "val_filenames": files, "test_filenames": files,
        "gsloc_scene": {**scene_info(scene), "trajectory_seed": seed, "step_m": step, "fast_factor": fast_factor,
                        "prior_deg": prior_deg, "prior_trans_m": prior_trans, **motion_stats(poses)},
    }
    path = output_dir / "transforms.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path
