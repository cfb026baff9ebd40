"""2D-2D feature matching (iComMa / coarse initialisation); lifting of matches to 3D and PnP + RANSAC are in
:mod:`~nerfstudio_gsloc.localize.absolute_pose`.

Keypoint convention: every keypoint returned or accepted here is ``(x, y)`` in pixels of the image it belongs
to, with the centre of pixel ``(col, row)`` at ``(col + 0.5, row + 0.5)`` (the gsplat/intrinsics convention of
this project). kornia detectors use integer pixel centres, so their keypoints are shifted by ``+0.5`` (and
scaled back when images are upsampled before detection).

Matchers:

* ``sift``: kornia DoG scale-space SIFT (RootSIFT descriptors), symmetric mutual-nearest-neighbour matching
  with Lowe's ratio test. Needs no weights. Small images (100-200 px renders) give few keypoints, so images
  are upsampled by ``MatcherConfig.upsample`` first.
* ``disk_lightglue``: kornia DISK features matched by kornia LightGlue.
* ``loftr``: kornia LoFTR (detector-free).

The learned matchers load weights **only** from local files named in :class:`MatcherConfig`; nothing is ever
downloaded, and a missing file is a :class:`~nerfstudio_gsloc.errors.GslocError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Protocol, Tuple, runtime_checkable

import kornia
import kornia.feature as KF
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nerfstudio_gsloc.errors import GslocError

MatcherKind = Literal["sift", "disk_lightglue", "loftr"]


@dataclass
class MatcherConfig:
    """Configuration of a 2D-2D matcher."""

    kind: MatcherKind = "sift"
    """Which matcher to build."""
    weights_path: Optional[Path] = None
    """Local weights: the DISK checkpoint for ``disk_lightglue`` (a state dict, optionally under ``"extractor"``),
    the LoFTR checkpoint for ``loftr`` (optionally under ``"state_dict"``). Unused by ``sift``."""
    lightglue_weights_path: Optional[Path] = None
    """Local LightGlue-for-DISK checkpoint (e.g. ``disk_lightglue.pth``), only for ``disk_lightglue``."""
    max_keypoints: int = 2048
    """Maximum keypoints per image (SIFT, DISK) or matches kept (LoFTR, highest confidence first)."""
    upsample: float = 2.0
    """Images are resized by this factor before detection/matching; keypoints are mapped back."""
    ratio_threshold: float = 0.8
    """Lowe ratio threshold of the SIFT symmetric mutual-nearest-neighbour matching."""
    min_confidence: float = 0.2
    """Minimum match confidence for LightGlue (its filter threshold) and LoFTR."""
    upright: bool = False
    """SIFT without orientation assignment (slightly more matches when query and render are nearly aligned)."""
    device: str = "cpu"
    """Device the matcher runs on; results come back on the device of ``image0``."""


@dataclass
class Matches:
    """Correspondences between two images, keypoints in the module's pixel-centre ``+0.5`` convention."""

    kpts0: Tensor
    """``[M, 2]`` float32 ``(x, y)`` in image0."""
    kpts1: Tensor
    """``[M, 2]`` float32 ``(x, y)`` in image1."""
    scores: Tensor
    """``[M]`` float32 match quality in ``[0, 1]``, higher is better (SIFT: 1 - distance ratio)."""

    def __len__(self) -> int:
        return int(self.kpts0.shape[0])


@runtime_checkable
class Matcher(Protocol):
    """Anything that matches two images."""

    def match(self, image0: Tensor, image1: Tensor) -> Matches:
        """Match ``image0 [H, W, 3]`` and ``image1 [H', W', 3]`` (float in ``[0, 1]``)."""
        ...


def _to_bchw(image: Tensor, device: torch.device) -> Tensor:
    """``[H, W, 3|1]`` or ``[H, W]`` float image -> ``[1, C, H, W]`` float32 on ``device``."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image of shape [H, W, 3] or [H, W, 1], got {tuple(image.shape)}")
    return image.detach().to(device=device, dtype=torch.float32).permute(2, 0, 1)[None].clamp(0.0, 1.0)


def resize_image(image: Tensor, factor: float) -> Tuple[Tensor, float, float]:
    """Resize ``[1, C, H, W]`` by ``factor``; returns the image and the exact x/y scale factors used."""
    height, width = image.shape[-2:]
    new_h, new_w = max(1, int(round(height * factor))), max(1, int(round(width * factor)))
    if (new_h, new_w) == (height, width):
        return image, 1.0, 1.0
    resized = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=factor < 1)
    return resized, new_w / width, new_h / height


def keypoints_to_original(kpts: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """kornia keypoints (integer pixel centres) in a resized image -> ``+0.5`` convention in the original image.

    With ``align_corners=False`` resizing, resized pixel ``i`` has its centre at ``(i + 0.5) / scale`` in the
    original image's continuous coordinates.
    """
    scale = torch.tensor([scale_x, scale_y], dtype=kpts.dtype, device=kpts.device)
    return (kpts + 0.5) / scale


def _empty_matches(device: torch.device) -> Matches:
    return Matches(
        kpts0=torch.zeros(0, 2, device=device),
        kpts1=torch.zeros(0, 2, device=device),
        scores=torch.zeros(0, device=device),
    )


class SiftMatcher:
    """kornia SIFT + symmetric mutual nearest neighbours with Lowe's ratio test."""

    def __init__(self, config: MatcherConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        # The "pyramid" backend shares the Gaussian scale space between detection and description: several times
        # faster on CPU than extracting 41x41 patches.
        self.feature = KF.SIFTFeatureScaleSpace(
            num_features=config.max_keypoints,
            upright=config.upright,
            rootsift=True,
            device=self.device,
            descriptor_backend="pyramid",
        ).eval()

    def _detect(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        img = _to_bchw(image, self.device)
        gray = kornia.color.rgb_to_grayscale(img) if img.shape[1] == 3 else img
        gray, sx, sy = resize_image(gray, self.config.upsample)
        lafs, responses, descs = self.feature(gray)
        keep = responses[0] > 0  # drop padding entries of images with few extrema
        kpts = keypoints_to_original(KF.get_laf_center(lafs)[0], sx, sy)
        return kpts[keep], descs[0][keep]

    @torch.inference_mode()
    def match(self, image0: Tensor, image1: Tensor) -> Matches:
        """Match two images. See :class:`Matcher`."""
        kpts0, desc0 = self._detect(image0)
        kpts1, desc1 = self._detect(image1)
        if kpts0.shape[0] < 2 or kpts1.shape[0] < 2:
            return _empty_matches(image0.device)
        dists, idxs = KF.match_smnn(desc0, desc1, th=self.config.ratio_threshold)
        return Matches(
            kpts0=kpts0[idxs[:, 0]].float().to(image0.device),
            kpts1=kpts1[idxs[:, 1]].float().to(image0.device),
            scores=(1.0 - dists[:, 0]).clamp(0.0, 1.0).float().to(image0.device),
        )


def _require_file(path: Optional[Path], what: str, field: str) -> Path:
    """Check a weights file exists locally (nothing is ever downloaded)."""
    if path is None:
        raise GslocError(f"{what} weights are required: set {field} to a local checkpoint file (nothing is downloaded)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise GslocError(f"{what} weights file not found: {path}")
    return path


def _load_state_dict(path: Path, what: str, nested_key: str) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; unwrap ``nested_key`` when present."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling/IO failure is a bad user file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GslocError(f"could not load {what} weights from {path}: {first_line}") from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(nested_key), dict):
        checkpoint = checkpoint[nested_key]
    if not isinstance(checkpoint, dict):
        raise GslocError(f"{what} weights file {path} does not contain a state dict")
    return checkpoint


def _load_into(module: nn.Module, state_dict: Dict[str, Any], path: Path, what: str) -> None:
    """Load learned parameters strictly (derived buffers may be absent), as one clear error on mismatch."""
    try:
        incompatible = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise GslocError(f"{what} weights file {path} does not match the model: {str(err).splitlines()[0]}") from err
    params = dict(module.named_parameters())
    missing = [key for key in incompatible.missing_keys if key in params]
    if missing or incompatible.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {list(incompatible.unexpected_keys)[:3]}"
        raise GslocError(f"{what} weights file {path} does not match the model ({detail})")


class DiskLightGlueMatcher:
    """kornia DISK keypoints/descriptors matched by kornia LightGlue, both from local weight files."""

    def __init__(self, config: MatcherConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        disk_path = _require_file(config.weights_path, "DISK", "weights_path")
        lightglue_path = _require_file(config.lightglue_weights_path, "LightGlue", "lightglue_weights_path")
        self.disk = KF.DISK()
        _load_into(self.disk, _load_state_dict(disk_path, "DISK", "extractor"), disk_path, "DISK")
        # features=None with weights=None builds the network without kornia fetching anything; input_dim=128 is the
        # DISK descriptor size (kornia's "disk" preset).
        self.lightglue = KF.LightGlue(None, input_dim=128, weights=None, filter_threshold=config.min_confidence)
        state = _load_state_dict(lightglue_path, "LightGlue", "state_dict")
        # The released checkpoints name the attention blocks "self_attn.<i>"; kornia nests them in "transformers.<i>".
        renamed = {}
        for key, value in state.items():
            for i in range(self.lightglue.conf.n_layers):
                key = key.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
                key = key.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
            renamed[key] = value
        _load_into(self.lightglue, renamed, lightglue_path, "LightGlue")
        self.disk.to(self.device).eval()
        self.lightglue.to(self.device).eval()

    def _detect(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, float, float]:
        img = _to_bchw(image, self.device)
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        img, sx, sy = resize_image(img, self.config.upsample)
        feats = self.disk(img, n=self.config.max_keypoints, pad_if_not_divisible=True)[0]
        size = torch.tensor([[img.shape[-1], img.shape[-2]]], device=self.device)
        return feats.keypoints, feats.descriptors, size, sx, sy

    @torch.inference_mode()
    def match(self, image0: Tensor, image1: Tensor) -> Matches:
        """Match two images. See :class:`Matcher`."""
        kp0, desc0, size0, sx0, sy0 = self._detect(image0)
        kp1, desc1, size1, sx1, sy1 = self._detect(image1)
        if kp0.shape[0] == 0 or kp1.shape[0] == 0:
            return _empty_matches(image0.device)
        out = self.lightglue(
            {
                "image0": {"keypoints": kp0[None], "descriptors": desc0[None], "image_size": size0},
                "image1": {"keypoints": kp1[None], "descriptors": desc1[None], "image_size": size1},
            }
        )
        pairs, scores = out["matches"][0], out["scores"][0]
        return Matches(
            kpts0=keypoints_to_original(kp0[pairs[:, 0]], sx0, sy0).float().to(image0.device),
            kpts1=keypoints_to_original(kp1[pairs[:, 1]], sx1, sy1).float().to(image0.device),
            scores=scores.float().to(image0.device),
        )


class LoftrMatcher:
    """kornia LoFTR from a local checkpoint."""

    def __init__(self, config: MatcherConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        path = _require_file(config.weights_path, "LoFTR", "weights_path")
        self.loftr = KF.LoFTR(pretrained=None)
        _load_into(self.loftr, _load_state_dict(path, "LoFTR", "state_dict"), path, "LoFTR")
        # eval() matters: in training mode kornia's coarse matching expects ground-truth supervision.
        self.loftr.to(self.device).eval()

    @torch.inference_mode()
    def match(self, image0: Tensor, image1: Tensor) -> Matches:
        """Match two images. See :class:`Matcher`."""
        grays = []
        scales = []
        for image in (image0, image1):
            img = _to_bchw(image, self.device)
            gray = kornia.color.rgb_to_grayscale(img) if img.shape[1] == 3 else img
            gray, sx, sy = resize_image(gray, self.config.upsample)
            grays.append(gray)
            scales.append(torch.tensor([sx, sy], device=self.device))
        out = self.loftr({"image0": grays[0], "image1": grays[1]})
        conf = out["confidence"]
        keep = torch.nonzero(conf >= self.config.min_confidence)[:, 0]
        keep = keep[torch.argsort(conf[keep], descending=True)[: self.config.max_keypoints]]
        # LoFTR keypoints already put pixel centres at +0.5 (kornia documents this), so only the resize is undone.
        return Matches(
            kpts0=(out["keypoints0"][keep] / scales[0]).float().to(image0.device),
            kpts1=(out["keypoints1"][keep] / scales[1]).float().to(image0.device),
            scores=conf[keep].float().to(image0.device),
        )


def make_matcher(config: MatcherConfig) -> Matcher:
    """Build the matcher named by ``config.kind``.

    Raises:
        GslocError: unknown kind, or missing/unloadable weights for ``disk_lightglue`` / ``loftr``.
    """
    if config.upsample <= 0:
        raise GslocError(f"matcher upsample must be > 0, got {config.upsample}")
    if config.kind == "sift":
        return SiftMatcher(config)
    if config.kind == "disk_lightglue":
        return DiskLightGlueMatcher(config)
    if config.kind == "loftr":
        return LoftrMatcher(config)
    raise GslocError(f"unknown matcher kind {config.kind!r} (choose sift, disk_lightglue or loftr)")
