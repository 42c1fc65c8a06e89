"""End to end in headless Chromium: upload a video, draw a mask, propagate, click a pixel, correct a frame,
screenshot.

Drives Debian's /usr/bin/chromium through Playwright (no browser download); skipped with a reason
when either is missing. The screenshot path is printed (run pytest with -s to see it).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from app_fixtures import make_checkpoints, make_clip, start_app, stop_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
N_FRAMES = 6
CLIP_SIZE = (256, 144)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (bash scripts/setup.sh --test installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(davis2016_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("app_browser")
    video, _, _ = make_clip(davis2016_root, root / "clip", N_FRAMES, CLIP_SIZE)
    make_checkpoints(root / "checkpoints")
    proc, url = start_app(root / "checkpoints", root / "server.log")
    yield {"url": url, "video": video, "log": root / "server.log"}
    stop_app(proc)


def _wait_text(page, selector: str, text: str, timeout_s: float) -> None:
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); return el && el.innerText.includes(text); }",
        arg=[selector, text], timeout=timeout_s * 1000,
    )


def _draw_strokes(page, canvas, x0: float, x1: float, rows: tuple[float, ...]) -> None:
    """Horizontal brush strokes from x0 to x1 (offsets from the canvas centre), one per row offset."""
    page.wait_for_timeout(1000)
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    # A first dot sets the brush's start point; without it the first stroke began at the canvas corner.
    page.mouse.move(cx + x0, cy)
    page.mouse.down()
    page.mouse.up()
    page.wait_for_timeout(300)
    # Few pointer steps: every step re-renders the editor's WebGL canvas, which is slow in software.
    for dy in rows:
        page.mouse.move(cx + x0, cy + dy)
        page.mouse.down()
        page.mouse.move(cx + x1, cy + dy, steps=3)
        page.mouse.up()


def test_upload_draw_propagate_click_screenshot(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server["url"])
        page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
        t_upload = time.perf_counter()
        page.set_input_files("#upload input[type=file]", str(server["video"]))
        _wait_text(page, "#input-info", f"{N_FRAMES} frames", 60)
        t_loaded = time.perf_counter()

        # Draw obj1 (the editor's first layer, active by default) with a few strokes over the swan.
        canvas = page.locator("#editor canvas").first
        canvas.wait_for(state="visible", timeout=30_000)
        _draw_strokes(page, canvas, -60, 10, (0, 16))

        t_drawn = time.perf_counter()
        page.click("#propagate")
        _wait_text(page, "#status", "Done", 240)
        status = page.inner_text("#status")
        t_done = time.perf_counter()
        assert "1 object(s)" in status, status

        # Frame 3, then click the middle of A's view.
        number = page.locator("#frame input[type=number]")
        number.fill("3")
        number.press("Enter")
        page.wait_for_timeout(1500)
        img = page.locator("#view-a img").first
        img.wait_for(state="visible", timeout=30_000)
        ib = img.bounding_box()
        t_click = time.perf_counter()
        img.click(position={"x": ib["width"] * 0.45, "y": ib["height"] * 0.6})  # scrolls it into view first
        _wait_text(page, "#readout", "Entropy", 150)  # generous: CI machines may be loaded
        t_heat = time.perf_counter()
        readout = page.inner_text("#readout")
        assert "A: stcn-s_baseline" in readout and "B: stcn-s_corr" in readout
        assert page.locator("#gallery-a img").count() >= 1
        # The strip's <img> loads lazily: only once it is scrolled near the viewport, as a person would.
        page.locator("#strip").scroll_into_view_if_needed()
        page.locator("#strip img").first.wait_for(state="visible", timeout=30_000)

        # Correct frame 3: it goes into the editor with B's masks; one more stroke, then re-propagate from it.
        t_fix = time.perf_counter()
        page.click("#fix")
        _wait_text(page, "#status", "Frame 3 is in the editor", 60)
        canvas.scroll_into_view_if_needed()
        _draw_strokes(page, canvas, -40, 20, (8,))
        page.click("#repropagate")
        _wait_text(page, "#status", "corrected frame(s) 3", 240)
        fixed_status = page.inner_text("#status")
        assert f"Done: 2 of {N_FRAMES} frames propagated from frame 3" in fixed_status, fixed_status
        t_fixed = time.perf_counter()

        out = tmp_path / "app_browser.png"  # pytest keeps the last few runs' folders, then removes them
        page.screenshot(path=str(out), full_page=True)
        print(f"\nscreenshot: {out}\nstatus: {status}")
        print(f"upload -> masks for {N_FRAMES} frames ({CLIP_SIZE[0]}x{CLIP_SIZE[1]}, A+B): {t_done - t_upload:.1f} s; "
              f"click -> heatmaps shown: {t_heat - t_click:.2f} s (upload {t_loaded - t_upload:.1f} s, drawing "
              f"{t_drawn - t_loaded:.1f} s, propagate click -> Done {t_done - t_drawn:.1f} s); "
              f"correction of frame 3 -> Done {t_fixed - t_fix:.1f} s")
        assert out.stat().st_size > 10_000
    finally:
        page.close()
