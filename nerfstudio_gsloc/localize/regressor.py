"""A scene-specific network that localizes one image in one forward pass (implicit geometry + rigid alignment).

After "Implicit Learning of Scene Geometry from Poses for Global Localization" (Altillawi et al., arXiv
2312.02029): for a grid of pixels the network predicts each pixel's 3D point twice, in the **camera frame** and in
the **scene frame**, with a weight; the camera pose is the weighted rigid alignment of the two point sets
(:mod:`~nerfstudio_gsloc.localize.rigid_alignment`), differentiable end to end. Here it is trained from the
Gaussian scene itself (:mod:`~nerfstudio_gsloc.localize.regressor_training`), which renders exact depth.

Conventions and shapes:

* input: ``[B, 3, H_in, W_in]`` colours in ``[0, 1]`` (query images are resized to the training input size);
* output grid: stride 8, ``h = H_in / 8``, ``w = W_in / 8``; grid cell ``(i, j)`` stands for the query pixel at
  ``((j + 0.5) W / w, (i + 0.5) H / h)`` (pixel centres at ``+0.5``, the convention of ``K``);
* camera-frame points are predicted as a **z-depth along each cell's ray** (OpenCV camera frame: x right, y down,
  z forward): ``P_c = d K^-1 [u, v, 1]``, so they always lie on the pixel's ray; a query whose focal length (in
  input pixels) differs from the training camera's gets its depths scaled by the ratio (same apparent size);
* scene-frame points ``X`` are in the scene (dataparser) frame; ``[R | t]`` aligning ``P_c`` onto ``X`` is the
  OpenCV camera-to-world pose, returned as nerfstudio's OpenGL camera-to-world ``[3, 4]``.

A regressor may hold several networks trained side by side from different seeds (``--training.members``, an
ensemble): each predicts its point pairs and weights, and one weighted alignment of all of them gives the pose.

Depth scale: the camera-frame depths are multiplied by ``regressor.json``'s ``depth_scale`` (1 when absent), a
factor calibrated on the training photos once the networks are trained
(:func:`~nerfstudio_gsloc.localize.regressor_training.calibrate_depth_scale`).

Weights and metadata live beside the run (:mod:`~nerfstudio_gsloc.localize.regressor_files`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nerfstudio_gsloc.camera_conventions import opencv_c2w_to_opengl_c2w
from nerfstudio_gsloc.localize.rigid_alignment import alignment_confidence, alignment_residuals, robust_rigid_alignment

STRIDE = 8
#: Network bodies (see :class:`SceneRegressorNet`); the one list of their names.
Architecture = Literal["plain", "compact"]
ARCHITECTURES = get_args(Architecture)


@dataclass
class RegressorNetConfig:
    """Shape of the network and the scene normalisation it predicts in (saved with the weights)."""

    input_height: int = 128
    input_width: int = 128
    """Network input size (multiples of 8); every image is resized to it."""
    channels: Tuple[int, int, int] = (32, 64, 128)
    """Channels at strides 2, 4 and 8."""
    architecture: Architecture = "plain"
    """``plain``: two 3x3 convolutions per stride, full-width residual blocks at stride 8; ``compact``: one
    (strided) convolution at strides 2 and 4 and bottleneck residual blocks, half the arithmetic (see
    :class:`SceneRegressorNet`). Weights saved before this option existed are ``plain``."""
    center: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Scene-frame centre of the training views' visible points: scene points are ``center + scale * output``."""
    scale: float = 1.0
    """RMS distance of those points to ``center`` (scene units)."""
    depth_ref: float = 1.0
    """Median depth of the training views: depths are ``depth_ref * exp(output)``."""
    focal_input: float = 1.0
    """The training camera's focal length in input pixels (a query's depths are scaled by its own over this)."""


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3, dilation: int = 1) -> nn.Module:
    """Convolution (no bias), batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2),
                                   dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """``x + relu(conv(x))`` with a dilated 3x3 convolution: a wide receptive field at stride 8, cheaply."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(self.norm(self.conv(x)))


class _Bottleneck(nn.Module):
    """``x + relu(expand(conv(reduce(x))))``: the dilated 3x3 convolution at half the channels between two 1x1
    ones, about a third of :class:`_Residual`'s arithmetic."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        mid = max(1, channels // 2)
        self.reduce = _conv(channels, mid, kernel=1)
        self.conv = _conv(mid, mid, dilation=dilation)
        self.expand = nn.Conv2d(mid, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(self.norm(self.expand(self.conv(self.reduce(x)))))


class SceneRegressorNet(nn.Module):
    """Fully convolutional: image ``[B, 3, H_in, W_in]`` -> per cell of the stride-8 grid a depth, a scene point
    and a weight logit (see the module docstring).

    Body (``config.architecture``): ``plain`` has two 3x3 convolutions at strides 2, 4 and 8 and three full-width
    dilated residual blocks (dilations 2, 4, 8) at stride 8; ``compact`` keeps only the strided convolution at
    strides 2 and 4 and makes the residual blocks bottlenecks. On a 128x128 input ``compact`` is about 125 million
    multiply-adds per image against 270 million, and trains 1.8x as fast per step on an AVX2 CPU; the
    receptive field at stride 8 stays over 100 input pixels wide.
    """

    def __init__(self, config: RegressorNetConfig) -> None:
        super().__init__()
        if config.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown regressor architecture {config.architecture!r}; one of {ARCHITECTURES}")
        self.config = config
        c1, c2, c3 = config.channels
        if config.architecture == "plain":
            layers = [_conv(3, c1, 2), _conv(c1, c1), _conv(c1, c2, 2), _conv(c2, c2), _conv(c2, c3, 2),
                      _conv(c3, c3), _Residual(c3, 2), _Residual(c3, 4), _Residual(c3, 8)]
        else:
            layers = [_conv(3, c1, 2), _conv(c1, c2, 2), _conv(c2, c3, 2), _conv(c3, c3),
                      _Bottleneck(c3, 2), _Bottleneck(c3, 4), _Bottleneck(c3, 8)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(c3, c3, 1), nn.ReLU(inplace=True), nn.Conv2d(c3, 5, 1))
        self.register_buffer("center", torch.tensor(config.center, dtype=torch.float32), persistent=False)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Args: ``images [B, 3, H_in, W_in]`` in ``[0, 1]``.

        Returns:
            ``depth [B, h, w]`` (scene units, training focal length), ``points [B, h, w, 3]`` (scene frame) and
            ``logits [B, h, w]`` (the alignment weight is their sigmoid).
        """
        features = self.body(images - 0.5)
        with torch.autocast("cpu", enabled=False):  # the heads stay float32 under bfloat16 training (see training)
            out = self.head(features.float()).permute(0, 2, 3, 1)
        depth = self.config.depth_ref * torch.exp(out[..., 0].clamp(-5.0, 5.0))
        points = self.center + self.config.scale * out[..., 1:4]
        return depth, points, out[..., 4]


def grid_size(config: RegressorNetConfig) -> Tuple[int, int]:
    """``(h, w)`` of the output grid."""
    return config.input_height // STRIDE, config.input_width // STRIDE


def grid_rays(K: Tensor, width: int, height: int, grid: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Pixels and OpenCV camera rays of the grid cells of a ``width x height`` image with intrinsics ``K [3, 3]``.

    Returns:
        ``pixels [h, w, 2]`` (x, y; centres at +0.5) and ``rays [h, w, 3]`` with ``z = 1``.
    """
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * (height / h)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * (width / w)
    v, u = torch.meshgrid(ys, xs, indexing="ij")
    K = K.float().cpu()
    rays = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], dim=-1)
    return torch.stack([u, v], dim=-1), rays


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """``[H, W, 3]`` (or ``[B, H, W, 3]``) in ``[0, 1]`` -> ``[B, 3, height, width]`` (antialiased bilinear)."""
    batch = image if image.ndim == 4 else image[None]
    x = batch.permute(0, 3, 1, 2).float()
    if x.shape[-2:] == (height, width):
        return x.contiguous()
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@dataclass
class RegressorPrediction:
    """The network's pose of one query and what it rests on.

    Attributes:
        c2w: ``[3, 4]`` OpenGL camera-to-world pose, scene frame.
        confidence: :func:`~nerfstudio_gsloc.localize.rigid_alignment.alignment_confidence` of the alignment.
        weights: ``[N]`` the networks' weights (sigmoid of the logits), ``N = members x h x w`` (member-major).
        residuals: ``[N]`` alignment residuals (scene units).
        seconds: time of the forward pass and the alignment (resizing included).
    """

    c2w: Tensor
    confidence: float
    weights: Tensor
    residuals: Tensor
    seconds: float


@dataclass
class RegressorInference:
    """How a pose is computed from the network's outputs."""

    rounds: int = 0
    """Reweighting rounds of the robust alignment after the weighted one (0: the weighted alignment the network
    was trained through; on lego, 3 rounds gave 60% against 70% at (10 deg, 0.1))."""
    confidence_tolerance: float = 0.03
    """A point pair agrees with the pose when its residual is within this fraction of the median depth."""
    full_support: float = 24.0
    """Weight mass of agreeing pairs (per network of an ensemble) at which the confidence's coverage factor
    reaches 1."""
    refine_px: float = 0.0
    """When > 0: after the alignment, Levenberg-Marquardt on the reprojection error of the predicted scene points
    (cells with weight above 0.5) that reproject within this many query pixels (the ``pnp`` method's
    ``refine_on_tight_inliers``); it removes the error of the predicted depths from the pose. 0: alignment only."""


class SceneRegressor:
    """One or more trained :class:`SceneRegressorNet` s ready to localize query images (CPU, no gradient).

    Args:
        nets: the network, or the members of an ensemble (same input size and scene normalisation; put in eval
            mode).
        meta: the contents of ``regressor.json``.
        inference: pose computation settings.
    """

    def __init__(self, nets: Union[SceneRegressorNet, Sequence[SceneRegressorNet]], meta: Optional[Dict[str, Any]] = None,
                 inference: Optional[RegressorInference] = None) -> None:
        self.nets: List[SceneRegressorNet] = [n.eval() for n in ([nets] if isinstance(nets, nn.Module) else nets)]
        if not self.nets or any(n.config != self.nets[0].config for n in self.nets[1:]):
            raise ValueError("a regressor needs at least one network, and its members one input size and scene frame")
        self.meta = dict(meta or {})
        self.inference = inference or RegressorInference()
        self.depth_scale = float(self.meta.get("depth_scale", 1.0))

    @property
    def config(self) -> RegressorNetConfig:
        return self.nets[0].config

    @torch.no_grad()
    def point_pairs(self, image: Tensor, K: Tensor, depth_scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, float]:
        """Every network's cells for one image (member-major, ``N = members x h x w``).

        Args:
            image: ``[H, W, 3]`` colours in ``[0, 1]``; K: ``[3, 3]`` its intrinsics (pixels).
            depth_scale: factor on the predicted depths (default: the regressor's :attr:`depth_scale`).

        Returns:
            camera-frame points ``[N, 3]``, scene points ``[N, 3]``, weights ``[N]`` (float64) and the median
            predicted depth.
        """
        cfg = self.config
        height, width = int(image.shape[0]), int(image.shape[1])
        net_input = resize_image(image.cpu(), cfg.input_height, cfg.input_width)
        _, rays = grid_rays(K, width, height, grid_size(cfg))
        scale = self.depth_scale if depth_scale is None else depth_scale
        focal_ratio = float(K[0, 0]) * cfg.input_width / width / cfg.focal_input * scale
        cams, scene_points, weights, depths = [], [], [], []
        for net in self.nets:
            depth, points, logits = net(net_input)
            cams.append(((depth[0] * focal_ratio)[..., None] * rays).reshape(-1, 3))  # on each cell's ray
            scene_points.append(points.reshape(-1, 3))
            weights.append(torch.sigmoid(logits).reshape(-1))
            depths.append(depth.reshape(-1))
        return (torch.cat(cams).double(), torch.cat(scene_points).double(), torch.cat(weights).double(),
                float(torch.cat(depths).median()))

    def tolerance(self, median_depth: float) -> float:
        """Residual (scene units) within which a point pair agrees with the pose, for predicted depths of this median."""
        return self.inference.confidence_tolerance * median_depth

    def align(self, src: Tensor, dst: Tensor, weights: Tensor, median_depth: float) -> Tuple[Tensor, Tensor]:
        """The pose of batched point pairs (``src, dst [B, N, 3]``, ``weights [B, N]``) as :meth:`predict` computes
        it: ``R [B, 3, 3]`` and ``t [B, 3]`` of the OpenCV camera-to-world pose (``t`` is the camera centre)."""
        R, t, _ = robust_rigid_alignment(src, dst, weights, rounds=self.inference.rounds,
                                         min_scale=0.25 * self.tolerance(median_depth))
        return R, t

    @torch.no_grad()
    def predict(self, image: Tensor, K: Tensor) -> RegressorPrediction:
        """Localize one image: every network's point pairs and weights, then one weighted alignment of them all.

        Args:
            image: ``[H, W, 3]`` colours in ``[0, 1]``.
            K: ``[3, 3]`` its intrinsics (pixels).
        """
        started = time.perf_counter()
        src, dst, weights, median_depth = self.point_pairs(image, K)
        src, dst, weights = src[None], dst[None], weights[None]
        R, t = self.align(src, dst, weights, median_depth)
        residuals = alignment_residuals(R, t, src, dst)
        confidence = alignment_confidence(residuals, weights, self.tolerance(median_depth),
                                          self.inference.full_support * len(self.nets))
        c2w = opencv_c2w_to_opengl_c2w(torch.cat([R[0], t[0, :, None]], dim=1))
        if self.inference.refine_px > 0:
            c2w = self._refine(c2w, dst[0], weights[0], K, int(image.shape[1]), int(image.shape[0]))
        c2w = c2w.float()
        return RegressorPrediction(c2w, float(confidence[0]), weights[0].float(), residuals[0].float(),
                                   time.perf_counter() - started)

    def _refine(self, c2w: Tensor, points: Tensor, weights: Tensor, K: Tensor, width: int, height: int) -> Tensor:
        """``c2w [3, 4]`` refined on the reprojection error of the trusted ``points [N, 3]`` (member-major, as
        :meth:`predict` stacks them; see ``refine_px``)."""
        from nerfstudio_gsloc.localize.absolute_pose import refine_on_tight_inliers

        pixels, _ = grid_rays(K, width, height, grid_size(self.config))
        pixels = pixels.reshape(-1, 2).double().repeat(len(self.nets), 1)
        trusted = weights > 0.5
        refined, _ = refine_on_tight_inliers(points.double()[trusted], pixels[trusted],
                                             K.double().cpu(), c2w.double(), self.inference.refine_px, min_inliers=12)
        return refined[:3, :4]
