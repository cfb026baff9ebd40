"""The map of a trained scene: views with SIFT features lifted to 3D by the model's rendered depth.

One map serves the ``pnp`` localizer and retrieval initialisation (:mod:`nerfstudio_gsloc.localize.retrieval`):

* **training views**: the real training photos (:func:`load_training_views`); their keypoints are lifted with the
  depth the model renders at the training pose;
* **rendered views** (optional): the model rendered at poses *around* the training cameras
  (:func:`jittered_poses`: each training camera orbited about the point it looks at, moved closer or farther and
  rolled), so that a query between or beyond the training views still finds a close view; their keypoints are
  detected on the render itself and lifted with the same render's depth. :func:`between_poses` places views
  between neighbouring training cameras instead (an option of the scene regressor's training).

Keypoints on depth discontinuities (where bilinear depth would mix foreground and background) or on transparent
pixels are dropped. Poses are OpenGL camera-to-world ``[3, 4]`` in the scene (dataparser) frame; keypoints
``(x, y)`` have pixel centres at ``+0.5`` (see :mod:`nerfstudio_gsloc.localize.matching`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.features import Features, SiftFeatures
from nerfstudio_gsloc.localize.absolute_pose import lift_keypoints
from nerfstudio_gsloc.localize.query_images import make_view
from nerfstudio_gsloc.localize.undistort import camera_distortion, is_distorted, raw_dataset_cameras
from nerfstudio_gsloc.rendering import render_splat_model

ViewSource = Literal["train", "rendered"]


@dataclass
class TrainingView:
    """One training image with its camera (scene frame).

    Attributes:
        name: image file name.
        image: ``[H, W, 3]`` float32 in ``[0, 1]`` (composited onto the dataset's background like the queries).
        K: ``[3, 3]`` intrinsics.
        c2w: ``[3, 4]`` OpenGL camera-to-world pose.
    """

    name: str
    image: Tensor
    K: Tensor
    c2w: Tensor


def load_training_views(pipeline) -> List[TrainingView]:
    """The training split of a loaded nerfstudio pipeline as :class:`TrainingView` s, as training saw them.

    Photos with lens distortion are undistorted the way nerfstudio undistorts training images (and the queries
    are, :func:`~nerfstudio_gsloc.localize.queries.load_eval_queries`), with the pinhole intrinsics of the result:
    the map's keypoints are lifted through a pinhole camera. RGBA images are composited onto the dataparser's
    ``alpha_color`` (white when it has none), as the eval queries are.

    Raises:
        GslocError: no training dataset, or a lens model nerfstudio cannot undistort.
    """
    dataset = getattr(getattr(pipeline, "datamanager", None), "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise GslocError("the run has no training images to build the map from")
    outputs = dataset._dataparser_outputs
    cameras = raw_dataset_cameras(dataset)  # get_numpy_image returns the raw photo: it goes with these cameras
    background = outputs.alpha_color.float() if outputs.alpha_color is not None else torch.ones(3)
    views: List[TrainingView] = []
    for index in range(len(dataset)):
        name = str(outputs.image_filenames[index])
        camera = cameras[index]
        pixels = dataset.get_numpy_image(index)
        alpha = pixels[..., 3] if pixels.shape[-1] == 4 else None
        view = make_view(pixels[..., :3], alpha, camera.get_intrinsics_matrices().double().numpy(), None, None,
                         camera_distortion(camera, f"training image {index} ({Path(name).name})"), background,
                         alpha_as_mask=False)
        c2w = camera.camera_to_worlds.detach().cpu().float()[:3, :4].clone()
        views.append(TrainingView(name, view["image"], view["K"], c2w))
    return views


def training_camera_poses(pipeline) -> Tensor:
    """``[N, 3, 4]`` training camera-to-world poses (scene frame) of a loaded pipeline, without reading images."""
    dataset = getattr(getattr(pipeline, "datamanager", None), "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise GslocError("the run has no training cameras")
    return dataset.cameras.camera_to_worlds.detach().cpu().float()[:, :3, :4].clone()


def training_photos_have_lens_distortion(pipeline) -> bool:
    """Whether any training camera of a loaded pipeline has lens distortion (its raw photos are undistorted by
    :func:`load_training_views`)."""
    dataset = getattr(getattr(pipeline, "datamanager", None), "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        return False
    params = raw_dataset_cameras(dataset).distortion_params
    return params is not None and any(is_distorted(row.numpy()) for row in params.reshape(-1, params.shape[-1]))


def camera_distance_scale(train_c2w: Tensor) -> float:
    """The scene's camera-distance scale: median distance of the training camera centres to the scene origin.

    nerfstudio's dataparsers centre the scene on the origin (blender scenes are built around it; the
    nerfstudio dataparser re-centres the poses), so this is how far the cameras typically are from what they
    look at, in scene units. Protocol translations with ``reference: camera_distance`` are multiples of it.

    Args:
        train_c2w: ``[N, 3|4, 4]`` training camera-to-world poses, scene frame.

    Returns:
        the median distance (positive float).
    """
    if train_c2w.ndim != 3 or train_c2w.shape[0] == 0:
        raise GslocError("cannot compute the camera-distance scale without training cameras")
    dist = torch.linalg.norm(train_c2w[:, :3, 3].double(), dim=-1)
    scale = float(torch.quantile(dist, 0.5))
    if not math.isfinite(scale) or scale <= 0:
        raise GslocError("training cameras all sit at the scene origin; cannot define a camera-distance scale")
    return scale


@dataclass
class MapView:
    """A view of the map: features with their 3D points, and the camera they were seen from.

    Attributes:
        features: SIFT features of the kept keypoints (pixels of this view).
        points: ``[N, 3]`` world points of those keypoints (scene frame).
        c2w: ``[3, 4]`` OpenGL camera-to-world pose of the view.
        K: ``[3, 3]`` intrinsics of the view (``None`` only for maps saved before it was recorded).
        width, height: image size of the view.
        source: ``"train"`` (a real training photo) or ``"rendered"`` (the model rendered at a jittered pose).
        name: the training image's name, or ``"rendered:<i>:<training view>"``.
        median_depth: median rendered z-depth of the view's opaque pixels (scene units; 0 when nothing is opaque).
    """

    features: Features
    points: Tensor
    c2w: Tensor
    K: Optional[Tensor] = None
    width: int = 0
    height: int = 0
    source: ViewSource = "train"
    name: str = ""
    median_depth: float = 0.0


def depth_edge_mask(depth: Tensor, tolerance: float) -> Tensor:
    """``[H, W]`` bool: True where the 3x3 neighbourhood's depth varies by more than ``tolerance`` (relative to its
    minimum), including pixels next to missing (``<= 0``) depth, where the rendered surface ends."""
    d = F.pad(depth.clamp_min(0.0)[None, None], (1, 1, 1, 1), mode="replicate")
    high = F.max_pool2d(d, 3, stride=1)[0, 0]
    low = -F.max_pool2d(-d, 3, stride=1)[0, 0]
    return (high - low) > tolerance * low.clamp_min(1e-9)


def build_map_view(model, view: TrainingView, features: SiftFeatures, depth_edge_tolerance: float,
                   alpha_threshold: float = 0.5, source: ViewSource = "train",
                   depth: Optional[Tensor] = None, alpha: Optional[Tensor] = None) -> MapView:
    """Detect features on ``view.image`` and lift them with the model's depth at ``view.c2w``.

    Args:
        model: the trained scene (renders the depth when ``depth`` is not given).
        view: image, intrinsics and pose.
        features: the SIFT detector.
        depth_edge_tolerance: keypoints whose 3x3 depth neighbourhood varies by more than this fraction are dropped.
        alpha_threshold: keypoints on pixels less opaque than this are dropped.
        source: recorded in the :class:`MapView`.
        depth, alpha: ``[H, W]`` render of ``view`` when already at hand (rendered views).
    """
    height, width = view.image.shape[:2]
    if depth is None or alpha is None:
        with torch.no_grad():
            rendered = render_splat_model(model, view.c2w[None], view.K[None], width, height)
            depth, alpha = rendered.depth[0, ..., 0].cpu(), rendered.alpha[0, ..., 0].cpu()
    feats = features.detect(view.image)
    points, valid = lift_keypoints(feats.kpts, depth, view.K, view.c2w, alpha=alpha, alpha_threshold=alpha_threshold)
    if len(feats) and depth_edge_tolerance > 0:
        edges = depth_edge_mask(depth, depth_edge_tolerance)
        col = feats.kpts[:, 0].floor().long().clamp(0, width - 1)
        row = feats.kpts[:, 1].floor().long().clamp(0, height - 1)
        valid = valid & ~edges[row, col]
    opaque = depth[(alpha >= alpha_threshold) & (depth > 0)]
    median_depth = float(opaque.median()) if opaque.numel() else 0.0
    kept = Features(feats.kpts[valid], feats.desc[valid], None if feats.response is None else feats.response[valid])
    return MapView(kept, points[valid], view.c2w.clone(), view.K.clone(), int(width), int(height), source, view.name,
                   median_depth)


def jittered_poses(c2w: Tensor, target_depth: Tensor, count: int, orbit_deg: float, distance_range: tuple,
                   roll_deg: float, generator: torch.Generator) -> Tensor:
    """Camera poses around given cameras: orbited about what they look at, moved closer/farther, rolled.

    For camera ``i`` the target is ``centre + target_depth[i] * forward``. A new camera is the old one rotated
    about the target by an angle ``U[orbit_deg / 3, orbit_deg]`` about a random axis perpendicular to the viewing
    direction (so the target stays in view), its distance to the target scaled log-uniformly within
    ``distance_range``, and rolled about its own viewing axis by ``U[-roll_deg, roll_deg]``.

    Args:
        c2w: ``[N, 3, 4]`` OpenGL camera-to-world poses (``forward = -z``).
        target_depth: ``[N]`` distance to the looked-at point along the optical axis (``<= 0``: that camera is
            skipped).
        count: new poses per usable camera.
        orbit_deg, distance_range, roll_deg: see above.
        generator: CPU generator (the poses are a pure function of it).

    Returns:
        ``[M, 3, 4]`` float32 poses, ``M = count * (number of usable cameras)``, ordered by camera then draw, and
        ``[M]`` long index of the camera each pose came from.
    """
    out, parents = [], []
    low, high = math.log(distance_range[0]), math.log(distance_range[1])
    for i in range(c2w.shape[0]):
        depth = float(target_depth[i])
        if not depth > 0:
            continue
        rot, centre = c2w[i, :, :3].double(), c2w[i, :, 3].double()
        forward = -rot[:, 2]
        target = centre + depth * forward
        for _ in range(count):
            # A random axis perpendicular to the viewing direction: orbiting about it keeps the target in view.
            in_plane = torch.rand((), generator=generator, dtype=torch.float64) * 2 * math.pi
            axis = torch.cos(in_plane) * rot[:, 0] + torch.sin(in_plane) * rot[:, 1]
            angle = math.radians(orbit_deg) * float(1.0 / 3.0 + (2.0 / 3.0) * torch.rand((), generator=generator, dtype=torch.float64))
            orbit = axis_angle_to_rotation_matrix((axis * angle)[None])[0]
            scale = math.exp(low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64)))
            roll = math.radians(roll_deg) * float(2.0 * torch.rand((), generator=generator, dtype=torch.float64) - 1.0)
            new_rot = orbit @ rot
            spin = axis_angle_to_rotation_matrix((new_rot[:, 2] * roll)[None])[0]  # about the new viewing axis
            new_rot = spin @ new_rot
            new_centre = target + scale * (orbit @ (centre - target))
            out.append(torch.cat([new_rot, new_centre[:, None]], dim=1).float())
            parents.append(i)
    if not out:
        return torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long)
    return torch.stack(out), torch.tensor(parents, dtype=torch.long)


def between_poses(c2w: Tensor, target_depth: Tensor, count: int, neighbours: int, overshoot: float,
                  generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Camera poses *between* neighbouring cameras: where a query taken like the training photos would be.

    Each pose picks a camera ``i``, one of its ``neighbours`` nearest cameras ``j`` (camera centres) and
    ``u ~ U[-overshoot, 1 + overshoot]``, and interpolates the two cameras as orbits: the looked-at point
    (``centre + target_depth * forward``) linearly, the rotation along the geodesic from ``R_i`` to ``R_j``, the
    distance to the looked-at point geometrically; the camera sits that far behind the point along its own view.
    Unlike :func:`jittered_poses` it keeps the capture's distance and roll, so its views stay on the manifold of
    the training cameras (on an object orbit, the sphere they lie on).

    Args:
        c2w: ``[N, 3, 4]`` OpenGL camera-to-world poses (``forward = -z``).
        target_depth: ``[N]`` distance to the looked-at point (``<= 0``: that camera is not used).
        count: number of poses.
        neighbours: ``j`` is drawn from this many nearest usable cameras of ``i``.
        overshoot: how far past either camera ``u`` may go (fraction of the pair's gap).
        generator: CPU generator (the poses are a pure function of it).

    Returns:
        ``[count, 3, 4]`` float32 poses (fewer than two usable cameras: none) and ``[count]`` long index of ``i``.
    """
    usable = torch.nonzero(target_depth > 0).flatten()
    if usable.numel() < 2 or count <= 0:
        return torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long)
    rot, centre, depth = c2w[usable, :, :3].double(), c2w[usable, :, 3].double(), target_depth[usable].double()
    target = centre - depth[:, None] * rot[:, :, 2]
    gaps = torch.cdist(centre, centre)
    gaps.fill_diagonal_(math.inf)
    near = gaps.topk(min(neighbours, usable.numel() - 1), dim=1, largest=False).indices  # [n, k]
    i = torch.randint(usable.numel(), (count,), generator=generator)
    j = near[i, torch.randint(near.shape[1], (count,), generator=generator)]
    u = (-overshoot + (1.0 + 2.0 * overshoot) * torch.rand(count, generator=generator, dtype=torch.float64))[:, None]
    relative = rotation_matrix_to_axis_angle(rot[i].transpose(1, 2) @ rot[j])  # [count, 3], angle < pi
    new_rot = rot[i] @ axis_angle_to_rotation_matrix(relative * u)
    new_depth = depth[i] ** (1.0 - u[:, 0]) * depth[j] ** u[:, 0]
    new_centre = target[i] + u * (target[j] - target[i]) + new_depth[:, None] * new_rot[:, :, 2]
    return torch.cat([new_rot, new_centre[:, :, None]], dim=2).float(), usable[i]


def build_rendered_view(model, c2w: Tensor, K: Tensor, width: int, height: int, features: SiftFeatures,
                        depth_edge_tolerance: float, name: str, alpha_threshold: float = 0.5) -> MapView:
    """Render the model at ``c2w [3, 4]`` (``K [3, 3]``, ``width`` x ``height``) and map the render's features."""
    with torch.no_grad():
        rendered = render_splat_model(model, c2w[None], K[None], width, height)
    image = rendered.rgb[0].cpu().float().contiguous()
    view = TrainingView(name, image, K.float().cpu(), c2w.float().cpu())
    return build_map_view(model, view, features, depth_edge_tolerance, alpha_threshold, source="rendered",
                          depth=rendered.depth[0, ..., 0].cpu(), alpha=rendered.alpha[0, ..., 0].cpu())
