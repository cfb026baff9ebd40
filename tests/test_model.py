"""`ns-train gsloc` end to end on the embedded scene: training, reloading, outputs, depth, nerfstudio tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nerfstudio_gsloc.data.depth import GSLocDataParserConfig, load_scene_depth
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.model import GSLocModel, lpips_weights_available
from nerfstudio_gsloc.runs import load_run

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def loaded_run(small_gsloc_run):
    return load_run(small_gsloc_run)


def test_trained_run_reloads_and_renders_rgb_depth_alpha(loaded_run):
    config, pipeline = loaded_run
    model = pipeline.model
    assert isinstance(model, GSLocModel) and model.num_points > 1000
    dataset = pipeline.datamanager.train_dataset
    psnrs, depth_errors = [], []
    for idx in range(0, len(dataset), 6):
        camera = dataset.cameras[idx : idx + 1]
        with torch.no_grad():
            out = model.get_outputs_for_camera(camera)
        height, width = int(camera.height), int(camera.width)
        assert out["rgb"].shape == (height, width, 3)
        assert out["depth"].shape == (height, width, 1) and out["accumulation"].shape == (height, width, 1)
        gt = dataset.get_image_float32(idx)
        psnrs.append(-10 * torch.log10(((out["rgb"] - gt) ** 2).mean()))
        gt_depth = load_scene_depth(dataset._dataparser_outputs, idx, height, width)
        covered = (out["accumulation"] > 0.95) & (gt_depth > 0)
        depth_errors.append(((out["depth"] - gt_depth).abs() / gt_depth)[covered].median())
    # a few hundred CPU iterations on 80x60 views: the scene is learned, not memorised noise
    assert torch.stack(psnrs).mean() > 20.0, psnrs
    # expected depth agrees with the ray-cast depth within a few percent (the depth loss and seeding work)
    assert torch.stack(depth_errors).median() < 0.05, depth_errors


def test_a_training_step_draws_depth_only_for_a_depth_loss(loaded_run, monkeypatch):
    """The room has depth images, so its training renders depth for the depth loss; a scene without them renders
    colour only, with the same colours (one channel less to composite)."""
    _, pipeline = loaded_run
    model = pipeline.model
    assert model.trains_on_depth
    camera = pipeline.datamanager.train_dataset.cameras[0:1]
    monkeypatch.setattr(model, "optimizers", {}, raising=False)  # the trainer's callback sets them in ns-train
    monkeypatch.setattr(model, "_get_background_color", lambda: torch.tensor([0.2, 0.5, 0.7]))  # not random
    model.train()
    try:  # with autograd, as in training (densification retains the 2D means' gradient)
        with_depth = model.get_outputs(camera)
        model.trains_on_depth = False
        without = model.get_outputs(camera)
    finally:
        model.trains_on_depth = True
        model.eval()
    assert "depth" in with_depth and "depth" not in without
    assert torch.equal(with_depth["rgb"], without["rgb"]) and torch.equal(with_depth["accumulation"], without["accumulation"])
    with torch.no_grad():
        assert "depth" in model.get_outputs(camera)  # outside training (viewer, ns-render, eval) depth is always drawn


def test_the_training_loss_ssim_is_fused_and_equals_pytorch_msssim(loaded_run, monkeypatch, counting_extension):
    """splatfacto's loss calls ``self.ssim``: in a gsloc model that is FusedSSIM, whose kernel computes the loss's
    SSIM term; the loss and its gradient into the Gaussians are pytorch_msssim's to float rounding."""
    from pytorch_msssim import SSIM

    import nerfstudio_gsloc.fused_ssim as fused_ssim

    _, pipeline = loaded_run
    model = pipeline.model
    monkeypatch.setattr(fused_ssim, "load_cpu_extension", lambda: counting_extension)
    monkeypatch.setattr(model, "optimizers", {}, raising=False)
    monkeypatch.setattr(model, "_get_background_color", lambda: torch.tensor([0.2, 0.5, 0.7]))
    camera, batch = pipeline.datamanager.next_train(0)
    results = []
    fused = model.ssim
    assert isinstance(fused, fused_ssim.FusedSSIM)
    model.train()
    try:
        for ssim_module in (fused, SSIM(data_range=1.0, size_average=True, channel=3)):
            model.ssim = ssim_module
            model.zero_grad()
            loss = model.get_loss_dict(model.get_outputs(camera), batch)["main_loss"]
            loss.backward()
            results.append((loss.detach(), model.means.grad.clone()))
    finally:
        model.ssim = fused
        model.zero_grad()
        model.eval()
    assert counting_extension.calls == ["ssim_forward", "ssim_backward"]
    (fused_loss, fused_grad), (reference_loss, reference_grad) = results
    torch.testing.assert_close(fused_loss, reference_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_grad, reference_grad, atol=1e-6 * reference_grad.abs().max(), rtol=1e-4)


def test_image_metrics_skip_lpips_without_local_weights(loaded_run):
    _, pipeline = loaded_run
    camera, batch = pipeline.datamanager.next_eval_image(0)
    with torch.no_grad():
        outputs = pipeline.model.get_outputs_for_camera(camera)
    metrics, images = pipeline.model.get_image_metrics_and_images(outputs, batch)
    assert metrics["psnr"] > 15 and 0 < metrics["ssim"] <= 1
    assert ("lpips" in metrics) == lpips_weights_available()
    assert images["img"].shape[1] == 2 * outputs["rgb"].shape[1]


def test_checkpoint_keeps_splatfacto_layout(small_gsloc_run):
    checkpoint = next((small_gsloc_run.parent / "nerfstudio_models").glob("*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu")  # torch's safe loader, with the plugin's allow-list
    names = {k.split("gauss_params.")[-1] for k in state["pipeline"] if "gauss_params" in k}
    assert names == {"means", "scales", "quats", "features_dc", "features_rest", "opacities"}


def test_depth_seeding_backprojects_consistent_points(embedded_scene):
    outputs = GSLocDataParserConfig(data=embedded_scene, depth_seed_points=5000).setup().get_dataparser_outputs("train")
    xyz = outputs.metadata["points3D_xyz"]
    assert 4000 <= len(xyz) <= 5000 and outputs.metadata["points3D_rgb"].dtype == torch.uint8
    # project the points into training view 0 with its pose: visible points land at their depth or behind the surface
    from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c

    cams = outputs.cameras
    w2c = opengl_c2w_to_opencv_w2c(cams.camera_to_worlds[0])
    cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    u = cams.fx[0] * cam[:, 0] / cam[:, 2] + cams.cx[0]
    v = cams.fy[0] * cam[:, 1] / cam[:, 2] + cams.cy[0]
    width, height = int(cams.width[0]), int(cams.height[0])
    inside = (cam[:, 2] > 0.05) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    depth = load_scene_depth(outputs, 0, height, width)[..., 0]
    surface = depth[v[inside].long(), u[inside].long()]
    z = cam[inside, 2]
    assert inside.sum() > 200
    # seed points seen by this camera lie on its depth surface or behind it (occluded); only points on
    # silhouettes, where a pixel mixes object and background, may fall in front
    ratio = z / surface.clamp_min(1e-6)
    assert (ratio >= 0.97).float().mean() > 0.9
    assert (ratio.median() - 1.0).abs() < 0.02


def test_cuda_request_without_gpu_is_a_clear_error(loaded_run):
    _, pipeline = loaded_run
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: moving to CUDA is legitimate here")
    with pytest.raises(GslocError, match="CUDA was requested"):
        pipeline.model.to("cuda")


def _run(args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_ns_train_bad_data_is_one_line_error(tmp_path, case):
    data = tmp_path / "dataset"
    if case == "empty":
        data.mkdir()
        (data / "transforms.json").write_text('{"frames": []}')
    result = _run([str(VENV_BIN / "ns-train"), "gsloc", "--data", str(data), "--vis", "tensorboard", "--output-dir", str(tmp_path / "outputs")])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and ("does not exist" in last or "lists no images" in last)
    assert "Traceback" not in result.stderr
    # ns-train wrote <output>/<dataset>/gsloc/<timestamp>/config.yml before the data failed: it is removed again.
    assert not (tmp_path / "outputs" / "dataset").exists()


def test_ns_export_gaussian_splat_on_a_gsloc_run(small_gsloc_run, tmp_path):
    result = _run([str(VENV_BIN / "ns-export"), "gaussian-splat", "--load-config", str(small_gsloc_run), "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    ply = tmp_path / "splat.ply"
    assert ply.is_file() and ply.stat().st_size > 10_000


def test_each_gaussian_parameter_owns_its_memory():
    """A model seeded with colours: every Gaussian parameter is contiguous and shares memory with no other, so an
    optimizer that writes a parameter as flat memory updates that parameter only. (features_dc and features_rest
    were views of one tensor; torch's fused CPU Adam, which ignores strides, spilled features_dc's updates into
    features_rest: fox lost 2 dB.)"""
    from nerfstudio.data.scene_box import SceneBox

    from nerfstudio_gsloc.method import gsloc_trainer_config

    generator = torch.Generator().manual_seed(0)
    seed_points = (torch.rand(50, 3, generator=generator), torch.randint(0, 256, (50, 3), generator=generator).to(torch.uint8))
    model = gsloc_trainer_config(100).pipeline.model.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])),
                                                           num_train_data=2, seed_points=seed_points)
    params = dict(model.gauss_params.items())
    assert all(p.is_contiguous() for p in params.values())
    assert len({p.untyped_storage().data_ptr() for p in params.values()}) == len(params)
    before = {name: p.detach().clone() for name, p in params.items()}
    params["features_dc"].grad = torch.randn(params["features_dc"].shape, generator=generator)
    torch.optim.Adam([params["features_dc"]], lr=0.01, fused=True).step()
    assert (params["features_dc"] - before["features_dc"]).abs().min() > 0.0  # Adam's first step: lr on each
    for name in params:
        if name != "features_dc":
            assert torch.equal(params[name].detach(), before[name]), name
