"""The CPU rasterizer against a dense reference: every pixel against every Gaussian, no tiles."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from nerfstudio_gsloc.rendering import rasterization
from nerfstudio_gsloc.rendering.projection import project_gaussians, quat_scale_to_covariance
from nerfstudio_gsloc.rendering.rasterize_to_pixels import load_cpu_extension, rasterize_to_pixels
from nerfstudio_gsloc.rendering.tiles import intersect_tiles

WIDTH, HEIGHT = 24, 20


def random_scene(num: int, seed: int, num_cams: int = 2, feature_dim: int = 3):
    """Gaussians in front of ``num_cams`` cameras looking roughly down +z from near the origin."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(num, 3, generator=gen) * torch.tensor([2.0, 2.0, 2.0]) + torch.tensor([-1.0, -1.0, 2.0])
    quats = torch.randn(num, 4, generator=gen)
    scales = torch.rand(num, 3, generator=gen) * 0.12 + 0.02
    opacities = torch.rand(num, generator=gen) * 0.9 + 0.05
    colors = torch.rand(num, feature_dim, generator=gen)
    viewmats = []
    for c in range(num_cams):
        angle = 0.1 * c
        rot = torch.tensor(
            [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
        )
        vm = torch.eye(4)
        vm[:3, :3] = rot
        vm[:3, 3] = torch.tensor([0.05 * c, -0.03 * c, 0.1 * c])
        viewmats.append(vm)
    viewmats = torch.stack(viewmats)
    Ks = torch.tensor([[20.0, 0.0, WIDTH / 2], [0.0, 21.0, HEIGHT / 2], [0.0, 0.0, 1.0]]).expand(num_cams, 3, 3)
    return means, quats, scales, opacities, colors, viewmats, Ks.clone()


def dense_reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height, eps2d=0.3, backgrounds=None):
    """Straightforward per-camera EWA splatting; every pixel sees every Gaussian, sorted by depth.

    Returns colours ``[C, H, W, D]``, alpha ``[C, H, W]`` and expected depth ``[C, H, W]``.
    """
    covs = quat_scale_to_covariance(quats, scales)
    out_colors, out_alpha, out_depth = [], [], []
    for c in range(viewmats.shape[0]):
        rot, trans, K = viewmats[c, :3, :3], viewmats[c, :3, 3], Ks[c]
        cam_pts = means @ rot.T + trans
        x, y, z = cam_pts.unbind(-1)
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        # the same 30%-beyond-the-image clamp of the Jacobian as gsplat
        tanx, tany = 0.5 * width / fx, 0.5 * height / fy
        xz = torch.clamp(x / z, -(cx / fx + 0.3 * tanx), (width - cx) / fx + 0.3 * tanx)
        yz = torch.clamp(y / z, -(cy / fy + 0.3 * tany), (height - cy) / fy + 0.3 * tany)
        jac = torch.zeros(means.shape[0], 2, 3)
        jac[:, 0, 0], jac[:, 0, 2] = fx / z, -fx * xz / z
        jac[:, 1, 1], jac[:, 1, 2] = fy / z, -fy * yz / z
        cov2d = jac @ rot @ covs @ rot.T @ jac.transpose(1, 2) + eps2d * torch.eye(2)
        prec = torch.linalg.inv(cov2d)
        centre = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
        order = torch.argsort(z)
        ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        pix = torch.stack([xs, ys], -1).reshape(-1, 2)  # [P,2]
        d = centre[order][None] - pix[:, None]  # [P,N,2]
        sigma = 0.5 * torch.einsum("pni,nij,pnj->pn", d, prec[order], d)
        alpha = torch.clamp_max(opacities[order][None] * torch.exp(-sigma), 0.999)
        alpha = torch.where((alpha >= 1 / 255) & (sigma >= 0) & (z[order][None] > 0.01), alpha, torch.zeros_like(alpha))
        inclusive = torch.cumprod(1 - alpha, -1)
        alpha = alpha * (inclusive > 1e-4)
        trans_after = torch.cumprod(1 - alpha, -1)
        trans_before = torch.cat([torch.ones_like(trans_after[:, :1]), trans_after[:, :-1]], -1)
        w = alpha * trans_before
        col = w @ colors[order]
        acc = 1 - trans_after[:, -1]
        if backgrounds is not None:
            col = col + (1 - acc)[:, None] * backgrounds[c]
        depth = (w @ z[order]) / acc.clamp(min=1e-10)
        out_colors.append(col.reshape(height, width, -1))
        out_alpha.append(acc.reshape(height, width))
        out_depth.append(depth.reshape(height, width))
    return torch.stack(out_colors), torch.stack(out_alpha), torch.stack(out_depth)


@pytest.fixture(scope="module", params=["cpp", "torch"])
def backend(request):
    if request.param == "cpp":
        assert load_cpu_extension() is not None, "the C++ rasterizer must build on this machine"
    return request.param


def render(scene, backend, render_mode="RGB+ED", backgrounds=None):
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    rast_module = sys.modules["nerfstudio_gsloc.rendering.rasterization"]
    original = rast_module.rasterize_to_pixels

    def forced(*args, **kwargs):
        return original(*args, use_cpp=backend == "cpp", **kwargs)

    rast_module.rasterize_to_pixels = forced
    try:
        return rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, WIDTH, HEIGHT,
            render_mode=render_mode, backgrounds=backgrounds,
        )
    finally:
        rast_module.rasterize_to_pixels = original


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_dense_reference(backend, seed):
    scene = random_scene(60, seed)
    bg = torch.tensor([[0.2, 0.3, 0.4], [0.9, 0.1, 0.0]])
    colors, alphas, meta = render(scene, backend, backgrounds=bg)
    ref_rgb, ref_alpha, ref_depth = dense_reference(*scene, WIDTH, HEIGHT, backgrounds=bg)
    assert colors.shape == (2, HEIGHT, WIDTH, 4) and alphas.shape == (2, HEIGHT, WIDTH, 1)
    assert ref_alpha.max() > 0.9, "the scene must cover part of the image for the test to mean anything"
    torch.testing.assert_close(colors[..., :3], ref_rgb, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alphas[..., 0], ref_alpha, atol=2e-5, rtol=1e-4)
    covered = ref_alpha > 0.05
    torch.testing.assert_close(colors[..., 3][covered], ref_depth[covered], atol=1e-4, rtol=1e-4)
    assert meta["radii"].shape == (2, 60) and meta["means2d"].shape == (2, 60, 2)


def test_render_modes(backend):
    scene = random_scene(40, 3)
    rgbd, alpha, _ = render(scene, backend, "RGB+D")
    depth_only, _, _ = render(scene, backend, "D")
    expected, _, _ = render(scene, backend, "ED")
    rgb, _, _ = render(scene, backend, "RGB")
    assert rgb.shape[-1] == 3 and depth_only.shape[-1] == 1
    torch.testing.assert_close(rgbd[..., :3], rgb)
    torch.testing.assert_close(rgbd[..., 3:], depth_only)
    torch.testing.assert_close(expected, depth_only / alpha.clamp(min=1e-10))
    with pytest.raises(ValueError, match="render_mode"):
        render(scene, backend, "RGBD")


def test_drawing_depth_changes_no_colour_and_no_colour_gradient():
    """A training step without a depth loss renders "RGB" instead of "RGB+ED" (GSLocModel.get_outputs): the C++
    compositor must then give bit-identical colours, alpha and gradients of a colour loss."""
    assert load_cpu_extension() is not None
    grads = {}
    for mode in ("RGB+ED", "RGB"):
        scene = [t.clone().requires_grad_(True) for t in random_scene(80, 6)]
        out, alphas, _ = render(scene, "cpp", mode)
        weights = torch.rand(2, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(2))
        loss = (out[..., :3] * weights).sum() + alphas.sum()
        grads[mode] = (out[..., :3].detach(), alphas.detach(), torch.autograd.grad(loss, scene[:6]))
    (rgb_d, alpha_d, grad_d), (rgb, alpha, grad) = grads["RGB+ED"], grads["RGB"]
    assert alpha.max() > 0.9
    assert torch.equal(rgb, rgb_d) and torch.equal(alpha, alpha_d)
    for g, g_d in zip(grad, grad_d):
        assert g_d.abs().max() > 0 and torch.equal(g, g_d)


def test_gradients_match_dense_reference(backend):
    scene = [t.clone().requires_grad_(True) for t in random_scene(30, 5)]
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    weights_rgb = torch.rand(2, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(0))
    weights_d = torch.rand(2, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    bg = torch.tensor([[0.5, 0.2, 0.1], [0.0, 0.4, 1.0]])

    out, alphas, _ = render(scene, backend, "RGB+D", backgrounds=bg)
    loss = (out[..., :3] * weights_rgb).sum() + 0.1 * (out[..., 3] * weights_d).sum() + alphas.sum()
    grads = torch.autograd.grad(loss, [means, quats, scales, opacities, colors, viewmats])

    ref_rgb, ref_alpha, ref_depth = dense_reference(means, quats, scales, opacities, colors, viewmats, Ks, WIDTH, HEIGHT, backgrounds=bg)
    ref_loss = (ref_rgb * weights_rgb).sum() + 0.1 * (ref_depth * ref_alpha * weights_d).sum() + ref_alpha.sum()
    ref_grads = torch.autograd.grad(ref_loss, [means, quats, scales, opacities, colors, viewmats])
    names = ["means", "quats", "scales", "opacities", "colors", "viewmats"]
    for name, g, r in zip(names, grads, ref_grads):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-3, msg=lambda m, n=name: f"{n}: {m}")


def splats_on_an_image(num: int, seed: int, width: int = 64, height: int = 48):
    """``num`` projected Gaussians (one camera, 4 channels) scattered over a ``width x height`` image, binned into
    8x8 tiles, and random per-pixel loss weights: (inputs of rasterize_to_pixels with gradients on, weights)."""
    gen = torch.Generator().manual_seed(seed)
    means2d = (torch.rand(1, num, 2, generator=gen) * torch.tensor([width, height])).requires_grad_(True)
    conics = torch.tensor([0.3, 0.05, 0.4]).repeat(1, num, 1).requires_grad_(True)
    colors = torch.rand(1, num, 4, generator=gen).requires_grad_(True)
    opacities = (torch.rand(1, num, generator=gen) * 0.999 + 0.001).requires_grad_(True)
    tiles = intersect_tiles(means2d, torch.full((1, num, 2), 6.0), torch.rand(1, num, generator=gen), width, height, 8)
    return (means2d, conics, colors, opacities, tiles, width, height), torch.rand(1, height, width, 4, generator=gen)


def composite_and_differentiate(splats, weights, use_cpp: bool):
    """Render ``splats`` and return (image, alpha, d loss / d means2d, conics, colors, opacities)."""
    img, alpha = rasterize_to_pixels(*splats, use_cpp=use_cpp)
    loss = (img * weights).sum() + alpha.sum()
    return (img, alpha, *torch.autograd.grad(loss, list(splats[:4])))


def test_cpp_and_torch_compositors_agree_on_many_gaussians():
    """Long per-tile lists (early termination, clamped alphas) on a bigger image."""
    assert load_cpu_extension() is not None
    splats, weights = splats_on_an_image(3000, seed=7)
    cpp, torch_ref = (composite_and_differentiate(splats, weights, use_cpp) for use_cpp in (True, False))
    for a, b in zip(cpp, torch_ref):
        # the C++ backward rebuilds transmittance by division along long lists: float32 noise of ~1e-4
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-3)


def test_cpp_compositor_gradients_do_not_depend_on_the_thread_count():
    """The backward adds into one buffer per thread and sums them: 2 threads give 1 thread's gradients."""
    assert load_cpu_extension() is not None
    splats, weights = splats_on_an_image(2000, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(composite_and_differentiate(splats, weights, use_cpp=True))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert one.abs().max() > 0
        torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)  # only the summation order differs


def test_projection_matches_gsplat_reference():
    """Our projection agrees with gsplat's own PyTorch implementation of it."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    means, quats, scales, opacities, _, viewmats, Ks = random_scene(50, 9)
    covars = quat_scale_to_covariance(quats, scales)
    ours = project_gaussians(means, covars, opacities, viewmats, Ks, WIDTH, HEIGHT)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, WIDTH, HEIGHT, eps2d=0.3)
    both = (ours.radii > 0) & (radii > 0)
    assert both.sum() > 20
    torch.testing.assert_close(ours.means2d[both], means2d[both])
    torch.testing.assert_close(ours.depths[both], depths[both])
    torch.testing.assert_close(ours.conics[both], conics[both])


def test_several_cameras_equal_single_camera_calls(backend):
    means, quats, scales, opacities, colors, viewmats, Ks = random_scene(50, 11, num_cams=3)
    batched, _, _ = render((means, quats, scales, opacities, colors, viewmats, Ks), backend)
    for c in range(3):
        single, _, _ = render((means, quats, scales, opacities, colors, viewmats[c : c + 1], Ks[c : c + 1]), backend)
        # The batched einsum of the projection may take another BLAS kernel than a single camera's, so means2d
        # differ by float32 rounding (~2e-6 px on some CPUs); compositing amplifies that to ~1e-5 relative.
        # A wrong camera, order or background would differ by orders of magnitude more.
        torch.testing.assert_close(batched[c : c + 1], single, rtol=1e-4, atol=1e-4)


def test_sh_colors_and_bad_inputs():
    means, quats, scales, opacities, _, viewmats, Ks = random_scene(20, 2)
    sh = torch.zeros(20, 16, 3)
    sh[:, 0] = 0.7  # constant term only: colour = 0.7 * C0 + 0.5 everywhere the Gaussians are opaque
    rgb, alpha, _ = rasterization(means, quats, scales, torch.ones(20) * 0.999, sh, viewmats, Ks, WIDTH, HEIGHT, sh_degree=3)
    expected = 0.7 * 0.28209479177387814 + 0.5
    mask = alpha[..., 0] > 0.99
    assert mask.any()
    torch.testing.assert_close(rgb[mask] / alpha[mask], torch.full_like(rgb[mask], expected), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="viewmats"):
        rasterization(means, quats, scales, opacities, sh, viewmats[0], Ks, WIDTH, HEIGHT, sh_degree=3)
    with pytest.raises(ValueError, match="absgrad"):
        rasterization(means, quats, scales, opacities, sh, viewmats, Ks, WIDTH, HEIGHT, sh_degree=3, absgrad=True)


def test_cpp_tile_binning_matches_torch_binning():
    assert load_cpu_extension() is not None
    gen = torch.Generator().manual_seed(3)
    means2d = torch.rand(2, 500, 2, generator=gen) * torch.tensor([70.0, 50.0]) - 5.0
    extents = torch.randint(0, 9, (2, 500, 2), generator=gen).float() * (torch.rand(2, 500, 1, generator=gen) > 0.1)
    depths = torch.rand(2, 500, generator=gen)
    depths[:, ::5] = 0.5  # ties: both keep the ids' order (the C++ radix sort is stable too)
    for tile_size in (8, 16):
        a = intersect_tiles(means2d, extents, depths, 64, 45, tile_size, use_cpp=True)
        b = intersect_tiles(means2d, extents, depths, 64, 45, tile_size, use_cpp=False)
        assert a.num_intersections > 500
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.flatten_ids, b.flatten_ids)


@pytest.mark.parametrize("antialiased", [False, True])
def test_fused_projection_matches_torch_projection(antialiased):
    """The C++ projection (forward values, radii, gradients to every input but Ks) against the PyTorch one."""
    assert load_cpu_extension() is not None
    from nerfstudio_gsloc.rendering.projection import project_gaussians_fused

    means, quats, scales, opacities, _, viewmats, Ks = random_scene(80, 13, num_cams=2)
    # a few Gaussians behind the camera, beyond the side of the image (clamped Jacobian) and very flat
    means[:3, 2] = -1.0
    means[3:8, 0] = torch.linspace(-6.0, 6.0, 5)
    scales[8:12, 2] = 1e-4
    inputs = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, viewmats)]
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(2, 80, k, generator=gen) for k in (2, 3, 1, 1)]

    def loss_of(p):
        return sum((w * t.reshape(2, 80, -1)).sum() for w, t in zip(weights, (p.means2d, p.conics, p.depths, p.opacities)))

    ref = project_gaussians(inputs[0], quat_scale_to_covariance(inputs[1], inputs[2]), inputs[3], inputs[4], Ks,
                            WIDTH, HEIGHT, antialiased=antialiased)
    fused = project_gaussians_fused(*inputs, Ks, WIDTH, HEIGHT, antialiased=antialiased)
    assert (ref.radii > 0).sum() > 40 and (ref.radii == 0).sum() > 3
    assert torch.equal(fused.radii, ref.radii) and torch.equal(fused.extents, ref.extents)
    for name in ("means2d", "conics", "depths", "opacities"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    ref_grads = torch.autograd.grad(loss_of(ref), inputs)
    fused_grads = torch.autograd.grad(loss_of(fused), inputs)
    for name, g, r in zip(["means", "quats", "scales", "opacities", "viewmats"], fused_grads, ref_grads):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # pose refinement: a frozen scene, gradient to the view matrices only (the kernel skips the rest)
    frozen = [t.detach() for t in inputs[:4]] + [viewmats.clone().requires_grad_(True)]
    (v_view,) = torch.autograd.grad(loss_of(project_gaussians_fused(*frozen, Ks, WIDTH, HEIGHT, antialiased=antialiased)), frozen[4:])
    torch.testing.assert_close(v_view, ref_grads[4], atol=1e-4, rtol=1e-4)


def test_cpp_compositor_row_spans_change_nothing():
    """Testing each Gaussian only on the tile rows its footprint reaches gives the same images and gradients."""
    assert load_cpu_extension() is not None
    means, quats, scales, opacities, colors, viewmats, Ks = random_scene(200, 17, num_cams=1)
    scales = scales * 0.3  # footprints of a few pixels: most do not reach every row of a tile
    proj = project_gaussians(means, quat_scale_to_covariance(quats, scales), opacities, viewmats, Ks, WIDTH, HEIGHT)
    tiles = intersect_tiles(proj.means2d, proj.extents, proj.depths, WIDTH, HEIGHT, 8)
    feats = colors[None].clone()
    inputs = [proj.means2d.detach().clone().requires_grad_(True), proj.conics.detach().clone().requires_grad_(True),
              feats.requires_grad_(True), proj.opacities.detach().clone().requires_grad_(True)]
    weights = torch.rand(1, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(2))
    results = []
    for extents in (None, proj.extents):
        img, alpha = rasterize_to_pixels(*inputs, tiles, WIDTH, HEIGHT, use_cpp=True, extents=extents)
        results.append((img, alpha, *torch.autograd.grad((img * weights).sum() + alpha.sum(), inputs)))
    assert results[0][1].max() > 0.5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_fused_sh_colors_match_torch_sh_colors(degree):
    """The C++ SH colours (values, gradients to coefficients, means and camera centres) against the PyTorch ones."""
    assert load_cpu_extension() is not None
    from nerfstudio_gsloc.rendering.projection import evaluate_sh_colors, evaluate_sh_colors_fused

    gen = torch.Generator().manual_seed(degree)
    coeffs = (torch.randn(60, 16, 3, generator=gen) * 2.0).requires_grad_(True)  # some colours clamp at 0
    means = torch.randn(60, 3, generator=gen).requires_grad_(True)
    centers = (torch.randn(2, 3, generator=gen) * 3).requires_grad_(True)
    weights = torch.randn(2, 60, 3, generator=gen)
    weights[:, ::5] = 0.0  # Gaussians that drew nothing in either camera (the backward pass skips them)
    weights[0, 1::7] = 0.0  # ... or in one of them
    ref = evaluate_sh_colors(degree, coeffs, means, centers)
    fused = evaluate_sh_colors_fused(degree, coeffs, means, centers)
    assert (ref == 0).any() and (ref > 0).any()
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [coeffs, means, centers], allow_unused=True)
    ref_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(ref_grads, (coeffs, means, centers))]
    fused_grads = torch.autograd.grad((fused * weights).sum(), [coeffs, means, centers])
    for name, g, r in zip(["coeffs", "means", "centers"], fused_grads, ref_grads):
        if degree > 0 or name == "coeffs":
            assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # pose refinement: a frozen scene, gradient to the camera centres only (the kernel skips the rest)
    frozen_centers = centers.detach().clone().requires_grad_(True)
    fused_frozen = evaluate_sh_colors_fused(degree, coeffs.detach(), means.detach(), frozen_centers)
    (v_centers,) = torch.autograd.grad((fused_frozen * weights).sum(), [frozen_centers], allow_unused=True)
    torch.testing.assert_close(v_centers, ref_grads[2], atol=1e-4, rtol=1e-4)
