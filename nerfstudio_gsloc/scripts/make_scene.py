"""``gsloc-make-scene``: write the embedded procedural room as a nerfstudio dataset (no download needed).

Examples::

    gsloc-make-scene --output-dir data/gsloc_room                     # the default scene (80 views, 128x96)
    gsloc-make-scene --output-dir data/gsloc_queries --queries --seed 1 --num-views 10 --width 160 --height 120
    gsloc-make-scene --output-dir data/gsloc_forward --layout forward --no-depth   # RGB-only forward-facing capture
    gsloc-make-scene --output-dir data/gsloc_track --trajectory --seed 0 --num-views 300   # a camera path to track

With ``--queries`` it writes novel views (poses not in the dataset) of scene ``--scene-seed`` in the dataset's
original frame; ``--seed`` then picks the query poses. With ``--trajectory`` it writes a smooth camera path of
``--num-views`` frames (RGB + depth, in path order; frame 0 with a prior pose) for ``ns-localize --sequence``
(:mod:`nerfstudio_gsloc.data.trajectory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro
from rich.console import Console

from nerfstudio_gsloc.data.procedural_scene import generate_scene, write_query_set
from nerfstudio_gsloc.data.room_layout import DEFAULT_HFOV_DEG
from nerfstudio_gsloc.data.trajectory import write_trajectory
from nerfstudio_gsloc.errors import GslocError, Interrupted, run_cli
from nerfstudio_gsloc.files import OutputError, check_writable


@dataclass
class MakeScene:
    """Write the procedural textured room (ray cast in numpy) as a nerfstudio dataset with depth."""

    output_dir: Path = Path("data/gsloc_room")
    """Folder for transforms.json, images/ and depth/ (created)."""
    seed: int = 0
    """Scene seed (or, with --queries, the seed of the query poses)."""
    num_views: int = 80
    """Number of frames (train + eval; or number of queries)."""
    width: int = 128
    """Image width in pixels (16..160)."""
    height: int = 96
    """Image height in pixels (16..160)."""
    eval_fraction: float = 1.0 / 8.0
    """Fraction of the dataset frames held out for eval (ignored with --queries)."""
    hfov_deg: float = DEFAULT_HFOV_DEG
    """Horizontal field of view in degrees."""
    queries: bool = False
    """Write a query set (novel views of scene --scene-seed) instead of a dataset."""
    trajectory: bool = False
    """Write a camera path through scene --scene-seed (--num-views frames, --seed picks the path) as a query
    transforms.json for ns-localize --sequence."""
    step: float = 0.025
    """With --trajectory: metres between frames (2.5 times more in two faster segments)."""
    scene_seed: int = 0
    """With --queries: the scene the query views show (the dataset's --seed)."""
    layout: Literal["ring", "forward"] = "ring"
    """Dataset cameras: a loop around the objects looking inwards, or a forward-facing capture (ignored with --queries)."""
    depth: bool = True
    """Write depth images (--no-depth: an RGB-only dataset, trained from triangulated seed points; ignored with --queries)."""

    def main(self) -> Path:
        """Generate the files and print where they are (Ctrl-C: one line saying the folder is incomplete)."""
        check_writable(self.output_dir, "output directory")  # before any work; later failures are mid-write
        try:
            return self._generate()
        except OutputError as err:
            raise GslocError(f"{err}; {self.output_dir} is incomplete (no transforms.json), the views already "
                             "written are whole") from None
        except KeyboardInterrupt:
            raise Interrupted(
                f"{self.output_dir} is incomplete (transforms.json is written only after every view); run the command again"
            ) from None

    def _generate(self) -> Path:
        if self.queries and self.trajectory:
            raise GslocError("give --queries or --trajectory, not both")
        if self.trajectory:
            path = write_trajectory(self.output_dir, seed=self.seed, num_frames=self.num_views, width=self.width,
                                    height=self.height, scene_seed=self.scene_seed, hfov_deg=self.hfov_deg,
                                    step=self.step)
            what = f"a {self.num_views}-frame camera path through scene {self.scene_seed}"
        elif self.queries:
            path = write_query_set(
                self.output_dir,
                seed=self.seed,
                num_views=self.num_views,
                width=self.width,
                height=self.height,
                scene_seed=self.scene_seed,
                hfov_deg=self.hfov_deg,
            )
            what = f"{self.num_views} query views of scene {self.scene_seed}"
        else:
            path = generate_scene(
                self.output_dir,
                seed=self.seed,
                num_views=self.num_views,
                width=self.width,
                height=self.height,
                eval_fraction=self.eval_fraction,
                hfov_deg=self.hfov_deg,
                layout=self.layout,
                with_depth=self.depth,
            )
            what = f"scene {self.seed} with {self.num_views} views"
        Console().print(f"[bold green]wrote[/bold green] {what}: {path}", highlight=False)
        return path


def entrypoint() -> None:
    """Console-script entry point."""
    run_cli(lambda: tyro.cli(MakeScene).main())


if __name__ == "__main__":
    entrypoint()
