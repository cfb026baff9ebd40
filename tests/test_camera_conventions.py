"""Round trips of the camera conventions: OpenGL camera-to-world poses, OpenCV projection, pixel centres at +0.5."""

import math

import torch

from nerfstudio_gsloc.camera_conventions import project_points, unproject_points


def _pose(yaw_deg: float, centre) -> torch.Tensor:
    """OpenGL camera-to-world ``[3, 4]`` turned by ``yaw_deg`` about the world z axis, at ``centre``."""
    a = math.radians(yaw_deg)
    R = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
    return torch.cat([R, torch.tensor(centre, dtype=torch.float64)[:, None]], dim=1)


def test_unproject_then_project_returns_the_pixels_and_depths():
    K = torch.tensor([[120.0, 0.7, 64.3], [0.0, 118.0, 47.9], [0.0, 0.0, 1.0]], dtype=torch.float64)
    c2w = _pose(33.0, [0.4, -1.2, 0.9])
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(50, 2, generator=gen, dtype=torch.float64) * torch.tensor([128.0, 96.0])
    z = 0.5 + 3.0 * torch.rand(50, generator=gen, dtype=torch.float64)
    world = unproject_points(c2w, K, pixels, z)
    uv, depth = project_points(c2w[None], K, world)
    assert torch.allclose(uv[0], pixels, atol=1e-9) and torch.allclose(depth[0], z, atol=1e-12)


def test_unproject_follows_the_opengl_camera_axes():
    # nerfstudio's camera looks down its -z axis with +y up; the OpenCV pixel grid has +y down
    K = torch.tensor([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    c2w = _pose(0.0, [0.0, 0.0, 0.0])
    centre, below_right = unproject_points(c2w, K, torch.tensor([[50.0, 40.0], [60.0, 50.0]]),
                                           torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(centre, torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64))
    assert torch.allclose(below_right, torch.tensor([0.2, -0.2, -2.0], dtype=torch.float64))
