"""Initial poses of queries: the prior from the query file, or a seeded perturbation of the ground truth.

``perturb`` is the evaluation protocol of iNeRF-style papers: the ground-truth camera is rotated by exactly
``angle_deg`` about a random axis through its centre and moved by exactly ``translation`` scene units in a
random direction. Each query draws from its own generator seeded by ``(seed, query.index)``, so its initial
pose does not depend on batching, on ``--max-queries`` or on which queries a resumed run skips.
"""

from __future__ import annotations

from typing import List, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.pose import perturb_pose
from nerfstudio_gsloc.localize.queries import Query

InitMethod = Literal["prior", "perturb"]


def query_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for query ``index`` under base ``seed`` (independent streams via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def check_initialization(queries: Sequence[Query], method: InitMethod) -> None:
    """Raise :class:`GslocError` (before any work) when ``method`` cannot initialise every query."""
    if method == "prior":
        missing = [q.name for q in queries if q.prior_c2w is None]
        if missing:
            raise GslocError(
                f"--init prior needs a prior pose (prior_transform_matrix) for every query; missing for {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
    elif method == "perturb":
        missing = [q.name for q in queries if q.gt_c2w is None]
        if missing:
            raise GslocError(
                f"--init perturb needs a ground-truth pose (transform_matrix) for every query; missing for {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
    else:
        raise GslocError(f"unknown initialisation {method!r}; use prior or perturb")


def initial_poses(
    queries: Sequence[Query],
    method: InitMethod,
    angle_deg: float = 10.0,
    translation: float = 0.1,
    seed: int = 0,
) -> List[Tensor]:
    """Initial scene-frame OpenGL camera-to-world poses of the queries.

    Args:
        queries: the queries (``prior_c2w`` / ``gt_c2w`` in the scene frame).
        method: ``"prior"`` (the query's prior pose) or ``"perturb"`` (ground truth, perturbed).
        angle_deg: perturbation rotation angle in degrees (``perturb`` only).
        translation: perturbation translation length in scene units (``perturb`` only).
        seed: base seed; query ``q`` uses :func:`query_generator` ``(seed, q.index)``.

    Returns:
        one ``[3, 4]`` float32 pose per query.
    """
    check_initialization(queries, method)
    if angle_deg < 0 or translation < 0:
        raise GslocError("perturbation angle and translation must be >= 0")
    poses: List[Tensor] = []
    for query in queries:
        if method == "prior":
            assert query.prior_c2w is not None
            poses.append(query.prior_c2w[:3, :4].float().clone())
        else:
            assert query.gt_c2w is not None
            generator = query_generator(seed, query.index)
            # Perturb in float64 so the requested angle/length are exact before the cast.
            perturbed = perturb_pose(query.gt_c2w[None, :3, :4].double(), angle_deg, translation, generator)
            poses.append(perturbed[0].float())
    return poses
