"""The viewer as a user sees it: Debian's Chromium, headless, driven by Playwright (never a browser download).

``ns-localize --viewer`` runs on a tiny localization (a subprocess, as a user starts it) and ``gsloc-view`` serves
its output (in-process, so that the test can read the viewer camera the browser reports back). Both on 127.0.0.1
with a free port. The page must show the rendered scene, the Localization panel with one row per query and the
numbers of ``metrics.json``, no horizontal overflow of the side panel, and the overlay's nodes in viser's scene
tree; clicking a row must move the browser's camera to that query's refined pose. Screenshots go to the test's
temporary folder, and also to ``$GSLOC_SCREENSHOT_DIR`` when set (the README's pictures in docs/ come from there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nerfstudio_gsloc.poses_file import read_poses

# A closed network: nothing in the background, no sandbox (root in CI), software rendering.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
# A short schedule (as tests/localize/test_cli.py) on two eval views.
FAST = [
    "--init", "perturb", "--num-threads", "1", "--max-queries", "2", "--perturb-deg", "5", "--perturb-trans", "0.05",
    "--localization.schedule.matching-iterations", "30", "--localization.schedule.pyramid-scales", "1",
    "--localization.schedule.pyramid-iterations", "8", "--localization.schedule.refine-matching-weight",
    "--localization.calibration.no-enabled",  # a subprocess: conftest's switch does not reach it
]
PAGE_TIMEOUT_MS = 120_000
pytestmark = pytest.mark.browser  # about a minute on 2 cores; `-m "not browser"` leaves it out


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.geteuid() != 0:
            pytest.skip("Debian's chromium is not installed and this user is not root, so scripts/setup_env.sh could "
                        "not install it (apt-get install chromium)")
        pytest.fail("chromium is missing: scripts/setup_env.sh installs it when run as root (apt-get install chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium context (fresh profile), 1280x800 like a laptop screen."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800},
        )
        yield context
        context.close()


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path))
    target = os.environ.get("GSLOC_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def _open(browser, url: str):
    """Open the viewer and wait for the scene: nerfstudio reports a rendered image's size once one arrived."""
    page = browser.new_page()
    page.goto(url)
    page.get_by_text("Localization", exact=True).wait_for(timeout=PAGE_TIMEOUT_MS)
    page.get_by_text(re.compile(r"Resolution: [1-9][0-9]*x[1-9]")).wait_for(timeout=PAGE_TIMEOUT_MS)
    return page


def _panel_text(page) -> str:
    text = page.locator(".mantine-ScrollArea-viewport").first.inner_text()
    return text[text.index("Localization"):]


def _check_page(page, out_dir: Path) -> None:
    """Rows, numbers, width and scene nodes of the Localization panel against ns-localize's output files."""
    document = read_poses(out_dir / "poses.json")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    scale = document.frame.scale
    # Every query is finished (a live page fills in as they do).
    page.get_by_text(f"{len(document.records)} queries", exact=False).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    text = _panel_text(page)
    assert "running" not in text
    # One row per query: its image, rotation and translation error of the refined pose.
    rows = [line for line in text.splitlines() if " · " in line and not line.startswith("success")]
    expected = []
    for record in document.records:
        rot, trans = record.errors(scale)
        failed = record.status in ("failed", "rejected") or rot is None
        expected.append(f"{Path(record.image).stem} · " + (record.status if failed else f"{rot:.2f}° · {trans:.4f}"))
    assert rows == expected
    # The summary's numbers are metrics.json's.
    assert (f"median error {metrics['rot_deg_median']:.4f}° / {metrics['trans_scene_median']:.5f}, "
            f"mean {metrics['rot_deg_mean']:.4f}° / {metrics['trans_scene_mean']:.5f}") in text
    for key, rate in metrics["success_rates_scene_units"].items():
        deg, dist = key.split("deg_")
        assert f"({deg}°, {dist}) {100.0 * rate:.1f}%" in text
    # The side panel does not scroll sideways (nerfstudio's own controls stay visible).
    widths = page.evaluate(
        "() => [...document.querySelectorAll('.mantine-ScrollArea-viewport')]"
        ".filter(e => e.clientWidth > 0).map(e => [e.scrollWidth, e.clientWidth])"
    )
    assert widths and all(scroll <= client for scroll, client in widths), widths
    # The overlay is in the browser's scene tree (viser's "Connection & diagnostics" view).
    page.locator(".tabler-icon-adjustments").click()
    page.get_by_text("/localization", exact=True).click()
    names = [f"/localization/{Path(r.image).name}" for r in document.records]
    for name in names:
        page.get_by_text(name, exact=True).wait_for(timeout=10_000)
    page.get_by_text(names[0], exact=True).click()
    for kind in ("refined", "initial", "gt", "path"):
        page.get_by_text(f"{names[0]}/{kind}", exact=True).wait_for(timeout=10_000)
    page.locator(".tabler-icon-arrow-back").click()
    page.get_by_text("Localization", exact=True).scroll_into_view_if_needed()


@pytest.fixture(scope="module")
def live_run(small_gsloc_run, tmp_path_factory):
    """``ns-localize --viewer`` running (a subprocess): ``(process, url, output dir)``; killed at the end."""
    out_dir = tmp_path_factory.mktemp("live")
    port = _free_port()
    command = [str(Path(sys.executable).parent / "ns-localize"), "--load-config", str(small_gsloc_run), "--output-dir",
               str(out_dir), "--viewer", "--viewer-host", "127.0.0.1", "--viewer-port", str(port), *FAST]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    # The default Ctrl-C action in the child: a suite started as a background job (`cmd &`) ignores SIGINT, and
    # Python then installs no KeyboardInterrupt handler in the child.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    yield process, f"http://127.0.0.1:{port}", out_dir
    if process.poll() is None:
        process.kill()
        process.wait()


def _read_until(process, pattern: str, timeout: float) -> str:
    """The process's output up to the first line containing ``pattern`` (fails on exit or timeout)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"ns-localize exited before printing {pattern!r}:\n" + "".join(seen[-40:]))
        seen.append(line)
        if pattern in line:
            return "".join(seen)
    pytest.fail(f"no {pattern!r} within {timeout} s:\n" + "".join(seen[-40:]))


def test_ns_localize_viewer_in_a_browser(browser, live_run, tmp_path):
    """The live viewer: opened while localizing, it fills in, stays open after the run, and Ctrl-C ends it."""
    process, url, out_dir = live_run
    _read_until(process, f"Viewer running locally at: {url}", timeout=300)  # before the optimisation starts
    page = _open(browser, url)
    _read_until(process, "press Ctrl-C to quit", timeout=300)
    _check_page(page, out_dir)
    page.mouse.move(300, 400)  # no tooltip in the picture
    _screenshot(page, tmp_path / "viewer-live.png")
    page.close()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0


def test_gsloc_view_in_a_browser(browser, live_run, small_gsloc_run, tmp_path):
    """gsloc-view on that output: the same panel, and clicking a row puts the camera on the refined frustum."""
    from nerfstudio_gsloc.scripts.view import ViewCLI, serve

    _, _, out_dir = live_run
    if not (out_dir / "metrics.json").is_file():
        pytest.fail("the ns-localize --viewer test did not leave its output")
    port = _free_port()
    viewer_state, overlay = serve(ViewCLI(load_config=small_gsloc_run, poses=out_dir / "poses.json", port=port,
                                          host="127.0.0.1"))
    server = viewer_state.viser_server
    try:
        page = _open(browser, f"http://127.0.0.1:{port}")
        _check_page(page, out_dir)
        label = next(iter(overlay.drawn))
        page.get_by_role("button", name=overlay.panel.row_info[label][0]).click()
        target = overlay.drawn[label].handles["refined"]
        import viser.transforms as vtf

        target_forward = vtf.SO3(target.wxyz).as_matrix()[:, 2]

        def forward_of(camera):
            forward = np.asarray(camera.look_at) - np.asarray(camera.position)
            return forward / np.linalg.norm(forward)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the browser moves its camera and reports it back (position and
            cameras = [client.camera for client in server.get_clients().values()]  # look-at may come separately)
            if cameras and np.allclose(cameras[0].position, target.position, atol=1e-4) and np.allclose(
                    forward_of(cameras[0]), target_forward, atol=1e-4):
                break
            time.sleep(0.2)
        camera = cameras[0]
        np.testing.assert_allclose(camera.position, target.position, atol=1e-4)
        np.testing.assert_allclose(forward_of(camera), target_forward, atol=1e-4)
        page.get_by_text("iterations,", exact=False).first.wait_for(timeout=10_000)  # the row's details
        # A picture for the README: from behind and above that query, its frustum and thumbnail in the scene.
        page.get_by_role("button", name="Hide Train Cams").click()
        rotation = vtf.SO3(target.wxyz).as_matrix()
        with server.get_clients()[max(server.get_clients())].atomic():
            client = server.get_clients()[max(server.get_clients())]
            client.camera.position = target.position - 1.5 * rotation[:, 2] - 0.6 * rotation[:, 1]
            client.camera.look_at = target.position + 1.0 * rotation[:, 2]
        page.mouse.move(300, 400)
        time.sleep(3)
        _screenshot(page, tmp_path / "viewer-gsloc-view.png")
        page.close()
    finally:
        server.stop()
