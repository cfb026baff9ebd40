"""Benchmark trials: the initial poses a protocol (:mod:`nerfstudio_gsloc.evaluation.protocols`) draws for each query.

Seeding: the perturbation of trial ``t`` of query ``q`` is drawn from its own CPU generator seeded from
``(protocol seed, q.index, t)`` (:func:`trial_seed`), so every method of a benchmark starts from exactly the same
initial poses, and so does every later run, whatever the order, batching or subset of queries.

Shapes: poses are OpenGL camera-to-world ``[3, 4]`` in the scene (dataparser) frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation.protocols import Protocol
from nerfstudio_gsloc.localize.pose import perturb_pose
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error


def translate_pose(c2w: Tensor, offset: Tensor) -> Tensor:
    """Move camera centres by world-axis offsets, keeping the orientation (same as ``PoseCorrection``'s translation).

    Args:
        c2w: ``[B, 3|4, 4]`` OpenGL camera-to-world poses.
        offset: ``[B, 3]`` offsets in world axes (scene units).

    Returns:
        ``[B, 3, 4]`` moved poses.
    """
    pose = to_homogeneous(c2w)[:, :3, :]
    return torch.cat([pose[:, :, :3], pose[:, :, 3:] + offset.to(pose)[:, :, None]], dim=-1)


def trial_seed(base_seed: int, query_index: int, trial: int) -> int:
    """63-bit seed of trial ``trial`` of query ``query_index`` (independent streams via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(query_index), int(trial)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) & 0x7FFFFFFF) << 32 | int(state[1])


@dataclass
class Trial:
    """One localization attempt: a query and the initial pose every method starts from.

    Attributes:
        query: position of the query in the benchmark's query list.
        query_index: ``Query.index`` (what the seed is derived from).
        trial: trial number of this query.
        seed: the generator seed of the perturbation (:func:`trial_seed`).
        c2w_init: ``[3, 4]`` float32 initial pose (scene frame).
        init_rot_deg: rotation error of ``c2w_init`` against the ground truth (degrees).
        init_trans: translation error of ``c2w_init`` (scene units).
        nominal_angle_deg: the drawn angle ``|angle|`` (equals ``init_rot_deg`` up to rounding; the sweep's
            angle for ``sweep`` protocols).
    """

    query: int
    query_index: int
    trial: int
    seed: int
    c2w_init: Tensor
    init_rot_deg: float
    init_trans: float
    nominal_angle_deg: float


def draw_perturbation(protocol: Protocol, trial: int, generator: torch.Generator, camera_scale: float) -> Tuple[float, Tensor]:
    """Draw the rotation angle and the translation offset of one trial.

    Args:
        protocol: the protocol.
        trial: trial number (selects the sweep angle).
        generator: the trial's CPU generator.
        camera_scale: camera-distance scale of the scene.

    Returns:
        ``(angle_deg >= 0, offset [3] float64 scene units)``.
    """
    rot, tr = protocol.rotation, protocol.translation
    if rot.mode == "sweep":
        angle = float(rot.angles_deg[trial // protocol.trials])
    else:
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        angle = abs(rot.range_deg[0] + (rot.range_deg[1] - rot.range_deg[0]) * u)
    factor = protocol.translation_factor(camera_scale)
    if tr.mode == "uniform_per_axis":
        u3 = torch.rand(3, generator=generator, dtype=torch.float64)
        offset = (tr.range[0] + (tr.range[1] - tr.range[0]) * u3) * factor
    else:
        if tr.mode == "fixed_length":
            length = tr.length
        else:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            length = tr.range[0] + (tr.range[1] - tr.range[0]) * u
        direction = torch.randn(3, generator=generator, dtype=torch.float64)
        direction = direction / torch.linalg.norm(direction).clamp_min(1e-12)
        offset = direction * length * factor
    return angle, offset


def generate_trials(protocol: Protocol, queries: Sequence[Query], camera_scale: float) -> List[Trial]:
    """The trials of a benchmark: ``protocol.trials_per_query`` seeded initial poses per query.

    The rotation is applied by :func:`~nerfstudio_gsloc.localize.pose.perturb_pose` (exact angle about a random
    axis through the camera centre), then the centre is moved by the drawn offset (:func:`translate_pose`).

    Args:
        protocol: the protocol.
        queries: queries with ground truth (``gt_c2w``).
        camera_scale: camera-distance scale (:func:`~nerfstudio_gsloc.localize.scene_map.camera_distance_scale`).

    Returns:
        trials ordered by query, then trial number.

    Raises:
        GslocError: a query has no ground-truth pose.
    """
    missing = [q.name for q in queries if q.gt_c2w is None]
    if missing:
        raise GslocError(f"benchmark queries need ground-truth poses (transform_matrix); missing for {missing[0]}")
    trials: List[Trial] = []
    for position, query in enumerate(queries):
        assert query.gt_c2w is not None
        if not protocol.has_prior:
            # Nothing is drawn and nothing derived from the ground truth: the start is "no pose" (NaN), its errors
            # infinite (the failure convention of the metrics).
            trials.append(Trial(position, query.index, 0, trial_seed(protocol.seed, query.index, 0),
                                torch.full((3, 4), math.nan), math.inf, math.inf, 0.0))
            continue
        gt = query.gt_c2w[None, :3, :4].double()
        for t in range(protocol.trials_per_query):
            seed = trial_seed(protocol.seed, query.index, t)
            generator = torch.Generator().manual_seed(seed)
            angle, offset = draw_perturbation(protocol, t, generator, camera_scale)
            # perturb_pose draws its random axis (and a direction for its zero-length translation) next.
            rotated = perturb_pose(gt, angle, 0.0, generator)
            c2w = translate_pose(rotated, offset[None])
            trials.append(
                Trial(
                    query=position,
                    query_index=query.index,
                    trial=t,
                    seed=seed,
                    c2w_init=c2w[0].float(),
                    init_rot_deg=float(rotation_error_deg(c2w, gt)[0]),
                    init_trans=float(translation_error(c2w, gt)[0]),
                    nominal_angle_deg=angle,
                )
            )
    return trials
