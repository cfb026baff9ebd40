"""The one place where camera conventions are converted.

Conventions used across the project:

* nerfstudio (and its transforms.json) stores **OpenGL camera-to-world** poses: the camera looks along
  its local -z axis, +y is up and +x is right. Shape ``[..., 3, 4]`` (or ``[..., 4, 4]``).
* gsplat (and this project's rasterizer) takes **OpenCV world-to-camera** view matrices: the camera looks
  along +z, +y is down, +x is right. Shape ``[..., 4, 4]``.
* nerfstudio's dataparser normalises the dataset: ``c2w_scene = scale * (T @ c2w_original)`` for the
  translation part, where ``T`` is the ``[3, 4]`` ``transform`` and ``scale`` the ``scale`` stored in
  ``dataparser_transforms.json``. Poses enter and leave this program in the *original* frame.

Every other module calls these functions instead of flipping axes itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping

import torch
from torch import Tensor

# Flipping the y and z axes of the camera frame turns OpenGL camera axes into OpenCV ones (and back).
_GL_TO_CV = torch.tensor([1.0, -1.0, -1.0])


def to_homogeneous(pose: Tensor) -> Tensor:
    """``[..., 3, 4]`` or ``[..., 4, 4]`` rigid transform -> ``[..., 4, 4]``."""
    if pose.shape[-2:] == (4, 4):
        return pose
    if pose.shape[-2:] != (3, 4):
        raise ValueError(f"expected a pose of shape [..., 3, 4] or [..., 4, 4], got {tuple(pose.shape)}")
    bottom = torch.zeros(*pose.shape[:-2], 1, 4, dtype=pose.dtype, device=pose.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([pose, bottom], dim=-2)


def rigid_inverse(pose: Tensor) -> Tensor:
    """Inverse of a rigid ``[..., 4, 4]`` (or ``[..., 3, 4]``) transform, returned as ``[..., 4, 4]``.

    Uses R^T and -R^T t, which is exact for rotations and differentiable.
    """
    pose = to_homogeneous(pose)
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    trans = -rot_t @ pose[..., :3, 3:4]
    top = torch.cat([rot_t, trans], dim=-1)
    return to_homogeneous(top)


def opengl_c2w_to_opencv_w2c(c2w: Tensor) -> Tensor:
    """nerfstudio camera-to-world (OpenGL, ``[..., 3|4, 4]``) -> gsplat view matrix (OpenCV w2c, ``[..., 4, 4]``)."""
    c2w = to_homogeneous(c2w)
    flip = _GL_TO_CV.to(device=c2w.device, dtype=c2w.dtype)
    c2w_cv = torch.cat([c2w[..., :3, :3] * flip, c2w[..., :3, 3:4]], dim=-1)
    return rigid_inverse(c2w_cv)


def opencv_w2c_to_opengl_c2w(w2c: Tensor) -> Tensor:
    """gsplat view matrix (OpenCV w2c, ``[..., 4, 4]``) -> nerfstudio camera-to-world (OpenGL, ``[..., 3, 4]``)."""
    c2w_cv = rigid_inverse(w2c)
    flip = _GL_TO_CV.to(device=w2c.device, dtype=w2c.dtype)
    return torch.cat([c2w_cv[..., :3, :3] * flip, c2w_cv[..., :3, 3:4]], dim=-1)


def opengl_c2w_to_opencv_c2w(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world ``[..., 3|4, 4]`` -> OpenCV camera-to-world ``[..., 3, 4]`` (same centre, camera y and
    z axes flipped: +z forward, +y down, as the TUM/ORB-SLAM trajectory tools expect). Its own inverse."""
    c2w = to_homogeneous(c2w)
    flip = _GL_TO_CV.to(device=c2w.device, dtype=c2w.dtype)
    return torch.cat([c2w[..., :3, :3] * flip, c2w[..., :3, 3:4]], dim=-1)


opencv_c2w_to_opengl_c2w = opengl_c2w_to_opencv_c2w
"""OpenCV camera-to-world -> OpenGL camera-to-world (the same axis flip)."""


def project_points(c2w: Tensor, K: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Pixels and depths of world points seen through each of several OpenGL camera-to-world poses.

    Args:
        c2w: ``[P, 3|4, 4]`` OpenGL camera-to-world poses.
        K: ``[3, 3]`` intrinsics (pixel centres at ``+0.5``).
        points: ``[M, 3]`` world points.

    Returns:
        ``uv [P, M, 2]`` pixel coordinates and ``z [P, M]`` OpenCV depths, float64 on the inputs' device (``uv`` of
        points at or behind a camera is divided by ``1e-9`` instead of their depth: callers mask them by ``z``).
    """
    w2c = opengl_c2w_to_opencv_w2c(c2w.double())
    cam = torch.einsum("pij,mj->pmi", w2c[:, :3, :3], points.double()) + w2c[:, None, :3, 3]
    uvw = torch.einsum("ij,pmj->pmi", K.double(), cam)
    return uvw[..., :2] / uvw[..., 2:3].clamp_min(1e-9), cam[..., 2]


def unproject_points(c2w: Tensor, K: Tensor, pixels: Tensor, z: Tensor) -> Tensor:
    """World points seen at ``pixels`` with OpenCV depth ``z``: the inverse of :func:`project_points` for one camera.

    Args:
        c2w: ``[3|4, 4]`` OpenGL camera-to-world pose.
        K: ``[3, 3]`` intrinsics (pixel centres at ``+0.5``; a skew ``K[0, 1]`` is honoured).
        pixels: ``[M, 2]`` continuous pixel coordinates ``(x, y)``.
        z: ``[M]`` depths along the camera's optical axis (z-depth, not ray length).

    Returns:
        ``[M, 3]`` world points, in the dtype and on the device of ``z``.
    """
    dtype, device = z.dtype, z.device
    K = K.to(device=device, dtype=dtype)
    x, y = pixels[:, 0].to(device=device, dtype=dtype), pixels[:, 1].to(device=device, dtype=dtype)
    y_norm = (y - K[1, 2]) / K[1, 1]
    x_norm = (x - K[0, 2] - K[0, 1] * y_norm) / K[0, 0]
    cam = torch.stack([x_norm * z, y_norm * z, z], dim=-1)  # OpenCV camera frame
    c2w_cv = rigid_inverse(opengl_c2w_to_opencv_w2c(c2w.to(device=device, dtype=dtype)))
    return cam @ c2w_cv[:3, :3].T + c2w_cv[:3, 3]


def original_to_scene_frame(c2w_original: Tensor, transform: Tensor, scale: float) -> Tensor:
    """Dataset-frame camera-to-world ``[..., 3|4, 4]`` -> nerfstudio's normalised scene frame ``[..., 3, 4]``.

    ``transform`` is the ``[3, 4]`` matrix and ``scale`` the float of ``dataparser_transforms.json``.
    Rotations are only rotated (the dataparser's transform is rigid); translations are also scaled.
    """
    c2w = to_homogeneous(c2w_original)
    out = to_homogeneous(transform.to(c2w))[:3, :] @ c2w
    return torch.cat([out[..., :3, :3], out[..., :3, 3:4] * scale], dim=-1)


def scene_to_original_frame(c2w_scene: Tensor, transform: Tensor, scale: float) -> Tensor:
    """Inverse of :func:`original_to_scene_frame`: scene-frame c2w ``[..., 3|4, 4]`` -> dataset frame ``[..., 3, 4]``."""
    c2w = to_homogeneous(c2w_scene)
    unscaled = torch.cat([c2w[..., :3, :3], c2w[..., :3, 3:4] / scale], dim=-1)
    inv_t = rigid_inverse(transform.to(c2w))
    return (inv_t @ to_homogeneous(unscaled))[..., :3, :]


@dataclass
class FrameTransform:
    """Map between the dataset's original frame and nerfstudio's scene frame.

    ``c2w_scene = scale * (transform @ c2w_original)`` (translation scaled), with ``transform`` the ``[3, 4]``
    rigid map of ``dataparser_transforms.json`` composed with the inverse of the dataset's
    ``applied_transform`` when it has one (so "original" is the frame of the dataset's transforms.json).

    Attributes:
        transform: ``[3, 4]`` float64 rigid transform, original -> scene (before scaling).
        scale: dataparser scale (scene units per original unit).
        source: where the map was read from (for messages and the outputs' metadata).
    """

    transform: Tensor
    scale: float
    source: str = ""

    def to_scene(self, c2w_original: Tensor) -> Tensor:
        """``[..., 3|4, 4]`` original-frame c2w -> ``[..., 3, 4]`` scene-frame c2w (same dtype)."""
        out = original_to_scene_frame(c2w_original.double(), self.transform.double(), self.scale)
        return out.to(c2w_original.dtype)

    def to_original(self, c2w_scene: Tensor) -> Tensor:
        """``[..., 3|4, 4]`` scene-frame c2w -> ``[..., 3, 4]`` original-frame c2w (same dtype)."""
        out = scene_to_original_frame(c2w_scene.double(), self.transform.double(), self.scale)
        return out.to(c2w_scene.dtype)

    @staticmethod
    def identity() -> "FrameTransform":
        """The identity map (scene frame = original frame)."""
        return FrameTransform(torch.eye(4, dtype=torch.float64)[:3], 1.0, "identity")

    def to_json(self) -> Dict[str, Any]:
        """JSON description written next to the poses (``transform`` as a nested 3x4 list)."""
        return {"transform": self.transform.tolist(), "scale": self.scale, "source": self.source}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "FrameTransform":
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: no finite ``[3, 4]`` (or ``[4, 4]``) ``transform`` or no positive finite ``scale``.
        """
        try:
            transform = torch.tensor(data["transform"], dtype=torch.float64)[:3]
            scale = float(data["scale"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError("a frame needs a 3x4 'transform' and a 'scale'") from None
        if transform.shape != (3, 4) or not bool(torch.isfinite(transform).all()):
            raise ValueError("the frame's 'transform' must be a finite 3x4 matrix")
        if not (scale > 0 and scale != float("inf")):
            raise ValueError("the frame's 'scale' must be a positive finite number")
        return FrameTransform(transform, scale, str(data.get("source", "")))
