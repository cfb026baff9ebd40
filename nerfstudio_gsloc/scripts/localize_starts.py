"""Where each ``ns-localize`` query starts, and what a resumed run must share with the run it continues.

* :func:`resolve_init` / :func:`initial_poses_of`: the initial pose of every query by ``--init`` (its prior, its
  ground truth perturbed, retrieval + PnP, or the scene regressor);
* :func:`run_settings` / :func:`load_previous`: the settings written to poses.json and the finished records of an
  earlier run, refused for ``--resume`` when they differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from rich.console import Console

from nerfstudio_gsloc.errors import GslocError
from nerfstudio_gsloc.localize.initialization import (
    InitialPose,
    initial_poses,
    no_pose,
    query_init_sources,
    retrieval_initial_poses,
)
from nerfstudio_gsloc.localize.pnp import PnPLocalizer
from nerfstudio_gsloc.localize.queries import Query
from nerfstudio_gsloc.localize.regression import regression_initial_poses
from nerfstudio_gsloc.localize.regressor_files import load_run_regressor
from nerfstudio_gsloc.localize.registry import SELF_INITIALIZING
from nerfstudio_gsloc.poses_file import PoseRecord, QuerySource, read_poses
from nerfstudio_gsloc.scripts.localize_outputs import POSES_FILE

if TYPE_CHECKING:  # the CLI imports this module
    from nerfstudio_gsloc.scripts.localize import LocalizeCLI


def query_source(cli: "LocalizeCLI") -> QuerySource:
    """Where the queries come from, as poses.json records it: ``--images``, ``--queries`` or the run's eval split."""
    if cli.images is not None:
        return QuerySource.images(cli.images)
    return QuerySource.eval_split() if cli.queries is None else QuerySource.transforms(cli.queries)


def resolve_init(queries: Sequence[Query], init: str) -> str:
    """The init mode written to poses.json: the one source of every query's initial pose, or ``auto`` when they
    differ; raises :class:`GslocError` when ``prior``/``perturb`` cannot serve every query."""
    sources = set(query_init_sources(queries, init))
    return sources.pop() if len(sources) == 1 else init


def initial_poses_of(cli: "LocalizeCLI", todo: Sequence[Query], init: str, method: str, pipeline,
                     console: Console) -> List[InitialPose]:
    """Per query its initial pose (:class:`InitialPose`): prior, perturbed ground truth, the scene regressor's pose,
    or retrieval + PnP.

    With ``--method pnp`` retrieval queries get no separate initialisation: pnp itself runs with
    ``selection=retrieval`` and never reads their (NaN) start; nor do ``--method regression`` queries.
    """
    sources = query_init_sources(todo, init)
    inits: List[Optional[InitialPose]] = [None] * len(todo)
    for source in ("prior", "perturb"):
        picked = [p for p, s in enumerate(sources) if s == source]
        poses = initial_poses([todo[p] for p in picked], source, cli.perturb_deg, cli.perturb_trans, cli.seed) if picked else []
        for p, pose in zip(picked, poses):
            inits[p] = InitialPose(pose, source)
    regression = [p for p, s in enumerate(sources) if s == "regression"]
    if regression and method in SELF_INITIALIZING:
        for p in regression:
            inits[p] = InitialPose(no_pose(), "regression")
    elif regression:
        regressor = load_run_regressor(pipeline, cli.regression.folder, cli.regression.inference)
        found = regression_initial_poses([todo[p] for p in regression], regressor)
        for p, pose in zip(regression, found):
            inits[p] = pose
    retrieval = [p for p, s in enumerate(sources) if s == "retrieval"]
    if retrieval and method in SELF_INITIALIZING:
        for p in retrieval:
            inits[p] = InitialPose(no_pose(), "retrieval")
    elif retrieval:
        config = dataclasses.replace(cli.pnp, selection="retrieval")
        baseline = PnPLocalizer(config, pipeline.model, pipeline, seed=cli.seed).build_map()
        with console.status(f"retrieval + PnP initial poses of {len(retrieval)} queries"):
            found = retrieval_initial_poses([todo[p] for p in retrieval], baseline, seed=cli.seed)
        for p, pose in zip(retrieval, found):
            inits[p] = pose
        failed = sum(pose.c2w is None for pose in found)
        console.print(f"retrieval placed {len(found) - failed} of {len(found)} queries"
                      + (f" ({failed} fail: no pose)" if failed else ""))
    return [pose for pose in inits if pose is not None]


def run_settings(cli: "LocalizeCLI", init: str) -> Dict[str, Any]:
    """What a resumed run must share with the run that wrote poses.json (besides the query source)."""
    return {
        "config": str(Path(cli.load_config).resolve()),
        "init": init,
        "perturb_deg": cli.perturb_deg if init == "perturb" else None,
        "perturb_trans": cli.perturb_trans if init == "perturb" else None,
        "seed": cli.seed,
        "method": cli.method,
    }


def load_previous(output_dir: Path, queries: QuerySource, settings: Dict[str, Any]) -> Dict[str, PoseRecord]:
    """Finished records of an earlier run's poses.json, keyed by query name (for --resume)."""
    path = output_dir / POSES_FILE
    if not path.is_file():
        return {}
    try:
        previous = read_poses(path)
    except GslocError as err:
        raise GslocError(f"cannot resume: {err}") from None
    if previous.queries != queries:
        raise GslocError(f"cannot resume: {path} holds queries of {previous.queries.describe()}, now {queries.describe()}")
    for key, value in settings.items():
        # Files from before --method existed were written by gsloc.
        old = previous.settings.get(key, "gsloc" if key == "method" else None)
        if old != value:
            raise GslocError(f"cannot resume: {path} was written with {key}={old!r}, now {value!r}")
    return {record.image: record for record in previous.records}
