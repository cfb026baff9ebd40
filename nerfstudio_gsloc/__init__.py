"""nerfstudio-gsloc: camera localization by inverting 3D Gaussian Splatting."""

__version__ = "0.1.0"
