"""Lens undistortion of query images, done exactly the way nerfstudio undistorts its training images.

nerfstudio (1.1.5, ``FullImageDatamanager``) trains splats on *undistorted* images: for each distorted camera it
calls ``_undistort_image`` of ``nerfstudio/data/datamanagers/full_images_datamanager.py``, which picks new pinhole
intrinsics and, for perspective cameras, crops to the valid region. A query has to be undistorted with the same
function, so that it sees the scene through the same kind of pinhole camera as the training images did.

Conventions:

* distortion parameters come in nerfstudio's order ``[k1, k2, k3, k4, p1, p2]`` (``camera_utils.get_distortion_params``);
* perspective cameras (``OPENCV``, ``RADIAL``, ...) use OpenCV's Brown model with ``k1, k2, k3, p1, p2``; nerfstudio
  refuses ``k4`` for them; ``OPENCV_FISHEYE`` cameras use OpenCV's fisheye model with ``k1..k4`` (and no ``p1, p2``);
* intrinsics ``K`` (``[3, 3]``, pixels) put pixel centres at ``+0.5`` in and out, like nerfstudio; OpenCV's
  integer-centred convention only exists inside this module.

The image goes through nerfstudio's function itself; masks and depth maps go through the same pixel mapping with
nearest-neighbour sampling (OpenCV's ``initUndistortRectifyMap`` for the new intrinsics, which is what
``cv2.undistort`` / ``cv2.fisheye`` use internally). Output pixels whose source lies outside the distorted image
(black after undistortion) are reported as invalid, so they are never compared with a render.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np
import torch

from nerfstudio_gsloc.errors import GslocError

#: nerfstudio's camera models (``CAMERA_MODEL_TO_TYPE``) that queries may use, by projection.
PERSPECTIVE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
FISHEYE_MODELS = ("OPENCV_FISHEYE",)
#: Names of the six distortion parameters in nerfstudio's order.
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


@dataclass
class UndistortedView:
    """A query image after undistortion.

    Attributes:
        image: ``[H', W', C]`` image, same dtype as the input.
        K: ``[3, 3]`` float64 pinhole intrinsics of ``image`` (pixel centres at +0.5).
        valid: ``[H', W']`` bool, False where the undistorted pixel has no source in the distorted image.
        mask: ``[H', W']`` bool, the input mask remapped and and-ed with ``valid`` (``valid`` when no mask given).
        depth: optional ``[H', W']`` float32 depth remapped with nearest sampling (0 = missing, also outside).
    """

    image: np.ndarray
    K: np.ndarray
    valid: np.ndarray
    mask: np.ndarray
    depth: Optional[np.ndarray] = None


def is_distorted(params: Optional[np.ndarray]) -> bool:
    """True when any distortion parameter is non-zero (nerfstudio undistorts exactly then)."""
    return params is not None and bool(np.any(np.asarray(params, dtype=np.float64) != 0.0))


def check_distortion(params: np.ndarray, fisheye: bool, where: str) -> None:
    """Refuse parameters that nerfstudio cannot undistort (it would assert or silently drop them).

    Args:
        params: ``[6]`` ``[k1, k2, k3, k4, p1, p2]``.
        fisheye: the camera is ``OPENCV_FISHEYE``.
        where: prefix of the error message.

    Raises:
        GslocError: non-finite values, ``k4`` on a perspective camera, ``p1``/``p2`` on a fisheye camera.
    """
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (6,) or not np.isfinite(params).all():
        raise GslocError(f"{where}: distortion parameters must be 6 finite numbers [k1, k2, k3, k4, p1, p2]")
    if not fisheye and params[3] != 0.0:
        raise GslocError(f"{where}: k4 is not supported for perspective cameras (nerfstudio undistorts k1, k2, k3, p1, p2)")
    if fisheye and np.any(params[4:] != 0.0):
        raise GslocError(f"{where}: OPENCV_FISHEYE takes k1..k4 only; p1 and p2 must be 0")


def raw_dataset_cameras(dataset: Any) -> Any:
    """A nerfstudio dataset's cameras as its dataparser gave them (lens distortion included), at the dataset's scale.

    nerfstudio's image cache overwrites ``dataset.cameras`` with the undistorted intrinsics once it has been filled,
    while ``dataset.get_numpy_image`` always returns the raw (distorted) image: that image goes with these cameras.
    """
    cameras = copy.deepcopy(dataset._dataparser_outputs.cameras)
    cameras.rescale_output_resolution(scaling_factor=float(getattr(dataset, "scale_factor", 1.0)))
    return cameras


def camera_distortion(camera: Any, where: str) -> Optional[tuple]:
    """The lens model of one nerfstudio camera: ``None`` without distortion, else ``(params [6] float64, fisheye)``.

    Raises:
        GslocError: parameters nerfstudio cannot undistort (:func:`check_distortion`).
    """
    from nerfstudio.cameras.cameras import CameraType

    params = camera.distortion_params
    if params is None or not is_distorted(params.numpy()):
        return None
    distortion = (params.numpy().astype(np.float64), int(camera.camera_type.reshape(-1)[0]) == CameraType.FISHEYE.value)
    check_distortion(distortion[0], distortion[1], where)
    return distortion


def _opencv_maps(K_cv: np.ndarray, params: np.ndarray, fisheye: bool, new_K_cv: np.ndarray, size: tuple) -> tuple:
    """Source (distorted) pixel coordinates ``map_x, map_y`` (``[H', W']`` float32) of each undistorted pixel."""
    if fisheye:
        return cv2.fisheye.initUndistortRectifyMap(K_cv, params[:4], np.eye(3), new_K_cv, size, cv2.CV_32FC1)
    # OpenCV's order is (k1, k2, p1, p2, k3).
    coeffs = np.array([params[0], params[1], params[4], params[5], params[2]], dtype=np.float64)
    return cv2.initUndistortRectifyMap(K_cv, coeffs, None, new_K_cv, size, cv2.CV_32FC1)


def undistort_view(
    image: np.ndarray,
    K: np.ndarray,
    params: np.ndarray,
    fisheye: bool,
    mask: Optional[np.ndarray] = None,
    depth: Optional[np.ndarray] = None,
) -> UndistortedView:
    """Undistort one image (and its mask and depth) like nerfstudio's training images.

    Args:
        image: ``[H, W, C]`` uint8 or float32 image (C = 3 or 4).
        K: ``[3, 3]`` intrinsics of the distorted image (pixel centres at +0.5).
        params: ``[6]`` distortion ``[k1, k2, k3, k4, p1, p2]`` (checked with :func:`check_distortion` first).
        fisheye: ``OPENCV_FISHEYE`` (else perspective Brown-Conrady).
        mask: optional ``[H, W]`` bool, True = pixel to use.
        depth: optional ``[H, W]`` float depth (``<= 0`` = missing).

    Returns:
        the undistorted view; its size is the cropped one for perspective cameras, the input one for fisheye.
    """
    from nerfstudio.cameras.cameras import Cameras, CameraType
    from nerfstudio.data.datamanagers.full_images_datamanager import _undistort_image

    height, width = image.shape[:2]
    params = np.asarray(params, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    camera = Cameras(
        camera_to_worlds=torch.eye(4)[None, :3],
        fx=float(K[0, 0]), fy=float(K[1, 1]), cx=float(K[0, 2]), cy=float(K[1, 2]), width=width, height=height,
        distortion_params=torch.from_numpy(params).float()[None],
        camera_type=CameraType.FISHEYE if fisheye else CameraType.PERSPECTIVE,
    ).reshape(())
    # K and parameters as the datamanager passes them (float32 from the camera: same rounding as training);
    # nerfstudio's function shifts K in place, so it gets a copy.
    ns_params = camera.distortion_params.numpy()
    ns_K = camera.get_intrinsics_matrices().numpy()
    new_K, undistorted, _ = _undistort_image(camera, ns_params, {}, np.ascontiguousarray(image), ns_K.copy())
    new_K = np.asarray(new_K, dtype=np.float64)

    # The same mapping for masks, depth and validity. A crop (perspective) only shifts the principal point, so
    # maps built for the cropped intrinsics and size give the cropped output directly.
    shift = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    new_h, new_w = undistorted.shape[:2]
    map_x, map_y = _opencv_maps(ns_K - shift, ns_params.astype(np.float64), fisheye, new_K - shift, (new_w, new_h))
    # Strictly inside the source image: bilinear sampling there never reads the black border.
    valid = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)

    def nearest(values: np.ndarray) -> np.ndarray:
        return cv2.remap(values, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    out_mask = valid if mask is None else valid & (nearest(np.asarray(mask, dtype=np.uint8)) > 0)
    out_depth = None if depth is None else nearest(np.ascontiguousarray(depth, dtype=np.float32))
    if out_depth is not None:
        out_depth = np.where(valid, out_depth, 0.0).astype(np.float32)
    return UndistortedView(image=undistorted, K=new_K, valid=valid, mask=out_mask, depth=out_depth)
