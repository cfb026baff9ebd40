"""Shared by the CLI tests: run ``ns-localize`` in-process (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from nerfstudio_gsloc.errors import run_cli
from nerfstudio_gsloc.scripts import localize as localize_cli

# A short schedule so that the tests stay fast (the default schedule is for accuracy).
FAST = [
    "--num-threads", "1",
    "--localization.schedule.matching-iterations", "30",
    "--localization.schedule.pyramid-scales", "1",
    "--localization.schedule.pyramid-iterations", "8",
    "--localization.schedule.refine-matching-weight",
    "--localization.calibration.no-enabled",  # the self-test is tested in test_calibration.py (see conftest.py)
]


def run_ns_localize(argv, capsys):
    """Run ``ns-localize argv`` in-process; returns ``(exit code, stdout, stderr)``."""
    code = 0
    try:
        run_cli(lambda: localize_cli.main([str(a) for a in argv]))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
