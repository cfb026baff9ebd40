"""The optional ``on_poses`` observer of the localizer interface (what ``ns-localize --viewer`` draws live)."""

from __future__ import annotations

import pytest
import torch

from nerfstudio_gsloc.localize import optimizer as optimizer_module
from nerfstudio_gsloc.localize.initialization import initial_poses
from nerfstudio_gsloc.localize.live import PosesThrottle
from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig
from nerfstudio_gsloc.localize.queries import FrameTransform, load_transforms_queries
from nerfstudio_gsloc.localize.result import STATUS_FAILED


def test_throttle_keeps_the_calls_within_their_budget():
    now = [0.0]
    throttle = PosesThrottle(budget=0.02, min_interval=0.1, clock=lambda: now[0])
    assert throttle.due()
    throttle.spent(started=0.0)  # a free call: the next one after min_interval
    assert throttle.next_at == pytest.approx(0.1)
    now[0] = 0.05
    assert not throttle.due()
    now[0] = 0.1
    assert throttle.due()
    now[0] = 0.11
    throttle.spent(started=0.1)  # took 10 ms: the next one 0.5 s later (10 ms is 2 % of 0.5 s)
    assert throttle.next_at == pytest.approx(0.61) and throttle.calls == 2
    assert throttle.seconds == pytest.approx(0.01)
    with pytest.raises(ValueError):
        PosesThrottle(budget=0.0)


@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_on_poses_reports_active_queries_by_input_position_and_changes_nothing(point_splat, embedded_scene, monkeypatch,
                                                                              refine_only, solver):
    queries = load_transforms_queries(embedded_scene.queries, FrameTransform.identity())[:3]
    starts = initial_poses(queries, "perturb", angle_deg=2.0, translation=0.03, seed=4)
    starts[0] = torch.full((3, 4), float("nan"))  # fails at once: never reported
    plain = refine_only(4, batch_size=1, final_solver=solver).setup(model=point_splat).localize(queries, starts)

    # A throttle that never waits, so that every iteration reports.
    monkeypatch.setattr(optimizer_module, "PosesThrottle", lambda: PosesThrottle(budget=1.0, min_interval=0.0))
    calls = []
    watched = refine_only(4, batch_size=1, final_solver=solver).setup(model=point_splat).localize(
        queries, starts, on_poses=lambda poses: calls.append({k: v.clone() for k, v in poses.items()})
    )
    for a, b in zip(plain, watched):  # observing changes no result
        assert a.status == b.status and a.iterations == b.iterations
        torch.testing.assert_close(a.c2w, b.c2w, equal_nan=True)
    assert plain[0].status == STATUS_FAILED
    # One batch per query (batch_size 1): query 1's iterations, then query 2's, keyed by input position.
    assert [sorted(c) for c in calls] == [[1]] * 4 + [[2]] * 4
    for call in calls:
        for position, c2w in call.items():
            assert c2w.shape == (3, 4) and c2w.dtype == torch.float32 and torch.isfinite(c2w).all()
    # The poses move from the start as the query is optimised.
    moved = [float((call[1] - starts[1].float()).abs().max()) for call in calls[:4]]
    assert moved[0] > 0 and moved[-1] != moved[0]
