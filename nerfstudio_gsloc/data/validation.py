"""Training images checked before training starts: every file readable, decodable and of the size its camera says.

Without this check a truncated PNG surfaces minutes into ``ns-train gsloc`` as a 20-frame ``OSError: image file
is truncated`` traceback from wherever the image is first decoded (depth seeding, image caching). Here every bad
file is found up front and reported in one :class:`~nerfstudio_gsloc.errors.GslocError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from nerfstudio_gsloc.errors import GslocError

#: dataparser-outputs metadata key set once the images were checked (so they are checked once per run).
CHECKED_KEY = "gsloc_images_checked"
#: How many bad files the message lists by name before it only counts.
MAX_LISTED = 20


def image_problem(path: Path, size: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """Why ``path`` cannot be a training image (``None``: it is fine).

    Args:
        path: the image file.
        size: ``(width, height)`` its camera expects, or ``None`` to skip the size check.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    if path.suffix.lower() == ".npy":  # depth as a numpy array (nerfstudio-data allows it)
        try:
            np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            return f"cannot be read as a .npy array ({err})"
        return None
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: finds truncated and corrupt files, not only bad headers
            actual = image.size
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoders raise all of these for corrupt data
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot be decoded ({first})"
    if size is not None and tuple(actual) != tuple(size):
        return f"{actual[0]}x{actual[1]} pixels, but its camera says {size[0]}x{size[1]}"
    return None


def check_images(paths: Sequence[Path], sizes: Optional[Sequence[Tuple[int, int]]] = None, what: str = "training image") -> None:
    """Check every image; raise one :class:`GslocError` line naming every bad file (the first :data:`MAX_LISTED`).

    Args:
        paths: the image files.
        sizes: ``(width, height)`` per image from its camera, or ``None``.
        what: how the message names them.
    """
    bad: List[str] = []
    for i, path in enumerate(paths):
        problem = image_problem(Path(path), None if sizes is None else sizes[i])
        if problem is not None:
            bad.append(f"{path} ({problem})")
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise GslocError(f"{len(bad)} of {len(paths)} {what}s cannot be used: {listed}")


def check_dataparser_images(outputs) -> None:
    """Check the images (and depth images, when listed) of a nerfstudio ``DataparserOutputs`` once.

    Image sizes are compared with the cameras' ``width`` / ``height`` (the size the dataparser derived from the
    dataset's intrinsics).
    """
    metadata = outputs.metadata
    if metadata.get(CHECKED_KEY):
        return
    cameras = outputs.cameras
    sizes = [(int(cameras.width[i].item()), int(cameras.height[i].item())) for i in range(len(outputs.image_filenames))]
    check_images(list(outputs.image_filenames), sizes)
    depth = metadata.get("depth_filenames")
    if depth is not None:
        check_images(list(depth), None, what="training depth image")
    metadata[CHECKED_KEY] = True
