"""Retrieval index of a trained run: the map's views (:mod:`~nerfstudio_gsloc.localize.scene_map`) with a global
descriptor each, so that a query with no pose at all finds the views it overlaps.

Global descriptor: **VLAD** over the views' RootSIFT descriptors (Jegou et al. 2010), with a k-means vocabulary
fitted on the map's own descriptors (no downloaded weights): per visual word, the sum of residuals of the
descriptors assigned to it, each word's block L2-normalised (intra-normalisation), then signed square root and a
global L2 normalisation; views are ranked by the dot product with the query's VLAD. On lego-200 this is measured
against the alternatives in ``scripts/bench_retrieval.py`` (recall@k of a view within 15 deg / 0.5 units of the
truth; numbers in the README).

Cache: :func:`load_or_build_index` keeps the index beside the run, ``<run_dir>/gsloc_index/index-<key>.pt``
(``key``: a hash of every setting that changes the index), and rebuilds it when the loaded checkpoint's path,
size or modification time differs from the one recorded in the file. Files are written atomically
(:mod:`nerfstudio_gsloc.files`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.files import atomic_output
from nerfstudio_gsloc.localize.features import Features, SiftFeatures
from nerfstudio_gsloc.localize.matching import MatcherConfig
from nerfstudio_gsloc.localize.scene_map import (
    MapView,
    TrainingView,
    build_map_view,
    build_rendered_view,
    jittered_poses,
    load_training_views,
)

#: Bumped whenever the saved layout or the way an index is built changes (old caches are then rebuilt).
INDEX_FORMAT = 2  # 2: training photos with lens distortion are undistorted before their features are taken
INDEX_FOLDER = "gsloc_index"


@dataclass
class RetrievalConfig:
    """How the retrieval index is built (the map views and their global descriptors)."""

    rendered_per_view: int = 1
    """Extra views rendered around each training camera (0: training views only)."""
    orbit_deg: float = 20.0
    """Rendered views orbit their training camera's looked-at point by U[1/3, 1] x this angle."""
    distance_range: Tuple[float, float] = (0.9, 1.1)
    """... and scale its distance to that point log-uniformly within this range (closer / farther views)."""
    roll_deg: float = 15.0
    """... and roll about the viewing axis by U[-roll_deg, roll_deg]."""
    vocabulary_size: int = 64
    """Visual words of the VLAD vocabulary (k-means clusters)."""
    kmeans_iterations: int = 25
    kmeans_samples: int = 60_000
    """Descriptors sampled (seeded) from the map to fit the vocabulary."""
    seed: int = 0
    """Seed of the rendered poses and of k-means."""
    cache: bool = True
    """Keep the index in ``<run_dir>/gsloc_index/`` and reuse it while the checkpoint is unchanged."""

    def key_dict(self) -> Dict[str, Any]:
        """The settings that change the index (everything but ``cache``)."""
        data = dataclasses.asdict(self)
        data.pop("cache")
        return data


# ----------------------------------------------------------------------------------------------------------
# VLAD
# ----------------------------------------------------------------------------------------------------------


def kmeans(data: Tensor, k: int, iterations: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means of ``data [N, D]`` into ``k`` centres ``[k, D]`` (k-means++ seeding, empty clusters reseeded)."""
    if data.shape[0] < k:
        raise GslocError(f"cannot fit a {k}-word vocabulary to {data.shape[0]} descriptors (the map has too few features)")
    data = data.float()
    first = int(torch.randint(data.shape[0], (1,), generator=generator))
    centres = [data[first]]
    closest = ((data - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):
        pick = int(torch.multinomial(closest.clamp_min(0) + 1e-12, 1, generator=generator))
        centres.append(data[pick])
        closest = torch.minimum(closest, ((data - data[pick]) ** 2).sum(-1))
    centres = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(data, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centres[empty] = data[torch.randint(data.shape[0], (int(empty.sum()),), generator=generator)]
    return centres


def vlad(desc: Tensor, vocabulary: Tensor) -> Tensor:
    """VLAD of ``desc [N, D]`` with ``vocabulary [C, D]``: ``[C * D]``, unit length (zeros when ``N == 0``)."""
    C, D = vocabulary.shape
    if desc.shape[0] == 0:
        return torch.zeros(C * D)
    desc = desc.float()
    assign = torch.cdist(desc, vocabulary).argmin(dim=1)
    residual = desc - vocabulary[assign]
    blocks = torch.zeros(C, D).index_add_(0, assign, residual)
    blocks = torch.nn.functional.normalize(blocks, dim=1)  # intra-normalisation: bursty words do not dominate
    flat = blocks.reshape(-1)
    flat = flat.sign() * flat.abs().sqrt()
    return torch.nn.functional.normalize(flat, dim=0)


# ----------------------------------------------------------------------------------------------------------
# the index
# ----------------------------------------------------------------------------------------------------------


class RetrievalIndex:
    """The map views of a run with their VLAD descriptors.

    Attributes:
        views: :class:`~nerfstudio_gsloc.localize.scene_map.MapView` s (``features``, ``points [N, 3]`` scene
            frame, ``c2w [3, 4]`` OpenGL, ``K [3, 3]``, ``width``, ``height``, ``source`` ``train``/``rendered``);
            training views first, in the dataset's order.
        vocabulary: ``[C, 128]`` visual words.
        descriptors: ``[V, C * 128]`` unit VLAD vectors, one per view.
        build_seconds: wall time it took to build (as recorded when it was built, also for a cached index).
        build_cpu_seconds: CPU time of the build process (the wall time on an idle machine with one thread).
        cached: True when it was read from the cache.
    """

    def __init__(self, views: List[MapView], vocabulary: Tensor, descriptors: Tensor, build_seconds: float = 0.0) -> None:
        self.views = views
        self.vocabulary = vocabulary
        self.descriptors = descriptors
        self.build_seconds = float(build_seconds)
        self.build_cpu_seconds = float("nan")
        self.cached = False

    def __len__(self) -> int:
        return len(self.views)

    def view_ids(self, source: Optional[str] = None) -> List[int]:
        """Ids of the views of one ``source`` (``train`` / ``rendered``), or all."""
        return [i for i, v in enumerate(self.views) if source is None or v.source == source]

    def describe(self, features: Features) -> Tensor:
        """The ``[C * 128]`` VLAD of a query's features."""
        return vlad(features.desc.cpu(), self.vocabulary)

    def scores(self, features: Features) -> Tensor:
        """``[V]`` similarity (dot product of VLADs) of the query to every view."""
        return self.descriptors @ self.describe(features)

    def top_k(self, query_features: Features, k: int) -> List[int]:
        """Ids of the ``k`` views most similar to the query, best first."""
        order = torch.argsort(self.scores(query_features), descending=True, stable=True)
        return order[: max(0, int(k))].tolist()

    def to_state(self) -> Dict[str, Any]:
        """Plain tensors and numbers (``torch.save`` with ``weights_only`` loading)."""
        views = [{
            "kpts": v.features.kpts, "desc": v.features.desc.half(),
            "response": v.features.response if v.features.response is not None else torch.zeros(0),
            "points": v.points, "c2w": v.c2w, "K": v.K, "width": v.width, "height": v.height,
            "source": v.source, "name": v.name, "median_depth": v.median_depth,
        } for v in self.views]
        return {"views": views, "vocabulary": self.vocabulary, "descriptors": self.descriptors.half(),
                "build_seconds": self.build_seconds, "build_cpu_seconds": self.build_cpu_seconds}

    @staticmethod
    def from_state(state: Dict[str, Any]) -> "RetrievalIndex":
        """Inverse of :meth:`to_state`."""
        views = []
        for v in state["views"]:
            response = v["response"] if v["response"].numel() == v["kpts"].shape[0] else None
            views.append(MapView(Features(v["kpts"], v["desc"].float(), response), v["points"], v["c2w"], v["K"],
                                 int(v["width"]), int(v["height"]), v["source"], v["name"], float(v["median_depth"])))
        index = RetrievalIndex(views, state["vocabulary"], state["descriptors"].float(), state["build_seconds"])
        index.build_cpu_seconds = float(state.get("build_cpu_seconds", float("nan")))
        return index


def build_index(model, training_views: Sequence[TrainingView], features: SiftFeatures, config: RetrievalConfig,
                depth_edge_tolerance: float, on_view: Optional[Callable[[], None]] = None) -> RetrievalIndex:
    """Map the training views, render and map the jittered views, fit the vocabulary, describe every view.

    Rendered views have the size and intrinsics of the training view they come from.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    views: List[MapView] = []
    for view in training_views:
        views.append(build_map_view(model, view, features, depth_edge_tolerance))
        if on_view is not None:
            on_view()
    if config.rendered_per_view > 0 and views:
        generator = torch.Generator().manual_seed(int(config.seed))
        poses, parents = jittered_poses(torch.stack([v.c2w for v in views]),
                                        torch.tensor([v.median_depth for v in views]), config.rendered_per_view,
                                        config.orbit_deg, tuple(config.distance_range), config.roll_deg, generator)
        for j, (pose, parent) in enumerate(zip(poses, parents.tolist())):
            base = views[parent]
            assert base.K is not None
            views.append(build_rendered_view(model, pose, base.K, base.width, base.height, features,
                                             depth_edge_tolerance, name=f"rendered:{j}:{training_views[parent].name}"))
            if on_view is not None:
                on_view()
    generator = torch.Generator().manual_seed(int(config.seed) + 1)
    all_desc = torch.cat([v.features.desc.cpu().float() for v in views]) if views else torch.zeros(0, 128)
    if all_desc.shape[0] > config.kmeans_samples:
        all_desc = all_desc[torch.randperm(all_desc.shape[0], generator=generator)[: config.kmeans_samples]]
    vocabulary = kmeans(all_desc, config.vocabulary_size, config.kmeans_iterations, generator)
    descriptors = torch.stack([vlad(v.features.desc.cpu(), vocabulary) for v in views])
    index = RetrievalIndex(views, vocabulary, descriptors, time.perf_counter() - started)
    index.build_cpu_seconds = time.process_time() - cpu_started
    return index


def checkpoint_fingerprint(checkpoint: Path) -> Dict[str, Any]:
    """What identifies a checkpoint file's content cheaply: resolved path, size and modification time (ns)."""
    stat = Path(checkpoint).stat()
    return {"path": str(Path(checkpoint).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def index_key(config: RetrievalConfig, matcher: MatcherConfig, depth_edge_tolerance: float) -> str:
    """Short hash of every setting that changes the index (its cache file name)."""
    settings = {"format": INDEX_FORMAT, "retrieval": config.key_dict(), "matcher": dataclasses.asdict(matcher),
                "depth_edge_tolerance": depth_edge_tolerance}
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_or_build_index(model, pipeline: Any, config: RetrievalConfig, matcher: MatcherConfig,
                        depth_edge_tolerance: float, training_views: Optional[Sequence[TrainingView]] = None,
                        cache_dir: Optional[Path] = None, checkpoint: Optional[Path] = None) -> RetrievalIndex:
    """The run's retrieval index: read from the cache when it matches the checkpoint and settings, else built.

    Args:
        model: the trained scene.
        pipeline: the loaded pipeline (training views; ``gsloc_run_dir`` / ``gsloc_checkpoint`` set by
            :func:`nerfstudio_gsloc.runs.load_run` give the cache folder and the checkpoint). May be ``None`` when
            ``training_views`` are given.
        config: index settings; matcher, depth_edge_tolerance: the SIFT settings and depth-edge filter of the map.
        training_views: use these instead of the pipeline's training split.
        cache_dir: overrides ``<run_dir>/gsloc_index``; checkpoint: overrides the pipeline's checkpoint.
            Without a cache folder and a checkpoint (or with ``config.cache`` off) nothing is cached.

    Returns:
        the index; ``index.cached`` tells whether it came from the cache. The build time is printed.
    """
    if cache_dir is None and getattr(pipeline, "gsloc_run_dir", None) is not None:
        cache_dir = Path(pipeline.gsloc_run_dir) / INDEX_FOLDER
    if checkpoint is None:
        checkpoint = getattr(pipeline, "gsloc_checkpoint", None)
    features = SiftFeatures(matcher)
    path = fingerprint = None
    if config.cache and cache_dir is not None and checkpoint is not None and Path(checkpoint).is_file():
        path = Path(cache_dir) / f"index-{index_key(config, matcher, depth_edge_tolerance)}.pt"
        fingerprint = checkpoint_fingerprint(Path(checkpoint))
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if state.get("checkpoint") == fingerprint and state.get("format") == INDEX_FORMAT:
                    index = RetrievalIndex.from_state(state["index"])
                    index.cached = True
                    CONSOLE.log(f"gsloc: retrieval index of {len(index)} views read from {path} "
                                f"(built in {index.build_seconds:.1f} s)")
                    return index
                CONSOLE.log(f"gsloc: the checkpoint changed since {path} was built; rebuilding the retrieval index")
            except Exception as err:  # a truncated or foreign file: rebuild rather than fail
                CONSOLE.log(f"gsloc: cannot read {path} ({type(err).__name__}); rebuilding the retrieval index")
    views = list(training_views) if training_views is not None else load_training_views(pipeline)
    total = len(views) * (1 + max(0, config.rendered_per_view))
    CONSOLE.log(f"gsloc: building the retrieval index ({len(views)} training views + "
                f"{len(views) * max(0, config.rendered_per_view)} rendered)")
    index = build_index(model, views, features, config, depth_edge_tolerance)
    # Descriptors are stored in half precision: use the stored form from the start, so a run that builds the index
    # gives exactly the poses of a run (or a Ray worker) that reads it from the cache.
    index = RetrievalIndex.from_state(index.to_state())
    CONSOLE.log(f"gsloc: retrieval index of {total} views built in {index.build_seconds:.1f} s "
                f"({index.build_cpu_seconds:.1f} s CPU)"
                + (f", saved to {path}" if path is not None else ""))
    if path is not None:
        with atomic_output(path) as tmp:
            torch.save({"format": INDEX_FORMAT, "checkpoint": fingerprint, "index": index.to_state()}, tmp)
    return index
