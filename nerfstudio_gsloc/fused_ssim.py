"""The SSIM of ``ns-train gsloc``'s loss and metrics: pytorch_msssim's SSIM, fused into one C++ pass on the CPU.

:class:`FusedSSIM` is a drop-in for ``pytorch_msssim.SSIM`` (the module splatfacto's ``get_loss_dict`` calls as
``self.ssim(gt, pred)``): the same Gaussian window, constants and "valid" filtering, so the same value to float
rounding. When the photo ``X`` needs no gradient and both images are contiguous-able float32 CPU tensors
``[N, C, H, W]`` at least as large as the window, the value and the gradient with respect to the render ``Y``
come from the kernels ``ssim_forward`` / ``ssim_backward`` (``rendering/csrc/ssim_cpu.cpp``). Anything else (CUDA,
float64, a photo that needs a gradient, images smaller than the window, ``nonnegative_ssim``, no compiler) is
computed by ``pytorch_msssim.ssim`` itself, unchanged.

Why: pytorch_msssim filters five images with two depthwise convolutions each and autograd keeps the
intermediate maps; on a 3 x 200 x 200 lego view its forward + backward took about 12 ms, a sixth of a training
step on one thread (README, issue 13).
"""

from __future__ import annotations

import torch
from pytorch_msssim import SSIM, ssim

from nerfstudio_gsloc.rendering.extension import load_cpu_extension


class _FusedSSIMFunction(torch.autograd.Function):
    """SSIM per image and channel ``[N, C]`` of ``X`` against ``Y``; the gradient flows to ``Y`` only."""

    @staticmethod
    def forward(ctx, X: torch.Tensor, Y: torch.Tensor, win: torch.Tensor, c1: float, c2: float, extension) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[1]
        result, d_mu, d_yy, d_xy = extension.ssim_forward(X, Y, win, c1, c2, need_grad)
        ctx.extension = extension
        if need_grad:
            ctx.save_for_backward(X, Y, win, d_mu, d_yy, d_xy)
        return result

    @staticmethod
    def backward(ctx, v_result: torch.Tensor):
        X, Y, win, d_mu, d_yy, d_xy = ctx.saved_tensors
        v_Y = ctx.extension.ssim_backward(X, Y, win, d_mu, d_yy, d_xy, v_result.contiguous())
        return None, v_Y, None, None, None, None


class FusedSSIM(SSIM):
    """``pytorch_msssim.SSIM`` for 4-D images, with a fused CPU path (see the module docstring)."""

    def _fused_path_applies(self, X: torch.Tensor, Y: torch.Tensor) -> bool:
        window = self.win.shape[-1]
        return (X.dim() == 4 and X.shape == Y.shape and X.device.type == "cpu" and Y.device.type == "cpu"
                and X.dtype == torch.float32 and Y.dtype == torch.float32
                and not (torch.is_grad_enabled() and X.requires_grad) and not self.nonnegative_ssim
                and X.shape[-1] >= window and X.shape[-2] >= window and self.win.shape[0] == X.shape[1])

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        # the eligibility test first: on a GPU the CPU extension is never built for this
        extension = load_cpu_extension() if self._fused_path_applies(X, Y) else None
        if extension is None:
            return ssim(X, Y, data_range=self.data_range, size_average=self.size_average, win=self.win, K=self.K,
                        nonnegative_ssim=self.nonnegative_ssim)
        k1, k2 = self.K
        c1, c2 = (k1 * self.data_range) ** 2, (k2 * self.data_range) ** 2
        win = self.win[0].reshape(-1).to(torch.float32).contiguous()  # the same 1-D window for every channel
        per_channel = _FusedSSIMFunction.apply(X.contiguous(), Y.contiguous(), win, float(c1), float(c2), extension)
        return per_channel.mean() if self.size_average else per_channel.mean(1)
