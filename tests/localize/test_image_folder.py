"""Drop-in photos (`ns-localize --images DIR`): intrinsics, bad inputs, and the same poses as a transforms.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.image_folder import AssumedCamera, load_image_folder_queries
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.poses_file import read_poses

from cli_helpers import run_ns_localize

CAMERA = AssumedCamera(50.0, 50.0, 32.0, 24.0, 64, 48, "the run's training camera")


def _png(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(height, width, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


_run = run_ns_localize


def test_intrinsics_scale_with_the_image_and_overrides_win(tmp_path):
    _png(tmp_path / "b.png", 32, 24)
    _png(tmp_path / "a.jpg", 128, 96)
    queries = load_image_folder_queries(tmp_path, CAMERA)
    assert [q.name for q in queries] == ["a.jpg", "b.png"] and [q.index for q in queries] == [0, 1]
    assert queries[0].prior_c2w is None and queries[0].gt_c2w is None
    torch.testing.assert_close(queries[0].K, torch.tensor([[100.0, 0, 64], [0, 100, 48], [0, 0, 1]]))
    torch.testing.assert_close(queries[1].K, torch.tensor([[25.0, 0, 16], [0, 25, 12], [0, 0, 1]]))
    assert queries[1].image.shape == (24, 32, 3) and queries[1].width == 32 and queries[1].height == 24
    # --intrinsics: as given, for every image.
    given = load_image_folder_queries(tmp_path, CAMERA, intrinsics=(40.0, 41.0, 16.0, 12.0))
    torch.testing.assert_close(given[1].K, torch.tensor([[40.0, 0, 16], [0, 41, 12], [0, 0, 1]]))
    # DIR/transforms.json's camera wins over the run's.
    (tmp_path / "transforms.json").write_text(json.dumps({"fl_x": 80, "fl_y": 80, "cx": 16, "cy": 12, "w": 32, "h": 24}))
    folder = load_image_folder_queries(tmp_path, CAMERA)
    assert len(folder) == 2  # transforms.json is not a query
    torch.testing.assert_close(folder[0].K, torch.tensor([[320.0, 0, 64], [0, 320, 48], [0, 0, 1]]))
    # RGBA: composited onto white, alpha becomes the mask.
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    _png(rgba / "c.png", 64, 48, "RGBA")
    query = load_image_folder_queries(rgba, CAMERA)[0]
    assert query.mask is not None and query.background is not None


@pytest.mark.parametrize("case, message", [
    ("missing", "not a folder"),
    ("empty", "the folder has no images"),
    ("gif_extension", "unsupported format '.gif'"),
    ("gif_content", "unsupported format GIF"),
    ("corrupt", "cannot read image"),
    ("aspect", "aspect 1.000"),
    ("principal_point", "outside the 64x48 image"),
    ("bad_intrinsics", "fx and fy must be positive"),
])
def test_bad_image_folders_are_one_line_errors(tmp_path, case, message):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "good.png", 64, 48)
    intrinsics = None
    if case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "empty":
        (folder / "good.png").unlink()
        (folder / ".hidden").write_text("skipped")
    elif case == "gif_extension":
        Image.new("RGB", (64, 48)).save(folder / "anim.gif")
    elif case == "gif_content":
        Image.new("RGB", (64, 48)).save(folder / "fake.png", format="GIF")
    elif case == "corrupt":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case == "aspect":
        _png(folder / "square.png", 48, 48)
    elif case == "principal_point":
        intrinsics = (50.0, 50.0, 100.0, 24.0)
    elif case == "bad_intrinsics":
        intrinsics = (0.0, 50.0, 32.0, 24.0)
    with pytest.raises(GslocError, match=message) as info:
        load_image_folder_queries(folder, CAMERA, intrinsics)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, embedded_scene, write_fake_run):
    frame = {"transform": np.eye(4)[:3].tolist(), "scale": 0.5}
    return write_fake_run(tmp_path_factory.mktemp("fake_run"), Path(embedded_scene.dataset).parent, frame)


@pytest.mark.parametrize("case, message", [
    ("empty", "the folder has no images"),
    ("corrupt", "cannot read image"),
    ("both_sources", "either --queries"),
    ("intrinsics_alone", "--intrinsics applies to --images only"),
    ("perturb", "needs a ground-truth pose"),
])
def test_cli_rejects_bad_image_folders_before_loading(tmp_path, capsys, fake_run, case, message):
    folder = tmp_path / "photos"
    folder.mkdir()
    if case == "corrupt":
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    elif case != "empty":
        _png(folder / "a.png", 64, 48)
    extra = ["--images", folder]
    if case == "both_sources":
        extra += ["--queries", tmp_path / "transforms.json"]
    elif case == "intrinsics_alone":
        extra = ["--intrinsics", "50", "50", "32", "24"]
    elif case == "perturb":
        extra += ["--init", "perturb"]
    out_dir = tmp_path / "out"
    code, _, err = _run(["--load-config", fake_run, "--output-dir", out_dir, *extra], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out_dir.exists()


def test_a_folder_of_pngs_gives_the_poses_of_the_equivalent_transforms_json(tmp_path, capsys, small_gsloc_run,
                                                                           embedded_scene):
    """Same images, same (scaled training) camera: --images and --queries give the same poses, near the truth."""
    meta = json.loads(Path(embedded_scene.queries).read_text())
    scene = json.loads(Path(embedded_scene.dataset).read_text())
    folder = tmp_path / "photos"
    folder.mkdir()
    frames = []
    for i, frame in enumerate(meta["frames"]):
        name = f"photo_{i}.png"
        source = Path(embedded_scene.queries).parent / frame["file_path"]
        Image.open(source).convert("RGB").save(folder / name)  # plain PNG, no depth, no poses
        frames.append({"file_path": str(folder / name)})
    width, height = Image.open(folder / "photo_0.png").size
    sx, sy = width / scene["w"], height / scene["h"]
    camera = {"fl_x": scene["fl_x"] * sx, "fl_y": scene["fl_y"] * sy, "cx": scene["cx"] * sx, "cy": scene["cy"] * sy,
              "w": width, "h": height}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "transforms.json").write_text(json.dumps({**camera, "frames": frames}))
    common = ["--load-config", small_gsloc_run, "--method", "pnp", "--num-threads", "1"]
    code, out, err = _run([*common, "--images", folder, "--output-dir", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "with pnp from retrieval poses" in out
    code, _, err = _run([*common, "--queries", tmp_path / "q" / "transforms.json", "--init", "retrieval",
                         "--output-dir", tmp_path / "b"], capsys)
    assert code == 0, err
    images, listed = read_poses(tmp_path / "a" / "poses.json"), read_poses(tmp_path / "b" / "poses.json")
    assert images.queries.kind == "images" and images.settings["init"] == "retrieval"
    assert len(images.records) == len(listed.records) == len(frames)
    close = 0
    for a, b, frame in zip(images.records, listed.records, meta["frames"]):
        assert a.status == b.status and (a.c2w is None) == (b.c2w is None)
        if a.c2w is None:
            assert "retrieval" in a.reason or "PnP" in a.reason or "matches" in a.reason
            continue
        torch.testing.assert_close(a.c2w, b.c2w, atol=1e-5, rtol=0)
        truth = torch.tensor(frame["transform_matrix"], dtype=torch.float64)[None]  # original frame, as poses.json
        rot = rotation_error_deg(a.c2w[None].double(), truth).item()
        trans = translation_error(a.c2w[None].double(), truth).item()
        close += rot < 5.0 and trans < 0.3
    assert close >= 2, "retrieval + PnP placed fewer than 2 of the 3 never-trained views near the truth"
    shutil.rmtree(folder)
