"""GaussianAdam, the optimizer of ns-train gsloc's Gaussians: plain Adam's updates from a one-pass C++ kernel."""

from __future__ import annotations

import pytest
import torch
from gsplat.strategy import ops

import nerfstudio_gsloc.gaussian_adam as gaussian_adam
from nerfstudio_gsloc.gaussian_adam import GaussianAdam
from nerfstudio_gsloc.method import gsloc_method
from nerfstudio_gsloc.rendering.extension import load_cpu_extension

needs_kernel = pytest.mark.skipif(load_cpu_extension() is None, reason="the C++ extension could not be built here")


def _gaussians(generator: torch.Generator) -> dict:
    n = 400
    return {
        "means": torch.nn.Parameter(torch.randn(n, 3, generator=generator)),
        "features_rest": torch.nn.Parameter(torch.randn(n, 15, 3, generator=generator)),
        "opacities": torch.nn.Parameter(torch.randn(n, generator=generator)),
    }


@needs_kernel
def test_the_kernel_steps_like_plain_adam_through_densification(monkeypatch, counting_extension):
    """Two copies of some Gaussians, one optimised by torch.optim.Adam and one by GaussianAdam, through 120 steps
    with a learning-rate decay, gradients that are zero on some rows or absent, and gsplat's densification (which
    rewrites the optimizer state): the parameters and the state agree to float rounding, and every step of
    GaussianAdam went through the kernel."""
    monkeypatch.setattr(gaussian_adam, "load_cpu_extension", lambda: counting_extension)
    generator = torch.Generator().manual_seed(0)
    plain = _gaussians(generator)
    ours = {k: torch.nn.Parameter(v.detach().clone()) for k, v in plain.items()}
    lrs = {"means": 1.6e-4, "features_rest": 1.25e-4, "opacities": 0.05}
    plain_opt = {k: torch.optim.Adam([p], lr=lrs[k], eps=1e-15) for k, p in plain.items()}
    our_opt = {k: GaussianAdam([p], lr=lrs[k], eps=1e-15) for k, p in ours.items()}
    state = {}
    kernel_steps = 0
    for step in range(120):
        for name in plain:
            if name == "features_rest" and step < 30:  # no gradient yet (SH degree 0)
                plain[name].grad = ours[name].grad = None
                continue
            grad = torch.randn(plain[name].shape, generator=generator) * (1e-6 if step % 5 == 0 else 0.1)
            grad[step % 7 :: 9] = 0.0  # Gaussians outside the view
            plain[name].grad, ours[name].grad = grad.clone(), grad.clone()
            kernel_steps += 1
        for name in plain:
            for opt in (plain_opt[name], our_opt[name]):
                opt.param_groups[0]["lr"] = lrs[name] * 0.99**step
                opt.step()
        if step in (40, 80):  # densification: clone some Gaussians, prune others
            n = plain["means"].shape[0]
            grow = torch.arange(n) % 5 == step % 5
            prune = torch.arange(n + int(grow.sum())) % 11 == 3
            for params, optimizers in ((plain, plain_opt), (ours, our_opt)):
                ops.duplicate(params, optimizers, state, grow)
                ops.remove(params, optimizers, state, prune)
    assert counting_extension.calls == ["adam_step"] * kernel_steps
    for name in plain:
        assert plain[name].shape == ours[name].shape
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=2e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(our_opt[name].state[ours[name]][key], plain_opt[name].state[plain[name]][key],
                                       rtol=1e-5, atol=1e-9)
        assert float(our_opt[name].state[ours[name]]["step"]) == float(plain_opt[name].state[plain[name]]["step"])


@pytest.mark.parametrize("case", ["non-contiguous", "weight decay", "float64"])
def test_what_the_kernel_cannot_step_is_plain_adam_exactly(monkeypatch, case):
    """... and the extension is not even loaded for it (a GPU user's parameters never build the CPU kernels)."""
    loads = []
    monkeypatch.setattr(gaussian_adam, "load_cpu_extension", lambda: loads.append(1))
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(5, 6, generator=generator, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "non-contiguous":  # a transposed view: torch's fused kernel would read it as flat memory
        plain, ours = torch.nn.Parameter(data.clone().t()), torch.nn.Parameter(data.clone().t())
        assert not ours.is_contiguous()
    else:
        plain, ours = torch.nn.Parameter(data.clone()), torch.nn.Parameter(data.clone())
    decay = 0.1 if case == "weight decay" else 0.0
    plain_opt = torch.optim.Adam([plain], lr=0.01, weight_decay=decay)
    our_opt = GaussianAdam([ours], lr=0.01, weight_decay=decay)
    for _ in range(5):
        grad = torch.randn(ours.shape, generator=generator, dtype=data.dtype)
        plain.grad, ours.grad = grad.clone(), grad.clone()
        plain_opt.step()
        our_opt.step()
    assert not loads
    assert torch.equal(ours, plain)


def test_ns_train_gsloc_optimises_the_gaussians_with_gaussian_adam():
    optimizers = gsloc_method.config.optimizers
    for name in ("means", "features_dc", "features_rest", "opacities", "scales", "quats"):
        optimizer = optimizers[name]["optimizer"].setup([torch.nn.Parameter(torch.zeros(3))])
        assert isinstance(optimizer, GaussianAdam), name
