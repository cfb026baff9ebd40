"""Tracking a sequence (issue 14): ``ns-localize --sequence`` on a generated camera path of the embedded scene, a
sequence with a jump that must be re-localized, the TUM file against poses.json, and the trajectory metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_c2w, to_homogeneous
from nerfstudio_gsloc.metrics import from_strict_json, relative_pose_errors, summarize_trajectory
from nerfstudio_gsloc.localize.sequence import EVENT_RELOCALIZED, constant_velocity
from nerfstudio_gsloc.tum_file import read_tum, tum_lines

#: Frames of the generated path (64 x 48, the trained scene's size), how many the CLI tracks, and the error bounds
#: of the small run (at 64 x 48 a pixel is about a degree).
PATH_FRAMES, FRAMES, WIDTH, HEIGHT = 12, 6, 64, 48
MAX_TRANS, MAX_ROT_DEG = 0.02, 1.0
#: At 64 x 48 a query has only about 50 map matches: a correct pose gets a confidence of 0.45 to 0.85.
THRESHOLD = 0.4
#: The small run's photometric optimum moves by about 5 mm and 0.2 deg from frame to frame (a pixel is a degree):
#: the tracker's correction limit of the 128 x 96 room (0.004, 0.3 deg) is scaled up accordingly. With the loss's
#: alpha threshold at 0.97 (fewer of this brief model's pixels count) a frame moved 12.3 mm from its prediction,
#: so 0.015 (0.012 before); the jump test's gap is 17 cm.
MAX_CORRECTION, MAX_CORRECTION_DEG = 0.015, 1.0


@pytest.fixture(scope="module")
def track_file(tmp_path_factory):
    from nerfstudio_gsloc.data.trajectory import write_trajectory

    return write_trajectory(tmp_path_factory.mktemp("track"), seed=0, num_frames=PATH_FRAMES, width=WIDTH,
                            height=HEIGHT, show_progress=False)


@pytest.fixture(scope="module")
def tracked(small_gsloc_run, track_file, tmp_path_factory):
    """``ns-localize --sequence`` on the first frames of the path (the fast preset for frame 0): (output folder,
    poses.json document)."""
    from nerfstudio_gsloc.poses_file import read_poses
    from nerfstudio_gsloc.scripts import localize

    out = tmp_path_factory.mktemp("tracked")
    localize.main(["--load-config", str(small_gsloc_run), "--queries", str(track_file), "--sequence", "--preset", "fast",
                   "--max-queries", str(FRAMES), "--output-dir", str(out), "--num-threads", "1", "--pnp.num-views", "6",
                   "--verification.threshold", str(THRESHOLD), "--sequence-settings.max-correction", str(MAX_CORRECTION),
                   "--sequence-settings.max-correction-deg", str(MAX_CORRECTION_DEG)])
    return out, read_poses(out / "poses.json")


def test_the_trajectory_is_smooth_deterministic_and_never_a_training_view(track_file, embedded_scene):
    from nerfstudio_gsloc.data.room_layout import build_scene
    from nerfstudio_gsloc.data.trajectory import motion_stats, trajectory_poses

    meta = json.loads(track_file.read_text())
    poses = np.array([f["transform_matrix"] for f in meta["frames"]])
    np.testing.assert_allclose(poses, trajectory_poses(build_scene(0), PATH_FRAMES, 0))
    assert not np.allclose(poses, trajectory_poses(build_scene(0), PATH_FRAMES, 1))
    stats = motion_stats(poses)
    assert 0.02 < stats["step_median_m"] < 0.03 and stats["step_max_m"] < 0.07 and stats["turn_max_deg"] < 5.0
    assert "prior_transform_matrix" in meta["frames"][0] and all("prior_transform_matrix" not in f for f in meta["frames"][1:])
    assert all((track_file.parent / f["depth_file_path"]).is_file() for f in meta["frames"])
    train = np.array([f["transform_matrix"] for f in json.loads(embedded_scene.dataset.read_text())["frames"]])
    assert np.linalg.norm(train[None, :, :3, 3] - poses[:, None, :3, 3], axis=-1).min() > 1e-3


def test_a_generated_sequence_is_tracked_end_to_end(tracked, track_file):
    out, document = tracked
    records = sorted(document.records, key=lambda r: r.index)
    assert [r.image for r in records] == [f"images/frame_{i:05d}.png" for i in range(FRAMES)]
    errors = np.array([r.errors(document.frame.scale) for r in records], dtype=np.float64)
    print("rot", errors[:, 0].round(3).tolist(), "trans", errors[:, 1].round(4).tolist())
    assert errors[:, 0].max() < MAX_ROT_DEG and errors[:, 1].max() < MAX_TRANS
    document_json = from_strict_json((out / "sequence.json").read_text())
    sequence = document_json["methods"]["gsloc"]
    assert sequence["num_frames"] == FRAMES and sequence["num_lost"] == 0 and sequence["ate_aligned"] is False
    assert sequence["events"] == ["initialized"] + ["tracked"] * (FRAMES - 1)
    # RGB-D frames of a capture with depth images: every pose ends aligned to them (localize/depth_registration.py),
    # and the default per-frame preset (auto) is sequence-rgbd: two LM steps, then the alignment, as close to the
    # truth as the full schedule's
    assert sequence["num_depth_aligned"] == FRAMES and all("depth ICP (overlap" in r.reason for r in records)
    assert document_json["sequence_preset"] == {"gsloc": "sequence-rgbd"}
    assert max(r.iterations for r in records[2:]) <= 2 and errors[:, 0].max() < 0.05 and errors[:, 1].max() < 0.001
    assert sequence["ate_rmse"] == pytest.approx(float(np.sqrt(np.mean(errors[:, 1] ** 2))), rel=1e-4)
    # Frame 0 starts from the file's prior, the others from the motion model (not from the ground truth).
    prior = torch.tensor(json.loads(track_file.read_text())["frames"][0]["prior_transform_matrix"], dtype=torch.float64)
    torch.testing.assert_close(records[0].c2w_init, prior, atol=1e-5, rtol=0)
    assert all(not torch.allclose(r.c2w_init, r.c2w_gt, atol=1e-4) for r in records)
    assert (out / "sequence.png").stat().st_size > 0


def test_the_tum_file_parses_and_matches_poses_json(tracked):
    out, document = tracked
    stamps, c2w = read_tum(out / "trajectory.tum")
    records = sorted(document.records, key=lambda r: r.index)
    assert len(stamps) == FRAMES and np.allclose(stamps, np.arange(FRAMES) / 30.0)
    lines = (out / "trajectory.tum").read_text().splitlines()
    assert lines[0].startswith("#") and all(len(line.split()) == 8 for line in lines[1:])
    for record, pose in zip(records, c2w):
        # A quaternion is an exact rotation; the float32 refined matrix is orthonormal to about 1e-6.
        torch.testing.assert_close(pose, to_homogeneous(record.c2w.double()), atol=1e-5, rtol=0)
    # The file holds OpenCV camera axes: its rotation's third column is the viewing direction (OpenGL's -z).
    first = [float(v) for v in lines[1].split()]
    from nerfstudio_gsloc.tum_file import quaternion_to_rotation

    view = quaternion_to_rotation(first[4:])[:, 2]
    np.testing.assert_allclose(view, -records[0].c2w[:3, 2].numpy(), atol=1e-6)
    gt_stamps, gt = read_tum(out / "trajectory_gt.tum")
    torch.testing.assert_close(gt, torch.stack([to_homogeneous(r.c2w_gt.double()) for r in records]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["sequence-lm", "sequence"])
def test_the_other_tracking_presets_keep_every_frame_within_bounds(small_gsloc_run, track_file, tmp_path, preset):
    """``--sequence-preset sequence-lm`` (Levenberg-Marquardt per frame) and ``sequence`` (20 small Adam steps, the
    preset of RGB frames) track the same frames: no frame lost, every pose within the bounds, each frame's steps
    those of the preset's solver, and every RGB-D frame aligned to the capture's depth images in the end."""
    from nerfstudio_gsloc.poses_file import read_poses
    from nerfstudio_gsloc.scripts import localize
    from nerfstudio_gsloc.scripts.localize_outputs import read_trace_csv

    localize.main(["--load-config", str(small_gsloc_run), "--queries", str(track_file), "--sequence", "--preset", "fast",
                   "--sequence-preset", preset, "--max-queries", str(FRAMES), "--output-dir", str(tmp_path),
                   "--num-threads", "1", "--pnp.num-views", "6", "--verification.threshold", str(THRESHOLD),
                   "--sequence-settings.max-correction", str(MAX_CORRECTION),
                   "--sequence-settings.max-correction-deg", str(MAX_CORRECTION_DEG)])
    document = read_poses(tmp_path / "poses.json")
    records = sorted(document.records, key=lambda r: r.index)
    errors = np.array([r.errors(document.frame.scale) for r in records], dtype=np.float64)
    print("rot", errors[:, 0].round(3).tolist(), "trans", errors[:, 1].round(4).tolist(), [r.reason[:40] for r in records])
    assert len(records) == FRAMES and errors[:, 0].max() < MAX_ROT_DEG and errors[:, 1].max() < MAX_TRANS
    document_json = from_strict_json((tmp_path / "sequence.json").read_text())
    sequence = document_json["methods"]["gsloc"]
    assert sequence["num_lost"] == 0
    assert document_json["sequence_preset"] == {"gsloc": preset}
    rows = [row for row in read_trace_csv(tmp_path / "trace.csv") if row["query"] == records[2].image]
    assert bool({row["event"] for row in rows} & {"lm_step"}) == (preset == "sequence-lm")  # the preset's solver
    assert sequence["num_depth_aligned"] == FRAMES


def test_auto_preset_is_sequence_rgbd_only_where_the_depth_alignment_sets_the_pose(small_gsloc_run, track_file):
    import dataclasses

    from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
    from nerfstudio_gsloc.localize.pipeline import PoseInversionConfig
    from nerfstudio_gsloc.localize.queries import load_transforms_queries
    from nerfstudio_gsloc.localize.sequence import choose_sequence_preset
    from nerfstudio_gsloc.runs import load_run

    _, pipeline = load_run(small_gsloc_run)
    frames = load_transforms_queries(track_file, run_frame_transform(small_gsloc_run), 3)
    gsloc = PoseInversionConfig()
    assert choose_sequence_preset("auto", "gsloc", frames, pipeline, gsloc)[0] == "sequence-rgbd"
    assert choose_sequence_preset("sequence-lm", "gsloc", frames, pipeline, gsloc)[0] == "sequence-lm"
    rgb = [dataclasses.replace(frame, depth=None) for frame in frames]
    assert choose_sequence_preset("auto", "gsloc", rgb, pipeline, gsloc) == ("sequence", "auto: frames without depth")
    assert choose_sequence_preset("auto", "depth", frames, pipeline, gsloc)[0] == "sequence"
    gsloc.depth_alignment.enabled = False
    assert choose_sequence_preset("auto", "gsloc", frames, pipeline, gsloc)[0] == "sequence"


def test_gsloc_bench_sequence_protocol_tracks_each_method_with_its_own_auto_preset(small_gsloc_run, track_file, tmp_path):
    """``gsloc-bench --protocol sequence --methods gsloc depth``: every method tracks the frames, gsloc with
    ``sequence-rgbd`` (RGB-D frames, depth images), depth with ``sequence``; sequence.json and results.md say so."""
    from nerfstudio_gsloc.localize.pipeline import load_preset
    from nerfstudio_gsloc.localize.registry import LocalizerSettings
    from nerfstudio_gsloc.localize.sequence import SequenceConfig
    from nerfstudio_gsloc.scripts.bench import BenchCLI, bench_main

    settings = LocalizerSettings(gsloc=load_preset("fast"))
    settings.pnp.num_views = 6
    settings.verification.threshold = THRESHOLD
    settings.single_loss.pyramid_iterations = (10, 10)  # depth's full schedule (frames 0 and 1): the harness, not accuracy
    cli = BenchCLI(load_config=small_gsloc_run, queries=track_file, output_dir=tmp_path, methods=("gsloc", "depth"),
                   protocol="sequence", max_queries=4, method_settings=settings,
                   sequence_settings=SequenceConfig(max_correction=MAX_CORRECTION, max_correction_deg=MAX_CORRECTION_DEG))
    bench_main(cli, ["test"])
    sequence = from_strict_json((tmp_path / "sequence.json").read_text())
    assert sequence["sequence_preset"] == {"gsloc": "sequence-rgbd", "depth": "sequence"}
    gsloc = sequence["methods"]["gsloc"]
    assert gsloc["num_frames"] == 4 and gsloc["num_lost"] == 0 and gsloc["num_depth_aligned"] == 4
    assert gsloc["ate_rmse"] < MAX_TRANS and sequence["methods"]["depth"]["num_frames"] == 4
    assert "`sequence-rgbd` preset for gsloc, `sequence` preset for depth" in (tmp_path / "results.md").read_text()


def test_a_jump_in_the_sequence_is_relocalized_and_the_track_recovers(small_gsloc_run, track_file):
    from nerfstudio_gsloc.localize.pipeline import load_preset
    from nerfstudio_gsloc.localize.frame_transform import run_frame_transform
    from nerfstudio_gsloc.localize.queries import load_transforms_queries
    from nerfstudio_gsloc.localize.registry import LocalizerSettings
    from nerfstudio_gsloc.localize.sequence import SequenceConfig, make_sequence_tracker
    from nerfstudio_gsloc.runs import load_run

    _, pipeline = load_run(small_gsloc_run)
    # Frames 3 to 8 removed: a jump of 17 cm and 7 degrees, more than a per-frame refinement can move.
    queries = load_transforms_queries(track_file, run_frame_transform(small_gsloc_run))
    queries = queries[:3] + queries[9:11]
    settings = LocalizerSettings(gsloc=load_preset("fast"))
    settings.pnp.num_views = 6
    settings.verification.threshold = THRESHOLD
    config = SequenceConfig(max_correction=MAX_CORRECTION, max_correction_deg=MAX_CORRECTION_DEG)
    tracker = make_sequence_tracker("gsloc", settings, load_preset("sequence", base=settings.gsloc), pipeline.model,
                                    pipeline, config=config)
    frames = tracker.track(queries, queries[0].prior_c2w)
    events = [f.event for f in frames]
    print(events, [f.attempts for f in frames])
    assert events == ["initialized", "tracked", "tracked", EVENT_RELOCALIZED, "tracked"]
    assert frames[3].attempts[0][0] == "motion model" and frames[3].attempts[0][1] < THRESHOLD
    assert frames[3].result.reason.startswith("relocalized (motion model: confidence")
    # After a re-localization no motion is known (the jump is none): the next frame starts from the re-localized pose
    # with the wide basin; the frame after it from the motion model again.
    torch.testing.assert_close(frames[4].predicted, frames[3].result.c2w)
    assert frames[4].attempts[0][0] == "previous pose" and frames[2].attempts[0][0] == "motion model"
    for frame, query in zip(frames, queries):
        rot = summarize_trajectory(frame.result.c2w[None], query.gt_c2w[None])
        assert rot["rot_rmse_deg"] < MAX_ROT_DEG and rot["ate_rmse"] < MAX_TRANS, (query.name, rot)


def test_constant_velocity_repeats_the_last_motion_and_rpe_measures_jitter():
    from kornia.geometry.conversions import axis_angle_to_rotation_matrix

    def pose(angle, x):
        c2w = torch.eye(4, dtype=torch.float64)
        c2w[:3, :3] = axis_angle_to_rotation_matrix(torch.tensor([[0.0, angle, 0.0]], dtype=torch.float64))[0]
        c2w[0, 3] = x
        return c2w[:3]

    # A camera turning 0.1 rad about its y axis and moving 0.2 along x per frame: the next pose repeats the motion.
    predicted = constant_velocity(pose(0.1, 0.2), pose(0.0, 0.0), pose(0.1, 0.2))
    step = torch.eye(4, dtype=torch.float64)
    step[:3] = pose(0.1, 0.2)
    torch.testing.assert_close(predicted, (step @ step)[:3])
    torch.testing.assert_close(constant_velocity(pose(0.3, 0.0), pose(0.1, 0.2), pose(0.1, 0.2)), pose(0.3, 0.0))
    # Float32 poses composed frame after frame stay rotations (their skew would grow by about 2.4 a frame).
    poses = [pose(0.0, 0.0).float(), pose(0.013, 0.02).float()]
    for _ in range(30):
        poses.append(constant_velocity(poses[-1], poses[-2], poses[-1]))
    rot = poses[-1][:, :3].double()
    assert (rot.T @ rot - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-5
    gt = torch.stack([pose(0.01 * i, 0.02 * i) for i in range(6)])
    shifted = gt.clone()
    shifted[:, 1, 3] += 0.5  # a constant offset: ATE sees it, RPE (frame to frame) does not
    rot, trans = relative_pose_errors(shifted, gt)
    assert trans.max() < 1e-12 and rot.max() < 1e-6
    jitter = gt.clone()
    jitter[::2, 2, 3] += 0.01
    assert relative_pose_errors(jitter, gt)[1].min() == pytest.approx(0.01)
    summary = summarize_trajectory(shifted, gt, lost=[False] * 5 + [True], relocalized=[True] + [False] * 5, seconds=[1.0] * 6)
    assert summary["ate_rmse"] == pytest.approx(0.5) and summary["num_lost"] == 1 and summary["num_relocalized"] == 1
    # A TUM line of a known pose: identity OpenGL pose = camera looking down -z = OpenCV rotation diag(1, -1, -1).
    line = tum_lines([0.0], [torch.eye(4)[:3]])[1].split()
    assert [float(v) for v in line[4:]] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(opengl_c2w_to_opencv_c2w(opengl_c2w_to_opencv_c2w(gt)), gt)


def test_the_sequence_protocol_draws_only_the_first_frames_start():
    from types import SimpleNamespace

    from nerfstudio_gsloc.evaluation.protocols import load_protocol
    from nerfstudio_gsloc.evaluation.trials import generate_trials

    protocol = load_protocol("sequence")
    assert protocol.is_sequence and protocol.has_prior and protocol.trials_per_query == 1
    gt = torch.eye(4)[:3]
    queries = [SimpleNamespace(name=f"f{i}", index=i, gt_c2w=gt) for i in range(3)]
    first = generate_trials(protocol, queries, 1.0)[0]
    assert first.init_rot_deg == pytest.approx(2.0, abs=1e-4) and first.init_trans == pytest.approx(0.02, abs=1e-6)


class _ReachLocalizer:
    """A stand-in localizer (no model): moves each start straight towards the query's true centre by at most
    ``reach`` per call; converged when it gets there, else stopped at the iteration limit; confident within 5 mm."""

    max_iterations = 10

    def __init__(self, reach: float) -> None:
        self.reach, self.calls, self.prepared = reach, 0, []

    def prepare(self, queries=None):
        self.prepared.append(len(queries))

    def localize(self, queries, starts):
        from nerfstudio_gsloc.localize.result import LocalizationResult

        self.calls += 1
        query, start = queries[0], starts[0][:3, :4].double()
        gap = query.gt_c2w[:3, 3].double() - start[:, 3]
        step = gap if gap.norm() <= self.reach else gap / gap.norm() * self.reach
        c2w = start.clone()
        c2w[:, 3] += step
        close = bool((c2w[:, 3] - query.gt_c2w[:3, 3].double()).norm() < 5e-3)
        status = ("converged" if step.norm() < self.reach else "max_iterations") if close else "rejected"
        return [LocalizationResult(query.name, query.index, c2w.float(), start.float(), status, iterations=10,
                                   confidence=1.0 if close else 0.0)]


def test_the_tracker_follows_an_acceleration_in_rounds_and_relocalizes_a_jump():
    from types import SimpleNamespace

    from nerfstudio_gsloc.localize.sequence import SequenceConfig, SequenceTracker

    # Centres along x: steps of 1 cm, then 1.6 cm (an acceleration of 6 mm, more than one round reaches), then a
    # 30 cm jump.
    xs = [0.0, 0.01, 0.02, 0.03, 0.046, 0.062, 0.362, 0.372, 0.382]
    queries = []
    for i, x in enumerate(xs):
        gt = torch.eye(4)[:3].clone()
        gt[0, 3] = x
        queries.append(SimpleNamespace(name=f"f{i}", index=i, gt_c2w=gt))
    tracker_loc, wide = _ReachLocalizer(0.0025), _ReachLocalizer(1.0)
    tracker = SequenceTracker(tracker_loc, wide, SequenceConfig(max_rounds=3, max_correction=0.01))
    frames = tracker.track(queries, queries[0].gt_c2w)
    assert wide.prepared == [len(queries)] and wide.calls >= 1  # the one-off work, once for the whole sequence
    events = [f.event for f in frames]
    assert events == ["initialized", "tracked", "tracked", "tracked", "tracked", "tracked", "relocalized", "tracked",
                      "tracked"]
    # Frame 4: the prediction is 6 mm short, three rounds of 2.5 mm reach it; frame 5 moves on at the new speed.
    assert frames[4].result.iterations == 30 and frames[5].result.iterations == 10
    assert frames[6].attempts[0][0].startswith("motion model") and frames[6].attempts[1][0] == "prediction"
    assert frames[7].attempts[0][0] == "previous pose" and frames[8].attempts[0][0] == "motion model"
    for frame, query in zip(frames, queries):
        assert float((frame.result.c2w[:, 3] - query.gt_c2w[:, 3]).norm()) < 1e-3


def test_tracked_frames_are_checked_against_the_map_views_near_their_prediction():
    from types import SimpleNamespace

    from nerfstudio_gsloc.localize.sequence import SequenceConfig, SequenceTracker

    class Recording(_ReachLocalizer):
        """Records the verifier's map-view hint at every call."""

        def __init__(self, reach, verifier):
            super().__init__(reach)
            self.verifier, self.hints = verifier, []

        def localize(self, queries, starts):
            hint = self.verifier.views_near
            self.hints.append(None if hint is None else hint.clone())
            return super().localize(queries, starts)

    xs = [0.0, 0.01, 0.02, 0.03, 0.33, 0.34]  # a 30 cm jump before frame 4: re-localized
    queries = []
    for i, x in enumerate(xs):
        gt = torch.eye(4)[:3].clone()
        gt[0, 3] = x
        queries.append(SimpleNamespace(name=f"f{i}", index=i, gt_c2w=gt))
    verifier = SimpleNamespace(views_near=None)
    tracker_loc, wide = Recording(0.0025, verifier), Recording(1.0, verifier)
    frames = SequenceTracker(tracker_loc, wide, SequenceConfig(max_correction=0.01)).track(queries, queries[0].gt_c2w)
    assert [f.event for f in frames] == ["initialized", "tracked", "tracked", "tracked", "relocalized", "tracked"]
    # the tracker's calls (frames 2, 3 and 4's refused attempt) saw their motion-model prediction; the wide basin's
    # (frames 0 and 1, 4's re-localization, 5 after it: no known motion) matched against every training view;
    # nothing is left set
    tracked_frames = [2, 3, 4]
    assert len(tracker_loc.hints) == len(tracked_frames)
    for hint, k in zip(tracker_loc.hints, tracked_frames):
        torch.testing.assert_close(hint, frames[k].predicted)
    assert wide.hints and all(h is None for h in wide.hints) and verifier.views_near is None
    # switched off: no hint at all
    verifier_off = SimpleNamespace(views_near=None)
    off = Recording(0.0025, verifier_off)
    SequenceTracker(off, Recording(1.0, verifier_off),
                    SequenceConfig(max_correction=0.01, map_views_from_prediction=False)).track(queries, queries[0].gt_c2w)
    assert off.hints and all(h is None for h in off.hints)
