#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv, install the pinned dependencies and the
# package, and build the C++ CPU rasterizer once. Safe to run repeatedly: reinstalls only when
# pyproject.toml changed. Usage: bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# nerfstudio's ns-export imports open3d, which needs the system's libusb-1.0 (absent on minimal Debian images).
if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libusb-1.0-0 (needed by open3d / ns-export)"
    apt-get update -qq >/dev/null && apt-get install -y -qq libusb-1.0-0 >/dev/null
  else
    echo "[setup] warning: libusb-1.0 is missing; ns-export will fail until it is installed (apt-get install libusb-1.0-0)"
  fi
fi

# The viewer's browser test drives Debian's Chromium headless (Playwright with executable_path, never a download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium (for the viewer's browser test)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] warning: chromium is missing; the viewer's browser test is skipped until it is installed (apt-get install chromium)"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.gsloc-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch 2.14.1, torchvision 0.29.1, nerfstudio 1.1.5, ray and the package (a few minutes the first time)"
  # The environment takes about 8.5 GB (torch's pinned release is a CUDA build); say so before pip runs out of disk.
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt $((9 * 1024 * 1024)) ]; then
    echo "[setup] warning: $((free_kb / 1024)) MB free on $(df -P . | awk 'NR==2 {print $6}'); the install needs about 9 GB"
  fi
  .venv/bin/python -m pip install --quiet --no-cache-dir --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # extras: test (pytest, playwright) and ray (--ray of ns-localize and gsloc-bench, covered by the tests)
  .venv/bin/python -m pip install --quiet --no-cache-dir -e ".[test,ray]" 2>&1 | grep -v "^WARNING: Location" || true
  if ! .venv/bin/python -c "import nerfstudio_gsloc, nerfstudio, gsplat, kornia, ray"; then  # fail here if the install did
    echo "[setup] error: the install failed (see pip's messages above); free disk: $(df -Ph . | awk 'NR==2 {print $4}')" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
# Compile the C++ rasterizer now (about 30 s once; cached in ~/.cache/torch_extensions).
.venv/bin/python - <<'PY'
import warnings
warnings.simplefilter("ignore")
from nerfstudio_gsloc.rendering.extension import load_cpu_extension
print("[setup] C++ CPU rasterizer:", "ready" if load_cpu_extension() is not None else "NOT available, using the PyTorch fallback")
PY
