"""Trajectories in the TUM RGB-D format, which the usual trajectory-evaluation tools (``evo``, the TUM scripts) read.

One line per frame, ``timestamp tx ty tz qx qy qz qw``, after a ``#`` comment header:

* the pose is **camera-to-world** (the camera centre is ``t``; the quaternion ``(qx, qy, qz, qw)``, Hamilton
  convention, scalar last, rotates camera axes into world axes);
* the camera axes are **OpenCV's** (x right, y down, z forward), as the TUM and ORB-SLAM trajectories use; the
  poses.json files of this project hold OpenGL camera axes, and
  :func:`~nerfstudio_gsloc.camera_conventions.opengl_c2w_to_opencv_c2w` converts them;
* the world frame is the one the caller passes (``ns-localize`` writes the dataset's **original** frame, the frame of
  poses.json and of the query transforms.json, so the numbers are in the dataset's units).

Frames without a pose (a failure) are left out, as the TUM tools expect; the timestamp keeps the frame's place.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from nerfstudio_gsloc.camera_conventions import opencv_c2w_to_opengl_c2w, opengl_c2w_to_opencv_c2w, to_homogeneous
from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_write_text

TUM_HEADER = "# timestamp tx ty tz qx qy qz qw (camera-to-world, OpenCV camera axes: x right, y down, z forward)"


def rotation_to_quaternion(rot: np.ndarray) -> np.ndarray:
    """``[3, 3]`` rotation -> unit quaternion ``[4]`` ``(x, y, z, w)`` with ``w >= 0`` (Shepperd's method, stable
    for every angle)."""
    m = np.asarray(rot, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = np.array([(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s])
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = np.zeros(4)
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
        q[3] = (m[k, j] - m[j, k]) / s
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def quaternion_to_rotation(q: Sequence[float]) -> np.ndarray:
    """Quaternion ``(x, y, z, w)`` (normalised here) -> ``[3, 3]`` rotation."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def tum_lines(timestamps: Sequence[float], c2w_opengl: Sequence[Optional[Tensor]]) -> List[str]:
    """The TUM lines of OpenGL camera-to-world poses ``[3|4, 4]`` (``None`` or non-finite: no line)."""
    lines = [TUM_HEADER]
    for stamp, pose in zip(timestamps, c2w_opengl):
        if pose is None or not bool(torch.isfinite(pose).all()):
            continue
        cv = opengl_c2w_to_opencv_c2w(pose.detach().cpu().double())
        t = cv[:3, 3].numpy()
        q = rotation_to_quaternion(cv[:3, :3].numpy())
        lines.append(f"{stamp:.6f} " + " ".join(f"{v:.9f}" for v in (*t, *q)))
    return lines


def write_tum(path: Path, timestamps: Sequence[float], c2w_opengl: Sequence[Optional[Tensor]]) -> int:
    """Write a TUM trajectory file (atomic) from OpenGL camera-to-world poses; returns the number of poses."""
    lines = tum_lines(timestamps, c2w_opengl)
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return len(lines) - 1


def read_tum(path: Path) -> Tuple[np.ndarray, Tensor]:
    """Read a TUM trajectory file.

    Returns:
        ``(timestamps [N] float64, c2w [N, 4, 4] float64)``: OpenGL camera-to-world poses (the file's OpenCV axes
        converted back), in the file's world frame.

    Raises:
        GslocError: a line that is not 8 numbers.
    """
    stamps, poses = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != 8:
            raise GslocError(f"{path} line {number}: expected 'timestamp tx ty tz qx qy qz qw'")
        cv = np.eye(4)
        cv[:3, :3] = quaternion_to_rotation(values[4:])
        cv[:3, 3] = values[1:4]
        stamps.append(values[0])
        poses.append(to_homogeneous(opencv_c2w_to_opengl_c2w(torch.from_numpy(cv))))
    return np.asarray(stamps), torch.stack(poses) if poses else torch.zeros(0, 4, 4, dtype=torch.float64)
