"""`ns-localize --ray`: the same poses.json as in-process, a killed worker recovered, --resume after an interruption.

One local Ray runtime (127.0.0.1, 2 CPUs) serves the module and is shut down at its end; the commands find it
initialised and use it as ``--ray`` would use the one it starts.
"""

from __future__ import annotations

import json
import sys

import pytest

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation.ray_runner import CRASH_ENV, LOCAL, import_ray, init_ray, ray_argv
from nerfstudio_gsloc.scripts.localize_outputs import LocalizeOutputs

from cli_helpers import FAST as FAST_SCHEDULE
from cli_helpers import run_ns_localize

FAST = [*FAST_SCHEDULE, "--init", "perturb", "--perturb-deg", "5", "--perturb-trans", "0.05"]


@pytest.fixture(scope="module")
def ray_runtime():
    init_ray(LOCAL, num_cpus=2)  # first: it imports Ray after asking for the loopback address
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


_run = run_ns_localize


def _by_image(path):
    """poses.json results keyed by image, without the wall-clock seconds (the only thing allowed to differ)."""
    results = json.loads(path.read_text())["results"]
    keyed = {entry["image"]: {k: v for k, v in entry.items() if k != "seconds"} for entry in results}
    assert len(keyed) == len(results)  # every query once
    return keyed


def test_bare_ray_flag_means_a_local_runtime():
    assert ray_argv(["--ray"]) == ["--ray=local"]
    assert ray_argv(["--ray", "--max-queries", "2"]) == ["--ray=local", "--max-queries", "2"]
    assert ray_argv(["--ray", "10.0.0.1:6379", "--seed", "1"]) == ["--ray", "10.0.0.1:6379", "--seed", "1"]


def test_units_are_the_localizers_own_batches_and_hold_every_query_once():
    """Optimising methods: the optimiser's batches (by image size, after the skipped queries); others: chunks of 4;
    queries without a start form one unit of their own."""
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from nerfstudio_gsloc.evaluation.ray_runner import plan_units
    from nerfstudio_gsloc.localize.initialization import InitialPose
    from nerfstudio_gsloc.localize.localizer import Localizer, OptimizingLocalizer
    from nerfstudio_gsloc.localize.queries import Query

    def query(i, width, depth=True):
        return Query(f"q{i}", Path(f"q{i}.png"), torch.zeros(4, width, 3), torch.eye(3), width, 4,
                     depth=torch.ones(4, width) if depth else None, index=i)

    queries = [query(0, 8), query(1, 6), query(2, 8, depth=False), query(3, 8), query(4, 6), query(5, 8), query(6, 8)]
    inits = [InitialPose(torch.eye(4)[:3], "prior") for _ in queries]
    inits[6] = InitialPose(None, "retrieval", "retrieval found no pose")
    depth_method = OptimizingLocalizer.__new__(OptimizingLocalizer)
    depth_method.needs_depth = True
    depth_method.optimizer = SimpleNamespace(optim=SimpleNamespace(batch_size=2))
    units = plan_units(depth_method, "depth", queries, inits)
    assert [u.positions for u in units] == [[6], [2], [0, 3], [5], [1, 4]]
    assert [q.name for q in units[2].queries] == ["q0", "q3"] and units[0].inits[0].c2w is None
    independent = plan_units(Localizer.__new__(Localizer), "pnp", queries, inits)
    assert [u.positions for u in independent] == [[6], [0, 1, 2, 3], [4, 5]]
    assert sorted(p for u in units for p in u.positions) == list(range(7))


def test_missing_ray_is_one_error_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(GslocError, match=r"--ray needs Ray, which is not installed: pip install 'nerfstudio-gsloc\[ray\]'"):
        import_ray(LOCAL)


def test_ray_gives_the_in_process_poses_and_recovers_a_killed_worker(tmp_path, capsys, monkeypatch, small_gsloc_run,
                                                                      ray_runtime):
    # Batches of 2 over the 3 eval views: 2 units, the first 2 views optimised together as in-process.
    base = ["--load-config", small_gsloc_run, *FAST, "--localization.optim.batch-size", "2"]
    code, _, err = _run([*base, "--output-dir", tmp_path / "local"], capsys)
    assert code == 0, err
    local = _by_image(tmp_path / "local" / "poses.json")
    assert len(local) == 3

    # The first worker to start a unit dies (os._exit) with it unfinished; a new actor runs it again.
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, str(marker))
    code, out, err = _run([*base, "--output-dir", tmp_path / "ray", "--ray", "--ray-workers", "2"], capsys)
    assert code == 0, err
    assert marker.is_file() and "(died)" in out  # the per-worker summary lists the dead actor beside its successor
    distributed = _by_image(tmp_path / "ray" / "poses.json")
    assert distributed == local  # same queries, each once, with the same poses, statuses and confidences
    metrics = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert metrics["num_queries"] == 3


def test_resume_after_an_interrupted_ray_run_skips_finished_queries(tmp_path, capsys, monkeypatch, small_gsloc_run,
                                                                    ray_runtime):
    out_dir = tmp_path / "out"
    base = ["--load-config", small_gsloc_run, *FAST, "--localization.optim.batch-size", "1", "--output-dir", out_dir]
    real_add = LocalizeOutputs.add

    def add_then_interrupt(self, record, trace):
        real_add(self, record, trace)
        raise KeyboardInterrupt  # Ctrl-C on the driver right after the first result is saved

    monkeypatch.setattr(LocalizeOutputs, "add", add_then_interrupt)
    code, _, err = _run([*base, "--ray", "--ray-workers", "1"], capsys)
    assert code == 130 and "holds 1 query of 3; rerun with --resume" in err
    partial = json.loads((out_dir / "poses.json").read_text())["results"]
    assert len(partial) == 1

    # The resume runs in-process (it could use --ray as well: the file is the same either way).
    monkeypatch.setattr(LocalizeOutputs, "add", real_add)
    code, out, err = _run([*base, "--resume"], capsys)
    assert code == 0, err
    assert "localizing 2 queries (1 already done)" in out
    final = json.loads((out_dir / "poses.json").read_text())["results"]
    assert final[0] == partial[0] and len(_by_image(out_dir / "poses.json")) == 3
