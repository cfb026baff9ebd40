"""Projection of 3D Gaussians to 2D image-space Gaussians: a differentiable PyTorch reference and a fused C++ path.

Follows the EWA splatting model used by gsplat 1.4 (pinhole cameras, OpenCV world-to-camera view
matrices): a Gaussian with mean ``mu`` and covariance ``Sigma = R S S^T R^T`` is moved into the camera
frame, and its 2D covariance is ``J W Sigma W^T J^T`` with ``J`` the Jacobian of the perspective
projection at the mean (clamped a little outside the field of view, as gsplat does, to stop Gaussians
near the image border from exploding).

:func:`project_gaussians` (with :func:`quat_scale_to_covariance`) is the readable PyTorch version, autograd
does its backward pass. :func:`project_gaussians_fused` computes the same from quaternions and scales in one
C++ pass (``csrc/project_cpu.cpp``) with a hand-written backward pass, tested against the PyTorch version;
likewise :func:`evaluate_sh_colors` and :func:`evaluate_sh_colors_fused` (``csrc/sh_cpu.cpp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nerfstudio_gsloc.rendering.extension import load_cpu_extension

# Gaussians whose alpha never reaches this value at any pixel are not drawn (same cut-off as the compositor).
ALPHA_THRESHOLD = 1.0 / 255.0


@dataclass
class ProjectedGaussians:
    """Per-camera 2D Gaussians. ``C`` cameras, ``N`` Gaussians.

    Attributes:
        means2d: ``[C, N, 2]`` pixel coordinates (pixel centres at +0.5).
        conics: ``[C, N, 3]`` upper triangle ``(a, b, c)`` of the inverse 2D covariance.
        depths: ``[C, N]`` z of the mean in the OpenCV camera frame.
        radii: ``[C, N]`` int32 pixel radius of the drawn footprint; 0 = culled.
        extents: ``[C, N, 2]`` half-width and half-height in pixels of the footprint ellipse's bounding box
            (at most ``radii``; tighter for elongated Gaussians); 0 = culled. Used for tile binning.
        opacities: ``[C, N]`` opacities used for compositing (times the antialiasing compensation).
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    extents: Tensor
    opacities: Tensor


def quat_scale_to_covariance(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances from rotations and scales.

    Args:
        quats: ``[N, 4]`` quaternions ``(w, x, y, z)``, not necessarily normalised.
        scales: ``[N, 3]`` standard deviations along the Gaussian's own axes.

    Returns:
        ``[N, 3, 3]`` covariance matrices ``R diag(s^2) R^T``.
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    rs = rot * scales[:, None, :]
    return rs @ rs.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    covariances: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    antialiased: bool = False,
) -> ProjectedGaussians:
    """Project Gaussians into ``C`` pinhole cameras.

    Args:
        means: ``[N, 3]`` world positions.
        covariances: ``[N, 3, 3]`` world covariances.
        opacities: ``[N]`` opacities in ``[0, 1]``.
        viewmats: ``[C, 4, 4]`` OpenCV world-to-camera matrices.
        Ks: ``[C, 3, 3]`` intrinsics in pixels.
        width, height: image size in pixels.
        near_plane, far_plane: Gaussians whose mean depth is outside ``(near, far)`` are culled.
        eps2d: added to the diagonal of every 2D covariance (a low-pass filter of about a third of a pixel).
        antialiased: if True, scale opacities by ``sqrt(det(cov2d) / det(cov2d + eps2d I))`` (Mip-Splatting's
            compensation), so that shrinking Gaussians fade instead of staying one pixel wide.

    Returns:
        :class:`ProjectedGaussians`.
    """
    rot_w2c = viewmats[:, :3, :3]  # [C,3,3]
    means_c = torch.einsum("cij,nj->cni", rot_w2c, means) + viewmats[:, None, :3, 3]  # [C,N,3]

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C,1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    x, y, z = means_c.unbind(-1)  # [C,N]
    in_depth_range = (z > near_plane) & (z < far_plane)
    z_safe = torch.where(in_depth_range, z, torch.ones_like(z))

    # Clamp the Jacobian's x/z and y/z to 30% beyond the image, as gsplat does.
    tan_fov_x, tan_fov_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fov_x, cx / fx + 0.3 * tan_fov_x
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fov_y, cy / fy + 0.3 * tan_fov_y
    tx = z_safe * torch.minimum(torch.maximum(x / z_safe, -lim_x_neg), lim_x_pos)
    ty = z_safe * torch.minimum(torch.maximum(y / z_safe, -lim_y_neg), lim_y_pos)
    # cov2d = M Sigma M^T with M = J W the [2, 3] Jacobian of the projection times the world-to-camera
    # rotation. J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]], so M's rows are combinations of W's rows.
    # Written with [C, N, 3] vectors: batched 3x3 matmuls are slow on the CPU.
    w0, w1, w2 = rot_w2c[:, None, 0], rot_w2c[:, None, 1], rot_w2c[:, None, 2]  # [C,1,3]
    m0 = (fx / z_safe)[..., None] * w0 - (fx * tx / z_safe**2)[..., None] * w2  # [C,N,3]
    m1 = (fy / z_safe)[..., None] * w1 - (fy * ty / z_safe**2)[..., None] * w2
    cov = covariances[None]  # [1,N,3,3]
    cov_m0 = cov[..., 0] * m0[..., 0:1] + cov[..., 1] * m0[..., 1:2] + cov[..., 2] * m0[..., 2:3]
    cov_m1 = cov[..., 0] * m1[..., 0:1] + cov[..., 1] * m1[..., 1:2] + cov[..., 2] * m1[..., 2:3]
    a, b, c = (m0 * cov_m0).sum(-1), (m1 * cov_m0).sum(-1), (m1 * cov_m1).sum(-1)
    det_raw = a * c - b * b  # before the low-pass filter
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    valid = in_depth_range & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    opac = opacities[None].expand_as(z)
    if antialiased:
        opac = opac * torch.sqrt(torch.clamp(det_raw / det_safe, min=0.0))

    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    with torch.no_grad():
        # Footprint radius: the ellipse on which alpha = opacity * exp(-sigma) falls to the cut-off,
        # along the larger eigen-axis. Tighter than 3 sigma for faint Gaussians, exact for opaque ones.
        mid = 0.5 * (a + c)
        lambda_max = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.01))
        sigma_cut = 2.0 * torch.log(torch.clamp(opac / ALPHA_THRESHOLD, min=1.0))
        radius = torch.ceil(torch.sqrt(sigma_cut * lambda_max))
        u, v = means2d[..., 0], means2d[..., 1]
        on_image = (u + radius > 0) & (u - radius < width) & (v + radius > 0) & (v - radius < height)
        keep = valid & on_image & (radius > 0)
        radii = torch.where(keep, radius, torch.zeros_like(radius)).to(torch.int32)
        # The ellipse's axis-aligned half-extents: sqrt(sigma_cut * cov_xx), sqrt(sigma_cut * cov_yy).
        extents = torch.ceil(torch.sqrt(sigma_cut[..., None] * torch.stack([a, c], dim=-1)))
        extents = torch.where(keep[..., None], extents, torch.zeros_like(extents))

    return ProjectedGaussians(means2d=means2d, conics=conics, depths=z, radii=radii, extents=extents, opacities=opac)


class _ProjectCPU(torch.autograd.Function):
    """Autograd wrapper of the fused C++ projection (no gradient to the intrinsics)."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, settings):
        ext = load_cpu_extension()
        means2d, conics, depths, opac, radii, extents = ext.project_forward(means, quats, scales, opacities, viewmats, Ks, *settings)
        ctx.save_for_backward(means, quats, scales, opacities, viewmats, Ks)
        ctx.settings = settings
        ctx.mark_non_differentiable(radii, extents)
        return means2d, conics, depths, opac, radii, extents

    @staticmethod
    def backward(ctx, v_means2d, v_conics, v_depths, v_opac, _v_radii, _v_extents):
        need_gauss = any(ctx.needs_input_grad[:4])  # False in pose refinement (frozen scene): skip that work
        grads = load_cpu_extension().project_backward(
            *ctx.saved_tensors, *ctx.settings, v_means2d.contiguous(), v_conics.contiguous(), v_depths.contiguous(),
            v_opac.contiguous(), need_gauss,
        )
        grads = [g if need_gauss else None for g in grads[:4]] + [grads[4]]
        return (*grads, None, None)


def project_gaussians_fused(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    antialiased: bool = False,
) -> ProjectedGaussians:
    """``project_gaussians(means, quat_scale_to_covariance(quats, scales), ...)`` in one C++ pass (float32, CPU).

    Same arguments as :func:`project_gaussians` except ``quats [N, 4]`` and ``scales [N, 3]`` instead of the
    covariances. Differentiable w.r.t. means, quats, scales, opacities and viewmats (not Ks). Needs the C++
    extension (:func:`~nerfstudio_gsloc.rendering.extension.load_cpu_extension`).
    """
    if load_cpu_extension() is None:
        raise RuntimeError("the C++ CPU projection is not available")
    if Ks.requires_grad:
        raise ValueError("project_gaussians_fused gives no gradient to Ks; use project_gaussians")
    inputs = [t.contiguous().float() for t in (means, quats, scales, opacities, viewmats, Ks)]
    settings = (int(width), int(height), float(near_plane), float(far_plane), float(eps2d), bool(antialiased))
    means2d, conics, depths, opac, radii, extents = _ProjectCPU.apply(*inputs, settings)
    return ProjectedGaussians(means2d=means2d, conics=conics, depths=depths, radii=radii, extents=extents, opacities=opac)


# Real spherical-harmonics constants (degree 0 to 3), the convention of 3DGS / gsplat.
_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def spherical_harmonics_basis(degree: int, dirs: Tensor) -> Tensor:
    """Evaluate the real SH basis up to ``degree`` (0..3).

    Args:
        degree: SH degree.
        dirs: ``[..., 3]`` view directions (normalised here).

    Returns:
        ``[..., (degree + 1)^2]`` basis values.
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    x, y, z = F.normalize(dirs, dim=-1).unbind(-1)
    basis = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        basis += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        basis += [
            _SH_C2[0] * xy, _SH_C2[1] * yz, _SH_C2[2] * (2 * zz - xx - yy), _SH_C2[3] * xz, _SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        basis += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * xy * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(basis, dim=-1)


def evaluate_sh_colors(degree: int, sh_coeffs: Tensor, means: Tensor, camera_centers: Tensor) -> Tensor:
    """View-dependent colours from SH coefficients, as gsplat's ``rasterization`` computes them.

    Args:
        degree: SH degree to use (``(degree + 1)^2 <= K``).
        sh_coeffs: ``[N, K, 3]`` coefficients.
        means: ``[N, 3]`` Gaussian centres.
        camera_centers: ``[C, 3]`` camera centres in world space.

    Returns:
        ``[C, N, 3]`` colours, ``max(0, SH + 0.5)``.
    """
    num_bases = (degree + 1) ** 2
    if sh_coeffs.shape[1] < num_bases:
        raise ValueError(f"sh_degree {degree} needs {num_bases} SH coefficients, got {sh_coeffs.shape[1]}")
    basis = spherical_harmonics_basis(degree, means[None] - camera_centers[:, None])  # [C,N,B]
    colors = torch.einsum("cnb,nbd->cnd", basis, sh_coeffs[:, :num_bases])
    return torch.clamp_min(colors + 0.5, 0.0)


class _SHColorsCPU(torch.autograd.Function):
    """Autograd wrapper of the fused C++ SH colours."""

    @staticmethod
    def forward(ctx, sh_coeffs, means, camera_centers, degree):
        ctx.save_for_backward(sh_coeffs, means, camera_centers)
        ctx.degree = degree
        return load_cpu_extension().sh_forward(sh_coeffs, means, camera_centers, degree)

    @staticmethod
    def backward(ctx, v_colors):
        need_gauss = any(ctx.needs_input_grad[:2])  # False in pose refinement (frozen scene): skip that work
        v_coeffs, v_means, v_centers = load_cpu_extension().sh_backward(
            *ctx.saved_tensors, ctx.degree, v_colors.contiguous(), need_gauss
        )
        if not need_gauss:
            return None, None, v_centers, None
        return v_coeffs, v_means, v_centers, None


def evaluate_sh_colors_fused(degree: int, sh_coeffs: Tensor, means: Tensor, camera_centers: Tensor) -> Tensor:
    """:func:`evaluate_sh_colors` in one C++ pass (float32, CPU; needs the C++ extension). Same arguments."""
    num_bases = (degree + 1) ** 2
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    if sh_coeffs.shape[1] < num_bases:
        raise ValueError(f"sh_degree {degree} needs {num_bases} SH coefficients, got {sh_coeffs.shape[1]}")
    if load_cpu_extension() is None:
        raise RuntimeError("the C++ CPU SH colours are not available")
    inputs = [t.contiguous().float() for t in (sh_coeffs[:, :num_bases], means, camera_centers)]
    return _SHColorsCPU.apply(*inputs, int(degree))
