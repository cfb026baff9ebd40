"""The optional live-poses hook of the optimisation loop: now and then, the current pose of every active query.

A caller that wants to watch the optimisation (``ns-localize --viewer`` draws the frustums moving) passes an
``on_poses`` callback to :meth:`~nerfstudio_gsloc.localize.localizer.Localizer.localize`. The loop calls it after
an iteration with ``{position: c2w}``: the queries still being optimised, by position in the caller's input, each
a ``[3, 4]`` OpenGL camera-to-world pose in the scene frame (float32, CPU, detached).

Calls are throttled by :class:`PosesThrottle` so that reading the poses and drawing them costs at most
``budget`` (2 %) of the run's wall time: after a call that took ``d`` seconds the next one waits at least
``d / budget`` seconds (and ``min_interval``). Without a callback the loop runs exactly as before.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

PosesCallback = Optional[Callable[[Dict[int, Tensor]], None]]
"""Called now and then with ``{position: current [3, 4] scene-frame c2w}`` of the queries still being optimised."""


class PosesThrottle:
    """Decides when the next ``on_poses`` call is due so that the calls take at most ``budget`` of the time.

    Args:
        budget: largest fraction of wall time spent in the calls (reading poses and the callback).
        min_interval: shortest time between two calls, seconds (no drawing faster than a viewer can show).
        clock: seconds (``time.perf_counter``; tests pass their own).
    """

    def __init__(self, budget: float = 0.02, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.budget = budget
        self.min_interval = min_interval
        self.clock = clock
        self.next_at = -float("inf")
        self.calls = 0
        self.seconds = 0.0  # total time spent in calls

    def due(self) -> bool:
        return self.clock() >= self.next_at

    def spent(self, started: float) -> None:
        """Record a call that began at ``started`` (a ``clock()`` value) and schedule the next one."""
        now = self.clock()
        cost = max(0.0, now - started)
        self.calls += 1
        self.seconds += cost
        self.next_at = now + max(self.min_interval, cost / self.budget)


def step_with_poses(on_step: Optional[Callable[[int], None]], on_poses: Callable[[Dict[int, Tensor]], None],
                    batch, members: List[int], throttle: PosesThrottle) -> Callable[[int], None]:
    """An ``on_step`` callback that also reports the batch's active poses to ``on_poses`` when ``throttle`` allows.

    Args:
        on_step: the caller's step callback (or ``None``), called first, every iteration.
        on_poses: see :data:`PosesCallback`.
        batch: the :class:`~nerfstudio_gsloc.localize.state.BatchState` being optimised.
        members: position (in the optimiser's input) of each query of ``batch``.
        throttle: shared by the batches of one run.
    """

    def step(active: int) -> None:
        if on_step is not None:
            on_step(active)
        if not throttle.due():
            return
        started = throttle.clock()
        ids = batch.active_ids()
        if ids:
            with torch.no_grad():
                c2w = batch.current_c2w().detach().float().cpu()
            on_poses({members[i]: c2w[i].clone() for i in ids})
        throttle.spent(started)

    return step
