"""nerfstudio-gsloc: camera localization by inverting 3D Gaussian Splatting."""

import os

# Idle OpenMP threads sleep instead of spinning. On a 2-core machine that also runs anything else, spinning
# threads wait for descheduled ones at every parallel region and renders become 10-30x slower (measured with
# gsloc-render-bench). libgomp reads this when torch is first imported, so it only takes effect when this
# package is imported before torch (our own commands); scripts/*.sh export it for ns-train too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
