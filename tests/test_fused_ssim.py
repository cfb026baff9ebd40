"""FusedSSIM, the SSIM of ns-train gsloc's loss: pytorch_msssim's value and gradient from one C++ pass."""

from __future__ import annotations

import pytest
import torch
from pytorch_msssim import SSIM

import nerfstudio_gsloc.fused_ssim as fused_ssim
from nerfstudio_gsloc.fused_ssim import FusedSSIM
from nerfstudio_gsloc.rendering.extension import load_cpu_extension

needs_kernel = pytest.mark.skipif(load_cpu_extension() is None, reason="the C++ extension could not be built here")


def _photo_and_render(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    photo = torch.rand(shape, generator=generator)
    render = (photo + 0.2 * torch.randn(shape, generator=generator)).clamp(0, 1)  # an imperfect render of it
    return photo, render


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 3, 200, 200), (2, 3, 37, 61), (1, 3, 11, 11), (1, 1, 24, 13)])
@pytest.mark.parametrize("size_average", [True, False])
def test_value_and_gradient_match_pytorch_msssim(shape, size_average, monkeypatch, counting_extension):
    """Batches, odd and window-sized images, one channel, per-image results: the fused value and its gradient with
    respect to the render agree with pytorch_msssim's to float rounding, and the kernel computed them."""
    monkeypatch.setattr(fused_ssim, "load_cpu_extension", lambda: counting_extension)
    photo, render = _photo_and_render(shape)
    reference = SSIM(data_range=1.0, size_average=size_average, channel=shape[1])
    fused = FusedSSIM(data_range=1.0, size_average=size_average, channel=shape[1])
    ref_render, our_render = render.clone().requires_grad_(True), render.clone().requires_grad_(True)
    expected, ours = reference(photo, ref_render), fused(photo, our_render)
    weights = torch.linspace(0.5, 1.5, expected.numel()).reshape(expected.shape)  # different per image
    (weights * expected).sum().backward()
    (weights * ours).sum().backward()
    assert counting_extension.calls == ["ssim_forward", "ssim_backward"]
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    scale = ref_render.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(our_render.grad, ref_render.grad, atol=1e-5 * scale, rtol=1e-4)


@needs_kernel
def test_permuted_images_as_splatfacto_passes_them():
    """splatfacto hands the loss [H, W, 3] images permuted to [1, 3, H, W] (not contiguous)."""
    photo, render = _photo_and_render((40, 30, 3), seed=1)
    render.requires_grad_(True)
    ours = FusedSSIM(data_range=1.0, channel=3)(photo.permute(2, 0, 1)[None], render.permute(2, 0, 1)[None])
    ours.backward()
    reference_render = render.detach().clone().requires_grad_(True)
    expected = SSIM(data_range=1.0, channel=3)(photo.permute(2, 0, 1)[None], reference_render.permute(2, 0, 1)[None])
    expected.backward()
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(render.grad, reference_render.grad, atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("case", ["photo_needs_grad", "float64", "smaller_than_window", "nonnegative"])
def test_what_the_kernel_does_not_take_is_pytorch_msssim_unchanged(case, monkeypatch):
    """A photo that needs a gradient, float64, an image smaller than the window (pytorch_msssim skips that axis)
    and nonnegative_ssim go to pytorch_msssim: the same value and gradients bit for bit, and the extension is
    never loaded for them."""

    def no_extension():
        raise AssertionError("the extension was loaded for a case it does not take")

    monkeypatch.setattr(fused_ssim, "load_cpu_extension", no_extension)
    shape = (1, 3, 9, 30) if case == "smaller_than_window" else (1, 3, 24, 24)
    photo, render = _photo_and_render(shape, seed=2)
    if case == "float64":
        photo, render = photo.double(), render.double()
    kwargs = {"nonnegative_ssim": True} if case == "nonnegative" else {}
    results = []
    for module in (SSIM(data_range=1.0, channel=3, **kwargs), FusedSSIM(data_range=1.0, channel=3, **kwargs)):
        x = photo.clone().requires_grad_(case == "photo_needs_grad")
        y = render.clone().requires_grad_(True)
        value = module(x, y)
        value.backward()
        results.append((value, x.grad, y.grad))
    (v0, gx0, gy0), (v1, gx1, gy1) = results
    assert torch.equal(v0, v1) and torch.equal(gy0, gy1)
    assert (gx0 is None and gx1 is None) or torch.equal(gx0, gx1)
