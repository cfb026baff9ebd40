"""gsloc-bench: protocols and trial seeding, the report, the CLI's errors, and the harness end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.evaluation import report
from nerfstudio_gsloc.localize.registry import DEFAULT_METHODS, LocalizerSettings
from nerfstudio_gsloc.evaluation.protocols import available_protocols, load_protocol
from nerfstudio_gsloc.evaluation.trials import generate_trials, translate_pose
from nerfstudio_gsloc.localize.scene_map import camera_distance_scale
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.poses_file import QuerySource, read_poses
from nerfstudio_gsloc.scripts.bench import BenchCLI, bench_main, main


def _queries(count: int, seed: int = 0) -> list[Query]:
    """Queries with random ground-truth poses (images unused by trial generation)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        rot = axis_angle_to_rotation_matrix(torch.randn(3, generator=gen, dtype=torch.float64))
        c2w = torch.cat([rot, torch.randn(3, 1, generator=gen, dtype=torch.float64)], dim=1).float()
        out.append(Query(f"q{i}", Path(f"q{i}.png"), torch.zeros(4, 4, 3), torch.eye(3), 4, 4, gt_c2w=c2w, index=i))
    return out


# ----------------------------------------------------------------------------------------------------------
# protocols and seeding (no model)
# ----------------------------------------------------------------------------------------------------------


def test_presets_load_and_describe_their_perturbations():
    assert {"inerf", "icomma-sweep", "tracking"} <= set(available_protocols())
    inerf = load_protocol("inerf")
    assert inerf.rotation.range_deg == (-40.0, 40.0) and inerf.translation.range == (-0.1, 0.1)
    assert inerf.trials == 5 and inerf.translation.reference == "camera_distance"
    sweep = load_protocol("icomma-sweep", trials=2)
    assert sweep.rotation.angles_deg == tuple(float(a) for a in range(10, 90, 10))
    assert sweep.trials_per_query == 16
    # The summary states the translation in scene units for the given camera-distance scale.
    assert "U[-0.4, 0.4] per axis" in inerf.summary(4.0)


def test_global_protocol_draws_no_initial_pose():
    """``global``: one trial per query whose start is "no pose" (NaN, infinite initial error); nothing is drawn."""
    protocol = load_protocol("global", trials=3)
    assert not protocol.has_prior and protocol.trials_per_query == 1 and "no prior" in protocol.summary(4.0)
    queries = [Query(f"q{i}", Path(f"q{i}.png"), torch.zeros(2, 2, 3), torch.eye(3), 2, 2, gt_c2w=torch.eye(4)[:3],
                     index=i) for i in range(3)]
    trials = generate_trials(protocol, queries, 4.0)
    assert [t.query for t in trials] == [0, 1, 2]
    assert all(torch.isnan(t.c2w_init).all() and math.isinf(t.init_rot_deg) for t in trials)
    assert protocol.to_dict()["initial_pose"] == "none"


def test_bad_protocols_are_one_line_errors(tmp_path):
    with pytest.raises(GslocError, match="unknown protocol 'nope'"):
        load_protocol("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nrotation: {mode: uniform, range_deg: [10, -10]}\n")
    with pytest.raises(GslocError, match="low <= high"):
        load_protocol(str(bad))
    bad.write_text("name: bad\nrotations: {}\n")
    with pytest.raises(GslocError, match="unknown keys rotations"):
        load_protocol(str(bad))
    with pytest.raises(GslocError, match="trials must be >= 1"):
        load_protocol("inerf", trials=0)


def test_a_bad_sequence_preset_is_refused_before_anything_loads(tmp_path):
    out = tmp_path / "out"
    cli = BenchCLI(load_config=tmp_path / "no-run" / "config.yml", output_dir=out, protocol="sequence",
                   sequence_preset="does-not-exist")
    with pytest.raises(GslocError, match="unknown preset"):
        bench_main(cli, ["test"])
    assert not out.exists()


def test_inerf_trials_follow_the_protocol_and_are_reproducible():
    queries = _queries(4)
    protocol = load_protocol("inerf")
    scale = 2.5
    trials = generate_trials(protocol, queries, scale)
    assert len(trials) == 4 * 5
    again = generate_trials(protocol, queries, scale)
    for a, b in zip(trials, again):
        assert a.seed == b.seed and torch.equal(a.c2w_init, b.c2w_init)
    angles = torch.tensor([t.init_rot_deg for t in trials])
    assert float(angles.max()) <= 40.0 + 1e-3 and float(angles.std()) > 3.0  # spread, not one angle
    for t in trials:
        gt = queries[t.query].gt_c2w
        offset = (t.c2w_init[:, 3] - gt[:, 3]).abs()
        # Each axis offset is within 0.1 x the camera-distance scale.
        assert float(offset.max()) <= 0.1 * scale + 1e-5
        assert t.init_rot_deg == pytest.approx(t.nominal_angle_deg, abs=1e-4)
        assert float(rotation_error_deg(t.c2w_init[None], gt[None])[0]) == pytest.approx(t.init_rot_deg, abs=1e-2)
    # Trials of one query differ from each other.
    assert not torch.equal(trials[0].c2w_init, trials[1].c2w_init)


def test_trial_poses_do_not_depend_on_the_query_subset_or_base_seed_reuse():
    queries = _queries(5)
    protocol = load_protocol("inerf", trials=2)
    full = generate_trials(protocol, queries, 1.0)
    # A run on the last three queries only (same Query.index) draws the same poses for them.
    subset = generate_trials(protocol, queries[2:], 1.0)
    by_key = {(t.query_index, t.trial): t for t in full}
    for t in subset:
        assert torch.equal(t.c2w_init, by_key[(t.query_index, t.trial)].c2w_init)
    other_seed = generate_trials(load_protocol("inerf", trials=2, seed=1), queries, 1.0)
    assert all(not torch.equal(a.c2w_init, b.c2w_init) for a, b in zip(full, other_seed))


def test_sweep_and_tracking_magnitudes():
    queries = _queries(2)
    sweep = generate_trials(load_protocol("icomma-sweep", trials=1), queries, 2.0)
    assert [round(t.init_rot_deg, 3) for t in sweep[:8]] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    # fixed_length 0.05 x camera distance 2.0
    assert all(t.init_trans == pytest.approx(0.1, abs=1e-5) for t in sweep)
    tracking = generate_trials(load_protocol("tracking"), queries, 100.0)  # scene units: scale ignored
    assert all(t.init_rot_deg <= 2.0 + 1e-4 and t.init_trans <= 0.02 + 1e-6 for t in tracking)


def test_translate_pose_moves_only_the_centre():
    c2w = _queries(1)[0].gt_c2w[None]
    moved = translate_pose(c2w, torch.tensor([[0.1, -0.2, 0.3]]))
    assert torch.allclose(moved[0, :, :3], c2w[0, :, :3])
    assert torch.allclose(moved[0, :, 3] - c2w[0, :, 3], torch.tensor([0.1, -0.2, 0.3]))
    assert float(translation_error(moved, c2w)[0]) == pytest.approx(math.sqrt(0.14), abs=1e-6)


def test_camera_distance_scale_is_the_median_distance_to_the_origin():
    c2w = torch.eye(4)[:3].repeat(3, 1, 1)
    c2w[:, 0, 3] = torch.tensor([1.0, 2.0, 10.0])
    assert camera_distance_scale(c2w) == pytest.approx(2.0)
    with pytest.raises(GslocError):
        camera_distance_scale(torch.zeros(0, 3, 4))


def test_single_loss_baselines_get_one_loss_and_their_own_budget():
    settings = LocalizerSettings()
    settings.single_loss.pyramid_iterations = (7, 8, 9)
    settings.single_loss.rotation_lr = 0.004
    photo, depth = settings.config("photometric"), settings.config("depth")
    assert (photo.losses.photometric, photo.losses.matching, photo.losses.depth) == (True, False, False)
    assert (depth.losses.photometric, depth.losses.matching, depth.losses.depth) == (False, False, True)
    for config in (photo, depth):
        assert config.schedule.pyramid_iterations == (7, 8, 9) and config.optim.rotation_lr == 0.004
        assert config.schedule.pyramid_scales == settings.gsloc.schedule.pyramid_scales
    # gsloc's own settings are untouched.
    assert settings.gsloc.schedule.pyramid_iterations == (15, 15, 60) and settings.gsloc.losses.matching


@pytest.mark.parametrize("scales", [(2.0, 1.0), (8.0, 4.0, 2.0, 1.0)])
def test_single_loss_budget_fits_a_pyramid_of_another_depth(scales):
    """gsloc settings with a 2-level pyramid (the fast preset) or a 4-level one: photometric and depth get one
    budget per level (the finest levels' budgets; the coarsest repeated) and a schedule that passes the checks
    (a 3-level budget on a 2-level pyramid stopped gsloc-bench --gsloc-preset fast before it ran)."""
    from nerfstudio_gsloc.localize.pipeline import PoseInversion

    settings = LocalizerSettings()
    settings.gsloc.schedule.pyramid_scales = scales
    settings.gsloc.schedule.pyramid_iterations = (10,) * len(scales)
    settings.gsloc.schedule.refine_matching_weight = (0.0,) * len(scales)
    settings.single_loss.pyramid_iterations = (7, 8, 9)
    config = settings.config("depth")
    assert config.schedule.pyramid_iterations == {2: (8, 9), 4: (7, 7, 8, 9)}[len(scales)]
    PoseInversion.build_matcher(config)  # raises on an inconsistent schedule


# ----------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------


def _record(method, rot, trans, failed=False, skipped=False, seconds=1.0):
    return report.TrialRecord(method, "q", 0, 0, 1, 10.0, 0.1, 10.0, rot, trans, seconds, 3, "x", "", failed, skipped)


def test_summary_counts_failures_as_infinite_errors_and_drops_skipped_trials():
    records = [_record("m", 0.5, 0.005), _record("m", 3.0, 0.03), _record("m", 0.1, 0.001, failed=True),
               _record("m", None, None, skipped=True)]
    row = report.summarize_method("m", records)
    assert row["trials"] == 3 and row["failed"] == 1 and row["skipped"] == 1
    skipped_only = report.summarize_method("d", [_record("d", None, None, skipped=True)])
    assert skipped_only["trials"] == 0 and "n/a" in report.markdown_table([skipped_only])
    assert report.skipped_notes([skipped_only]) == ["d: 1 trials skipped (not applicable)"]
    assert row["success_1deg_0.01"] == pytest.approx(1 / 3)
    assert row["success_5deg_0.05"] == pytest.approx(2 / 3)  # the failed trial's small error does not count
    assert row["rot_median_deg"] == pytest.approx(3.0)  # median of (0.5, 3.0, inf)
    assert math.isinf(row["rot_mean_deg"]) and math.isinf(row["trans_mean"])  # one failure: an infinite mean
    most_failed = report.summarize_method("f", [_record("f", 1.0, 0.01, failed=True)] * 2 + [_record("f", 1.0, 0.01)])
    assert math.isinf(most_failed["rot_median_deg"])
    assert "| inf | inf |" in report.markdown_table([most_failed])
    no_failure = report.summarize_method("m", records[:2])
    assert no_failure["rot_mean_deg"] == pytest.approx(1.75) and no_failure["rot_median_deg"] == pytest.approx(1.75)


def test_comparison_says_when_gsloc_does_not_win():
    rows = [report.summarize_method("gsloc", [_record("gsloc", 0.2, 0.004)]),
            report.summarize_method("pnp", [_record("pnp", 0.1, 0.002)])]
    (line,) = report.comparisons(rows)
    assert line.startswith("gsloc does NOT beat pnp")


def test_comparison_breaks_a_tie_at_full_success_with_the_tightest_threshold():
    # Both succeed on every trial at (5 deg, 0.05); at (1 deg, 0.01) gsloc has 2/2 and pnp 1/2.
    gsloc = [_record("gsloc", 0.02, 0.001), _record("gsloc", 0.03, 0.002)]
    pnp = [_record("pnp", 0.05, 0.004), _record("pnp", 1.5, 0.012)]
    (line,) = report.comparisons([report.summarize_method("gsloc", gsloc), report.summarize_method("pnp", pnp)])
    assert line.startswith("gsloc beats pnp") and "tie: both succeed on every trial" in line
    assert "at 1°/0.01 100.0% vs 50.0% (more)" in line
    # Same tie, but pnp also succeeds on every trial at (1 deg, 0.01): gsloc does not succeed on more trials.
    pnp_tight = [_record("pnp", 0.05, 0.004), _record("pnp", 0.9, 0.009)]
    (line,) = report.comparisons([report.summarize_method("gsloc", gsloc), report.summarize_method("pnp", pnp_tight)])
    assert line.startswith("gsloc does NOT beat pnp") and "(not more)" in line


# ----------------------------------------------------------------------------------------------------------
# CLI errors (before any model is loaded)
# ----------------------------------------------------------------------------------------------------------


def _cli_error(argv, capsys) -> str:
    from nerfstudio_gsloc.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:")
    return err


def test_cli_bad_inputs(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "config.yml")
    assert "config not found" in _cli_error(["--load-config", missing], capsys)
    assert "unknown method 'magic'" in _cli_error(["--load-config", missing, "--methods", "gsloc", "magic"], capsys)
    assert "unknown protocol 'x'" in _cli_error(["--load-config", missing, "--protocol", "x"], capsys)
    assert "--trials must be at least 1" in _cli_error(["--load-config", missing, "--trials", "0"], capsys)
    assert "--query-stride must be at least 1" in _cli_error(["--load-config", missing, "--query-stride", "0"], capsys)


# ----------------------------------------------------------------------------------------------------------
# end to end on the embedded scene
# ----------------------------------------------------------------------------------------------------------


def _fast_settings() -> LocalizerSettings:
    """Few iterations everywhere: the test checks the harness, not accuracy."""
    settings = LocalizerSettings()
    settings.gsloc.schedule.matching_iterations = 4
    settings.gsloc.schedule.rematch_every = 2
    settings.gsloc.schedule.pyramid_iterations = (2, 2, 3)
    settings.single_loss.pyramid_iterations = (2, 2, 3)
    settings.icomma.max_iterations = 3
    settings.pnp.num_views = 4
    return settings


def test_bench_end_to_end_on_the_embedded_scene(small_gsloc_run, tmp_path):
    out = tmp_path / "bench"
    cli = BenchCLI(load_config=small_gsloc_run, output_dir=out, methods=DEFAULT_METHODS, protocol="inerf", trials=2,
                   max_queries=2, method_settings=_fast_settings())
    rows = bench_main(cli, ["test"])
    assert [r["method"] for r in rows] == list(DEFAULT_METHODS)

    # results.csv parses: one row per method with rates in [0, 1] and 2 queries x 2 trials each.
    parsed = report.read_results_csv(out / "results.csv")
    assert [r["method"] for r in parsed] == list(DEFAULT_METHODS)
    for row in parsed:
        assert row["trials"] == 4  # the embedded scene has depth, so depth runs too
        for key in ("success_1deg_0.01", "success_2deg_0.02", "success_5deg_0.05"):
            assert 0.0 <= row[key] <= 1.0
        assert row["seconds_median"] > 0
    # pnp is a real baseline: on the scene's own eval views it localizes to well under (5 deg, 0.05).
    pnp = next(r for r in parsed if r["method"] == "pnp")
    assert pnp["success_5deg_0.05"] == 1.0

    # trials.jsonl: every method saw the same four initial poses (same seeds and initial errors).
    records = report.read_trials_jsonl(out / "trials.jsonl")
    assert len(records) == 4 * len(DEFAULT_METHODS)
    starts = {}
    for r in records:
        key = (r.query_index, r.trial)
        starts.setdefault(key, set()).add((r.seed, round(r.init_rot_deg, 9), round(r.init_trans, 9)))
    assert len(starts) == 4 and all(len(v) == 1 for v in starts.values())

    md = (out / "results.md").read_text()
    assert "| method |" in md and "same initial poses" in md and "camera-distance scale" in md
    assert "kornia SIFT (differentiable sub-pixel keypoints) standing in for LoFTR" in md
    for png in ("success_vs_angle.png", "error_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "bench.json").read_text())
    assert meta["machine"]["torch_threads"] >= 1 and meta["image_sizes"] == [[80, 60]]
    # poses.json: every (method, query, trial) with the trial's start, in the format gsloc-view reads.
    document = read_poses(out / "poses.json")
    assert sorted({r.method for r in document.records}) == sorted(DEFAULT_METHODS) and len(document.records) == 4 * len(DEFAULT_METHODS)
    assert document.queries.is_eval_split and {r.trial for r in document.records} == {0, 1}
    by_key = {(r.method, r.index, r.trial): r for r in document.records}
    for record in records:
        pose = by_key[(record.method, record.query_index, record.trial)]
        init_rot = rotation_error_deg(pose.c2w_init[None], pose.c2w_gt[None]).item()
        assert init_rot == pytest.approx(record.init_rot_deg, abs=1e-3)
        if not record.failed:
            assert pose.errors(document.frame.scale)[0] == pytest.approx(record.final_rot_deg, abs=1e-4)

    # A second run (another process would draw the same: seeds depend only on protocol seed, query, trial).
    out2 = tmp_path / "bench2"
    settings = _fast_settings()
    settings.single_loss.pyramid_iterations = (1, 1, 1)
    # Every other query (0 and 2): query 0's trials are the same as in the first run.
    bench_main(BenchCLI(load_config=small_gsloc_run, output_dir=out2, methods=("photometric",), trials=2,
                        max_queries=2, query_stride=2, method_settings=settings), ["test"])
    again = {(r.query_index, r.trial): (r.seed, r.init_rot_deg, r.init_trans) for r in report.read_trials_jsonl(out2 / "trials.jsonl")}
    first = {(r.query_index, r.trial): (r.seed, r.init_rot_deg, r.init_trans) for r in records if r.method == "photometric"}
    assert sorted({q for q, _ in again}) == [0, 2]
    assert {k: v for k, v in again.items() if k[0] == 0} == {k: v for k, v in first.items() if k[0] == 0}


def test_bench_trains_from_a_dataset_and_preset_then_reuses_the_run(embedded_scene, tmp_path, capsys):
    preset = tmp_path / "smoke.yaml"
    preset.write_text("iterations: 30\ncompress_schedule: true\ndepth_seed_points: 2000\n")
    out = tmp_path / "bench"
    cli = BenchCLI(data=embedded_scene, train_preset=str(preset), output_dir=out, methods=("pnp",), trials=1,
                   max_queries=1, method_settings=_fast_settings())
    bench_main(cli, ["test"])
    config = out / "run" / embedded_scene.name / "gsloc" / "smoke" / "config.yml"
    checkpoint = config.parent / "nerfstudio_models" / "step-000000029.ckpt"
    assert config.is_file() and checkpoint.is_file()
    meta = json.loads((out / "bench.json").read_text())
    assert meta["load_config"] == str(config) and meta["trained_from"]["train_preset"] == str(preset)
    assert "trained by gsloc-bench" in (out / "results.md").read_text()
    assert len(report.read_trials_jsonl(out / "trials.jsonl")) == 1

    # The finished run is reused, not trained again; a changed preset trains again.
    stamp = checkpoint.stat().st_mtime_ns
    bench_main(cli, ["test"])
    assert checkpoint.stat().st_mtime_ns == stamp
    preset.write_text("iterations: 31\ncompress_schedule: true\ndepth_seed_points: 2000\n")
    bench_main(cli, ["test"])
    assert (config.parent / "nerfstudio_models" / "step-000000030.ckpt").is_file()


def test_bench_dataset_mode_bad_inputs(tmp_path, capsys):
    config = str(tmp_path / "config.yml")
    assert "either --load-config" in _cli_error(["--load-config", config, "--data", str(tmp_path)], capsys)
    assert "either --load-config" in _cli_error([], capsys)
    assert "dataset folder not found" in _cli_error(["--data", str(tmp_path / "none")], capsys)
    assert "neither transforms.json" in _cli_error(["--data", str(tmp_path)], capsys)
    assert "unknown training preset 'huge'" in _cli_error(["--data", str(tmp_path), "--train-preset", "huge"], capsys)


# ----------------------------------------------------------------------------------------------------------
# merging results folders (methods run in separate processes)
# ----------------------------------------------------------------------------------------------------------


def _results_folder(folder: Path, method: str, errors, init_rot=(10.0, 20.0), load_config="run/config.yml"):
    """A results folder as gsloc-bench writes it: one query, one trial per initial angle."""
    from nerfstudio_gsloc.scripts.bench_outputs import write_outputs

    protocol = load_protocol("inerf", trials=len(errors))
    records = [report.TrialRecord(method, "q0", 0, t, 100 + t, init_rot[t], 0.1, init_rot[t], rot, trans, 2.0, 5,
                                  "converged", "", False, False) for t, (rot, trans) in enumerate(errors)]
    meta = {"load_config": load_config, "queries": QuerySource.eval_split().to_json(), "num_queries": 1, "methods": [method],
            "protocol": protocol.to_dict(), "protocol_summary": protocol.summary(1.0), "camera_scale": 1.0,
            "machine_line": "test machine", "command": f"gsloc-bench --methods {method}",
            "method_seconds": {method: 4.0}}
    write_outputs(folder, [method], records, protocol, meta)


def test_merge_combines_methods_run_apart_into_one_table(tmp_path, capsys):
    from nerfstudio_gsloc.scripts.bench_outputs import merge_results

    _results_folder(tmp_path / "a", "pnp", [(0.1, 0.002), (0.2, 0.004)])
    _results_folder(tmp_path / "b", "gsloc", [(0.01, 0.0005), (9.0, 0.3)])
    rows = merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    assert [r["method"] for r in rows] == ["gsloc", "pnp"]  # the harness's method order
    assert rows[0]["success_5deg_0.05"] == pytest.approx(0.5) and rows[1]["success_5deg_0.05"] == 1.0
    merged = report.read_trials_jsonl(tmp_path / "all" / "trials.jsonl")
    assert sorted(r.method for r in merged) == ["gsloc", "gsloc", "pnp", "pnp"]
    md = (tmp_path / "all" / "results.md").read_text()
    assert "merged from" in md and "gsloc-bench --methods pnp" in md and "gsloc does NOT beat pnp" in md
    meta = json.loads((tmp_path / "all" / "bench.json").read_text())
    assert meta["methods"] == ["gsloc", "pnp"] and meta["method_seconds"] == {"pnp": 4.0, "gsloc": 4.0}
    assert (tmp_path / "all" / "error_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_refuses_results_that_are_not_the_same_trials(tmp_path, capsys):
    _results_folder(tmp_path / "a", "pnp", [(0.1, 0.002), (0.2, 0.004)])
    _results_folder(tmp_path / "same-method", "pnp", [(0.1, 0.002), (0.2, 0.004)])
    _results_folder(tmp_path / "other-start", "gsloc", [(0.1, 0.002), (0.2, 0.004)], init_rot=(10.0, 21.0))
    _results_folder(tmp_path / "other-run", "gsloc", [(0.1, 0.002), (0.2, 0.004)], load_config="other/config.yml")
    out = str(tmp_path / "all")

    def merge_error(*folders) -> str:
        return _cli_error(["--merge", *[str(tmp_path / f) for f in folders], "--output-dir", out], capsys)

    assert "more than one of the folders" in merge_error("a", "same-method")
    assert "started from another pose" in merge_error("a", "other-start")
    assert "different load_config" in merge_error("a", "other-run")
    assert "not a finished gsloc-bench results folder" in merge_error("a", "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "bench.json").write_text('{"methods": ["gsloc"]}')
    (tmp_path / "foreign" / "trials.jsonl").write_text("")
    assert "bench.json lacks load_config" in merge_error("a", "foreign")
    assert "at least two" in merge_error("a")
    assert "takes no --load-config" in _cli_error(["--merge", str(tmp_path / "a"), str(tmp_path / "a"),
                                                   "--load-config", "x.yml"], capsys)
    assert not Path(out).exists()
