"""SIFT features with detection separate from matching (a map can be cached), optionally differentiable.

Used by the ``pnp`` localizer (a map of the training views) and by ``icomma`` (keypoints detected on the render
keep the autograd graph to the image). Keypoints are ``(x, y)`` with pixel centres at ``+0.5``, the project's
convention (see :mod:`nerfstudio_gsloc.localize.matching`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import kornia
import kornia.feature as KF
import torch
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.matching import MatcherConfig, SiftMatcher, keypoints_to_original, resize_image


@dataclass
class Features:
    """Keypoints and descriptors of one image.

    Attributes:
        kpts: ``[N, 2]`` ``(x, y)`` pixel positions (centres at ``+0.5``), in the original image's pixels.
        desc: ``[N, D]`` descriptors (RootSIFT, ``D = 128``).
        response: ``[N]`` detector response (absolute DoG), ``None`` when unknown.
    """

    kpts: Tensor
    desc: Tensor
    response: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.kpts.shape[0])


class SiftFeatures:
    """kornia SIFT with the same settings and keypoint convention as :class:`~nerfstudio_gsloc.localize.matching.SiftMatcher`.

    Unlike the matcher, detection and matching are separate calls, and :meth:`detect` can keep the autograd graph
    from the image to the keypoint positions (kornia refines each DoG extremum to sub-pixel accuracy by a
    quadratic fit of the response, which is differentiable in the image).
    """

    def __init__(self, config: MatcherConfig) -> None:
        if config.kind != "sift":
            raise GslocError(f"SiftFeatures needs a sift matcher config, got {config.kind!r}")
        self.config = config
        self._matcher = SiftMatcher(config)  # owns the kornia SIFT module configured like the matcher

    def detect(self, image: Tensor, differentiable: bool = False) -> Features:
        """Detect and describe.

        Args:
            image: ``[H, W, 3]`` float image in ``[0, 1]``.
            differentiable: keep the graph from ``image`` to the keypoint positions (descriptors are detached).

        Returns:
            :class:`Features` on ``image``'s device.
        """
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an image [H, W, 3], got {tuple(image.shape)}")
        context = torch.enable_grad() if differentiable else torch.inference_mode()
        with context:
            img = image.to(self._matcher.device, torch.float32).permute(2, 0, 1)[None]
            if not differentiable:
                img = img.detach()
            gray = kornia.color.rgb_to_grayscale(img.clamp(0.0, 1.0))
            gray, sx, sy = resize_image(gray, self.config.upsample)
            lafs, responses, descs = self._matcher.feature(gray)
            keep = responses[0] > 0  # kornia pads with zero-response entries when it finds few extrema
            kpts = keypoints_to_original(KF.get_laf_center(lafs)[0], sx, sy)[keep]
            desc = descs[0][keep].detach()
            response = responses[0][keep].detach()
        if not differentiable:
            kpts, desc, response = kpts.clone(), desc.clone(), response.clone()
        return Features(kpts=kpts.to(image.device), desc=desc.to(image.device), response=response.to(image.device))

    @staticmethod
    def strongest(features: Features, count: int) -> Features:
        """The ``count`` keypoints with the highest response (all when ``count <= 0`` or there are fewer)."""
        if count <= 0 or len(features) <= count:
            return features
        order = torch.argsort(features.response, descending=True)[:count] if features.response is not None else torch.arange(count)
        return Features(features.kpts[order], features.desc[order], None if features.response is None else features.response[order])

    @torch.no_grad()
    def match(self, feats0: Features, feats1: Features) -> Tuple[Tensor, Tensor]:
        """Symmetric mutual nearest neighbours with Lowe's ratio test.

        Returns:
            ``(idx [M, 2] long, score [M])``: index pairs into ``feats0`` / ``feats1`` and ``1 - distance ratio``.
        """
        device = feats0.desc.device
        if len(feats0) < 2 or len(feats1) < 2:
            return torch.zeros(0, 2, dtype=torch.long, device=device), torch.zeros(0, device=device)
        dists, idxs = KF.match_smnn(feats0.desc, feats1.desc.to(device), th=self.config.ratio_threshold)
        return idxs.long(), (1.0 - dists[:, 0]).clamp(0.0, 1.0)
