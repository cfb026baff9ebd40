"""The background of a capture without alpha: masked object captures share a uniform border colour.

A photogrammetry object composited onto white (or black) has no alpha channel, so nerfstudio cannot composite it
against a random background; trained with splatfacto's default random background, the model has to paint the
white itself and grows bright floaters in front of the object in held-out views. When the training images'
borders are one uniform colour, training against that colour avoids this. :func:`detect_border_background`
measures it; the training presets' ``background: auto`` uses it (:mod:`nerfstudio_gsloc.training`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

#: Largest difference (0-255, any channel) from the common colour for a border pixel to count as background.
TOLERANCE = 12
#: Fraction of an image's border pixels that must be the common colour.
MIN_BORDER_FRACTION = 0.95
#: Width of the border band in pixels.
BORDER = 2
#: Images sampled (evenly) from the training set.
MAX_IMAGES = 24
#: A common colour at least this close to white / black (every channel) is used as white / black.
NEAR = 24


@dataclass
class BorderBackground:
    """A uniform border colour shared by the training images.

    Attributes:
        color: ``[3]`` mean border colour, 0-255.
        fraction: smallest fraction of an image's border pixels within :data:`TOLERANCE` of it.
        num_images: images measured.
        name: ``"white"`` or ``"black"`` when the colour is (near) one of them (the backgrounds splatfacto can
            train against), else ``None``.
    """

    color: np.ndarray
    fraction: float
    num_images: int
    name: Optional[str]

    def describe(self) -> str:
        rgb = ", ".join(str(int(round(c))) for c in self.color)
        return (f"the training images share a uniform border colour ({rgb}) on at least {100 * self.fraction:.0f}% "
                f"of their border pixels ({self.num_images} images measured)")


def _border_pixels(image: np.ndarray) -> np.ndarray:
    """``[n, 3]`` pixels of the :data:`BORDER`-pixel band around ``image [H, W, 3]``."""
    b = BORDER
    return np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3), image[b:-b, :b].reshape(-1, 3),
                           image[b:-b, -b:].reshape(-1, 3)])


def detect_border_background(paths: Sequence[Path]) -> Optional[BorderBackground]:
    """The uniform border colour shared by the images at ``paths``, or ``None`` (none, or the images have alpha).

    An image counts when at least :data:`MIN_BORDER_FRACTION` of its border pixels lie within :data:`TOLERANCE`
    of the median border colour over all sampled images; every sampled image must count. Images with an alpha
    channel return ``None``: nerfstudio composites those against the model's background already.
    """
    paths = list(paths)
    if not paths:
        return None
    picks = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(MAX_IMAGES, len(paths))).round())]
    borders: List[np.ndarray] = []
    for path in picks:
        try:
            with Image.open(path) as image:
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    return None
                array = np.asarray(image.convert("RGB"), dtype=np.float32)
        except (OSError, ValueError):
            return None  # a bad file is reported by the image check, not here
        if min(array.shape[:2]) <= 2 * BORDER:
            return None
        borders.append(_border_pixels(array))
    color = np.median(np.concatenate(borders), axis=0)
    fractions = [float(np.mean(np.abs(b - color).max(axis=1) <= TOLERANCE)) for b in borders]
    if min(fractions) < MIN_BORDER_FRACTION:
        return None
    name = "white" if color.min() >= 255 - NEAR else "black" if color.max() <= NEAR else None
    return BorderBackground(color=color, fraction=min(fractions), num_images=len(borders), name=name)


def nerfstudio_training_images(data: Path) -> List[Path]:
    """The training images of a nerfstudio-format dataset (``train_filenames`` when given, else every frame)."""
    meta_path = Path(data) / "transforms.json" if Path(data).is_dir() else Path(data)
    meta = json.loads(meta_path.read_text())
    names = meta.get("train_filenames") or [frame["file_path"] for frame in meta.get("frames", [])]
    return [meta_path.parent / name for name in names]
