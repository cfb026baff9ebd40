"""The optimizer of the Gaussians' parameters in ``ns-train gsloc``: Adam with a one-pass CPU step.

:class:`GaussianAdam` is ``torch.optim.Adam`` (same hyper-parameters, same state: ``step``, ``exp_avg``,
``exp_avg_sq``, so checkpoints, nerfstudio's optimizer code and gsplat's densification, which edits that state,
see no difference). On a contiguous float32 CPU parameter its step runs the C++ kernel ``adam_step``
(``rendering/csrc/adam_cpu.cpp``): the single-tensor update in one pass over the parameter's memory instead of
six. Anything else (CUDA, other dtypes, non-contiguous tensors, amsgrad, weight decay, no compiler) is handed to
``torch.optim.Adam.step`` unchanged.

Why not ``torch.optim.Adam(fused=True)``: its CPU kernel writes a parameter as flat memory whatever its strides
and, on lego, grew more Gaussians and lost 0.2-1.6 dB against plain Adam for reasons not found (README, issue 13).
This kernel follows plain Adam's arithmetic element by element, and the tests hold it to plain Adam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Type

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig

from nerfstudio_gsloc.rendering.extension import load_cpu_extension


def _kernel_can_step(group: dict, param: torch.Tensor) -> bool:
    """Whether ``adam_step`` computes what ``torch.optim.Adam`` would for this parameter of this group."""
    plain_group = not (group["amsgrad"] or group["weight_decay"] or group["maximize"] or group.get("capturable")
                       or group.get("differentiable") or group.get("fused") or group.get("foreach")
                       or isinstance(group["lr"], torch.Tensor))
    grad = param.grad
    return (plain_group and grad is not None and not grad.is_sparse and param.device.type == "cpu"
            and param.dtype == torch.float32 and grad.dtype == torch.float32
            and param.is_contiguous() and grad.is_contiguous())


class GaussianAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose step on contiguous float32 CPU parameters is one pass of a C++ kernel."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        params = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        # the eligibility test first: on a GPU the CPU extension is never built for this
        if closure is not None or not all(_kernel_can_step(g, p) for g, p in params):
            return super().step(closure)
        extension = load_cpu_extension()
        if extension is None:
            return super().step(closure)
        for group, param in params:
            state = self.state[param]
            if len(state) == 0:  # as torch.optim.Adam initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
                state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq = exp_avg.contiguous(), exp_avg_sq.contiguous()
            state["step"] += 1
            step = float(state["step"].item())
            beta1, beta2 = group["betas"]
            step_size = group["lr"] / (1.0 - beta1**step)
            bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
            extension.adam_step(param, param.grad, exp_avg, exp_avg_sq, beta1, beta2, group["eps"], step_size,
                                bias_correction2_sqrt)
        return None


@dataclass
class GaussianAdamConfig(AdamOptimizerConfig):
    """nerfstudio's Adam config, building :class:`GaussianAdam`."""

    _target: Type = GaussianAdam
