"""Packaging that pyproject.toml cannot express: the top-level ``configs/`` folder (presets) ships inside the package.

``configs/`` stays where the project keeps it, at the top of the repository, and is installed as
``nerfstudio_gsloc/configs/`` (read by :mod:`nerfstudio_gsloc.presets`), so a wheel or a non-editable install finds
the presets too. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

# configs/ and each preset folder in it (localize, protocols, train) become data-only packages.
PRESET_FOLDERS = sorted(p.name for p in Path(__file__).resolve().parent.joinpath("configs").iterdir() if p.is_dir())
CONFIG_PACKAGES = ["nerfstudio_gsloc.configs"] + [f"nerfstudio_gsloc.configs.{name}" for name in PRESET_FOLDERS]

setup(
    packages=find_packages(include=["nerfstudio_gsloc", "nerfstudio_gsloc.*"]) + CONFIG_PACKAGES,
    package_dir={"nerfstudio_gsloc.configs": "configs"},
    package_data={
        "nerfstudio_gsloc": ["rendering/csrc/*.cpp"],
        **{package: ["*.yaml", "*.yml", "*.json"] for package in CONFIG_PACKAGES},
    },
)
