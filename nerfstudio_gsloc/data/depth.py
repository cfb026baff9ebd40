"""Depth for training: a dataset that returns depth images, and a dataparser that seeds Gaussians from them.

Depth images follow nerfstudio-data: ``depth_file_path`` per frame, 16-bit PNG (or .npy) whose values times
``depth_unit_scale_factor`` are metres (or the dataset's unit). Here they become z-depth in *scene* units
(times the dataparser's scale), the unit of the model's rendered depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Type

import numpy as np
import torch
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.utils.data_utils import get_depth_image_from_path
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image

from nerfstudio_gsloc.camera_conventions import opengl_c2w_to_opencv_w2c, rigid_inverse
from nerfstudio_gsloc.data.validation import check_dataparser_images
from nerfstudio_gsloc.errors import GslocError


def load_scene_depth(outputs: DataparserOutputs, index: int, height: int, width: int) -> torch.Tensor:
    """Depth image ``index`` of a dataparser's outputs as ``[H, W, 1]`` z-depth in scene units (0 = no depth)."""
    filenames = outputs.metadata["depth_filenames"]
    scale = outputs.metadata["depth_unit_scale_factor"] * outputs.dataparser_scale
    return get_depth_image_from_path(filepath=Path(filenames[index]), height=height, width=width, scale_factor=scale)


class GSLocDataset(InputDataset):
    """An ``InputDataset`` that adds ``depth_image`` ``[H, W, 1]`` (scene units) when the dataset has depth.

    Unlike nerfstudio's ``DepthDataset`` it never estimates depth with a network: no depth, no key.
    """

    exclude_batch_keys_from_device = InputDataset.exclude_batch_keys_from_device + ["depth_image"]

    def __init__(self, dataparser_outputs: DataparserOutputs, scale_factor: float = 1.0):
        super().__init__(dataparser_outputs, scale_factor)
        self.has_depth = dataparser_outputs.metadata.get("depth_filenames") is not None

    def get_metadata(self, data: Dict) -> Dict:
        if not self.has_depth:
            return {}
        camera = self._dataparser_outputs.cameras[data["image_idx"]]
        height, width = int(camera.height.item() * self.scale_factor), int(camera.width.item() * self.scale_factor)
        return {"depth_image": load_scene_depth(self._dataparser_outputs, data["image_idx"], height, width)}


def backproject_depth_points(
    outputs: DataparserOutputs, max_points: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lift the training views' depth pixels to a coloured point cloud in the scene frame.

    Returns:
        ``xyz [P, 3]`` float and ``rgb [P, 3]`` uint8, at most ``max_points`` points sampled uniformly.
    """
    cameras = outputs.cameras
    num_views = len(outputs.image_filenames)
    per_view = max(1, max_points // max(num_views, 1))
    gen = np.random.default_rng(seed)
    all_xyz, all_rgb = [], []
    for i in range(num_views):
        height, width = int(cameras.height[i].item()), int(cameras.width[i].item())
        depth = load_scene_depth(outputs, i, height, width)[..., 0].numpy()
        rgb = np.asarray(Image.open(outputs.image_filenames[i]).convert("RGB").resize((width, height)))
        v, u = np.nonzero(depth > 0)
        if len(u) == 0:
            continue
        pick = gen.choice(len(u), size=min(per_view, len(u)), replace=False)
        u, v = u[pick], v[pick]
        z = torch.from_numpy(depth[v, u])
        fx, fy = cameras.fx[i].item(), cameras.fy[i].item()
        cx, cy = cameras.cx[i].item(), cameras.cy[i].item()
        # OpenCV camera coordinates of the pixel centres, then to the world with the camera's c2w
        x = (torch.from_numpy(u).float() + 0.5 - cx) / fx * z
        y = (torch.from_numpy(v).float() + 0.5 - cy) / fy * z
        cam_pts = torch.stack([x, y, z, torch.ones_like(z)], dim=-1)
        c2w_cv = rigid_inverse(opengl_c2w_to_opencv_w2c(cameras.camera_to_worlds[i]))
        all_xyz.append((cam_pts @ c2w_cv.T)[:, :3])
        all_rgb.append(torch.from_numpy(rgb[v, u]))
    if not all_xyz:
        raise GslocError("the dataset's depth images hold no valid depth (all zero)")
    return torch.cat(all_xyz).float(), torch.cat(all_rgb).to(torch.uint8)


def check_nerfstudio_dataset(data: Path) -> None:
    """Fail with one clear line before nerfstudio's parser trips over a missing or empty dataset."""
    data = Path(data)
    if not data.exists():
        raise GslocError(f"data path does not exist: {data}")
    meta_path = data if data.is_file() else data / "transforms.json"
    if not meta_path.is_file():
        raise GslocError(f"no transforms.json in {data} (expected a nerfstudio-format dataset)")
    try:
        frames = json.loads(meta_path.read_text()).get("frames", [])
    except json.JSONDecodeError as err:
        raise GslocError(f"{meta_path} is not valid JSON: {err.msg} at line {err.lineno}") from err
    if not frames:
        raise GslocError(f"the dataset {meta_path} lists no images (empty 'frames')")
    base = meta_path.parent
    missing = [f.get("file_path") for f in frames if not (base / str(f.get("file_path", ""))).is_file()]
    if missing:
        raise GslocError(f"{len(missing)} image(s) listed in {meta_path} do not exist, e.g. {base / str(missing[0])}")


@dataclass
class GSLocDataParserConfig(NerfstudioDataParserConfig):
    """nerfstudio-data, plus seeding the Gaussians from back-projected depth when the dataset has depth."""

    _target: Type = field(default_factory=lambda: GSLocDataParser)
    depth_seed_points: int = 40_000
    """Number of depth points to seed Gaussians with when the dataset has depth and no point cloud (0 = off)."""


class GSLocDataParser(Nerfstudio):
    """nerfstudio-data parser with depth seeding; see :class:`GSLocDataParserConfig`."""

    config: GSLocDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        check_nerfstudio_dataset(self.config.data)
        outputs = super()._generate_dataparser_outputs(split)
        if not outputs.image_filenames:
            raise GslocError(f"no images in the {split} split of {self.config.data}")
        has_depth = outputs.metadata.get("depth_filenames") is not None
        if split == "train" and has_depth and self.config.depth_seed_points > 0 and "points3D_xyz" not in outputs.metadata:
            check_dataparser_images(outputs)  # seeding decodes every image: one clear line for bad files first
            xyz, rgb = backproject_depth_points(outputs, self.config.depth_seed_points)
            outputs.metadata["points3D_xyz"], outputs.metadata["points3D_rgb"] = xyz, rgb
            CONSOLE.log(f"gsloc: seeded {len(xyz):,} Gaussians from back-projected depth")
        return outputs
