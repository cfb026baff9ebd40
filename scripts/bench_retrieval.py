"""Retrieval benchmark: index build time, recall@k of the global descriptor, and pnp with no prior.

Usage (a trained run; its eval split are the queries)::

    OMP_NUM_THREADS=1 python scripts/bench_retrieval.py --load-config /tmp/lego/.../config.yml [--max-queries N]

Prints:

1. the time to build the retrieval index (training views + rendered views, SIFT, depth lifting, VLAD) without
   the cache;
2. recall@k: the share of queries whose top-k views contain a view within ``--recall-deg`` degrees and
   ``--recall-units`` scene units of the query's true pose, for VLAD over the training views only, VLAD over
   training + rendered views, the ``pnp`` shortlist re-ranking (VLAD top-N re-ranked by SIFT matches), and the
   match-count selection over the training views (``selection=matches``, the previous pnp baseline);
3. ``pnp`` with ``selection=retrieval`` and ``selection=matches`` on the queries with no prior: success at
   (5 deg, 0.05), median errors, seconds per query.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from nerfstudio_gsloc.localize.pnp import PnPBaseline, PnPLocalizer, PnPLocalizerConfig
from nerfstudio_gsloc.localize.queries import load_eval_queries
from nerfstudio_gsloc.localize.retrieval import load_or_build_index
from nerfstudio_gsloc.metrics import rotation_error_deg, translation_error
from nerfstudio_gsloc.runs import load_run


def view_is_close(index, gt: torch.Tensor, deg: float, units: float) -> torch.Tensor:
    """``[V]`` bool: map views within ``deg`` degrees and ``units`` scene units of ``gt [3, 4]``."""
    poses = torch.stack([v.c2w for v in index.views]).double()
    rot = rotation_error_deg(poses, gt[None].double().expand(len(poses), 3, 4))
    trans = translation_error(poses, gt[None].double().expand(len(poses), 3, 4))
    return (rot <= deg) & (trans <= units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--recall", type=float, nargs=2, action="append", metavar=("DEG", "UNITS"),
                        help="a view within DEG degrees and UNITS scene units of the truth is right (repeatable; "
                             "default: 15 0.5 and 30 1.0)")
    parser.add_argument("--rendered-per-view", type=int, default=None)
    parser.add_argument("--skip-pnp", action="store_true")
    args = parser.parse_args()
    criteria = [tuple(c) for c in args.recall] if args.recall else [(15.0, 0.5), (30.0, 1.0)]
    torch.set_num_threads(1)

    _, pipeline = load_run(args.load_config)
    queries = load_eval_queries(pipeline, args.max_queries)
    config = PnPLocalizerConfig(selection="retrieval")
    if args.rendered_per_view is not None:
        config.retrieval.rendered_per_view = args.rendered_per_view
    started = time.perf_counter()
    index = load_or_build_index(pipeline.model, pipeline, config.retrieval, config.matcher, config.depth_edge_tolerance,
                                cache_dir=Path("/tmp/retrieval/bench_index"), checkpoint=None)
    print(f"index: {len(index)} views ({len(index.view_ids('train'))} training), "
          f"{sum(len(v.features) for v in index.views)} 3D points, built in {index.build_seconds:.1f} s wall, "
          f"{index.build_cpu_seconds:.1f} s CPU" + (" (read from the cache)" if index.cached else ""))
    del started

    baseline = PnPBaseline(index, config)
    train_ids = index.view_ids("train")
    ks = (1, 5, 10, 30)
    names = ("vlad-train", "vlad-all", "vlad30+rerank", "matches-train")
    hits = {(c, name): {k: 0 for k in ks} for c in criteria for name in names}
    available = {(c, src): 0 for c in criteria for src in ("train", "all")}
    seconds = {name: 0.0 for name in names}
    for query in queries:
        feats = baseline.features.detect(query.image)
        t = time.perf_counter()
        scores = index.scores(feats)
        seconds["vlad-all"] += time.perf_counter() - t
        rank_all = torch.argsort(scores, descending=True).tolist()
        rank_train = [i for i in rank_all if index.views[i].source == "train"]
        t = time.perf_counter()
        cfg30 = dataclasses.replace(config, num_views=30)
        rerank = PnPBaseline.most_matched(_with_config(baseline, cfg30), feats, rank_all[:30])
        seconds["vlad30+rerank"] += time.perf_counter() - t
        t = time.perf_counter()
        matches = PnPBaseline.most_matched(_with_config(baseline, dataclasses.replace(config, num_views=max(ks))), feats, train_ids)
        seconds["matches-train"] += time.perf_counter() - t
        for c in criteria:
            close = view_is_close(index, query.gt_c2w, *c)
            available[(c, "train")] += bool(close[train_ids].any())
            available[(c, "all")] += bool(close.any())
            for name, ranking in (("vlad-train", rank_train), ("vlad-all", rank_all), ("vlad30+rerank", rerank),
                                  ("matches-train", matches)):
                for k in ks:
                    hits[(c, name)][k] += bool(any(close[i] for i in ranking[:k]))
    n = len(queries)
    for c in criteria:
        print(f"\nrecall@k: share of {n} queries with a view within {c[0]:g} deg and {c[1]:g} scene units of the truth "
              f"among the top k (such a view exists among the training views for {100 * available[(c, 'train')] / n:.0f}%, "
              f"among all views for {100 * available[(c, 'all')] / n:.0f}%)")
        print("| ranking | " + " | ".join(f"@{k}" for k in ks) + " | ms/query |")
        print("|---|" + "---:|" * (len(ks) + 1))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{100 * hits[(c, name)][k] / n:.0f}%" for k in ks)
                  + f" | {1000 * seconds[name] / n:.0f} |")
    if args.skip_pnp:
        return

    print("\npnp with no prior (initial pose NaN, never read)")
    print("| selection | success (5deg, 0.05) | median rot (deg) | median trans | s/query | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    nan = torch.full((3, 4), math.nan)
    for selection in ("retrieval", "matches"):
        localizer = PnPLocalizer(dataclasses.replace(config, selection=selection), pipeline.model, pipeline)
        if selection == "retrieval":
            localizer.baseline = baseline  # the index built above (not charged to the queries either way)
        results = localizer.localize(queries, [nan] * n)
        rot = torch.tensor([r.rot_err_deg if r.rot_err_deg is not None else math.inf for r in results])
        trans = torch.tensor([r.trans_err if r.trans_err is not None else math.inf for r in results])
        success = float(((rot <= 5) & (trans <= 0.05)).float().mean())
        secs = sum(r.seconds for r in results) / n
        print(f"| {selection} | {100 * success:.1f}% | {rot.median():.4f} | {trans.median():.5f} | {secs:.2f} | "
              f"{sum(r.failed for r in results)} |")


def _with_config(baseline: PnPBaseline, config: PnPLocalizerConfig) -> PnPBaseline:
    clone = object.__new__(PnPBaseline)
    clone.__dict__.update(baseline.__dict__)
    clone.config = config
    return clone


if __name__ == "__main__":
    main()
