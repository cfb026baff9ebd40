"""A query's result is handed out as soon as that query is finished, not when its whole batch is."""

from __future__ import annotations

import torch

from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig
from nerfstudio_gsloc.localize.queries import FrameTransform, load_transforms_queries
from nerfstudio_gsloc.localize.result import STATUS_FAILED


def test_failed_queries_are_reported_before_their_batch_ends(point_splat, embedded_scene):
    queries = load_transforms_queries(embedded_scene.queries, FrameTransform.identity())[:3]
    starts = initial_poses(queries, "perturb", angle_deg=1.0, translation=0.02, seed=0)
    starts[0] = torch.full((3, 4), float("nan"))  # fails before the first step
    away = starts[1].clone()  # 1 km back, turned around: loses sight of the room at its first step
    away[:, 3] = away[:, 3] + 1000.0 * away[:, 2]
    away[:, :3] = away[:, :3] * torch.tensor([-1.0, 1.0, -1.0])
    starts[1] = away
    config = PoseInversionConfig()
    config.losses.matching = config.losses.depth = False
    config.schedule.pyramid_scales, config.schedule.pyramid_iterations = (1,), (6,)
    config.schedule.refine_matching_weight = ()
    config.optim.batch_size = 3

    events = []
    results = config.setup(model=point_splat).localize(
        queries, starts,
        on_result=lambda position, result: events.append(("result", position, result.status)),
        on_step=lambda active: events.append(("step", active)),
    )
    steps = [i for i, e in enumerate(events) if e[0] == "step"]
    reported = {e[1]: i for i, e in enumerate(events) if e[0] == "result"}
    assert len(steps) == 6 and sorted(reported) == [0, 1, 2]
    # The two failures are out after the first step, five steps before the batch ends; the third after the last.
    assert reported[0] < steps[1] and reported[1] < steps[1] and reported[2] > steps[-1]
    assert [r.status for r in results[:2]] == [STATUS_FAILED, STATUS_FAILED] and results[2].iterations == 6
