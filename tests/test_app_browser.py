"""The page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser download):
upload an image, paint a stroke on the editor's canvas, type a prompt, Generate -> an output image appears.
The screenshot is kept as tests/artifacts/app_browser.png (git-ignored)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app_url(tiny_sources, tmp_path_factory):
    """The app in a thread of this process (tiny model), on a free loopback port."""
    import torch

    from diffsynth_edit.app.service import EditService
    from diffsynth_edit.app.testing import free_port, make_test_checkpoint, wait_for_http
    from diffsynth_edit.app.ui import build_ui, launch
    from diffsynth_edit.editing.editor import Editor
    from diffsynth_edit.loading import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, much faster on a loaded machine
    pipe = load_pipeline(tiny_sources, torch_dtype=torch.float32)
    train = tmp_path_factory.mktemp("browser") / "train"
    make_test_checkpoint(pipe.dit, train / "demo-run" / "step-50.safetensors", step=50, with_ste=True)
    service = EditService(Editor(pipe, variant="2511", hot_swap=True), [train])
    demo = build_ui(service, default_steps=4)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url + "config", timeout=60)
        yield url
    finally:
        demo.close()
        torch.set_num_threads(threads)


def _upload(page, editor, path: Path, attempts: int = 3) -> None:
    """Upload through the editor's own upload area; wait until the image is on the canvas (the placeholder goes).
    Retried: a click that lands while the page is still wiring its handlers is occasionally lost."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    placeholder = editor.get_by_text("Upload an image")
    for _ in range(attempts):
        with page.expect_file_chooser(timeout=15000) as chooser:
            placeholder.click()
        chooser.value.set_files(str(path))
        try:
            placeholder.wait_for(state="hidden", timeout=20000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the uploaded image never appeared on the canvas ({attempts} attempts)")


@pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                    reason=f"chromium not installed at {CHROMIUM} (apt-get install -y chromium; scripts/setup.sh "
                           "installs it in test mode)")
def test_paint_mask_and_generate_in_the_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    src = tmp_path / "upload.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(src)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            page.goto(app_url, wait_until="load")
            editor = page.locator("#edit-canvas")
            editor.wait_for(timeout=30000)
            page.wait_for_timeout(500)
            _upload(page, editor, src)
            canvas = editor.locator("canvas").first
            page.wait_for_timeout(500)
            # the brush is the active tool after an upload; paint one stroke over the middle of the image
            # (few mouse events: every one re-renders the canvas, slow with software WebGL)
            box = canvas.bounding_box()
            x0, y0 = box["x"] + box["width"] * 0.40, box["y"] + box["height"] * 0.45
            page.mouse.move(x0, y0)
            page.mouse.down()
            for i in range(1, 5):
                page.mouse.move(x0 + i * 20, y0 + i * 6)
            page.mouse.up()
            page.wait_for_timeout(300)
            page.locator("#checkpoint input").fill("demo-run/step-50.safetensors")
            page.keyboard.press("Enter")
            page.locator("#prompt textarea").fill("turn the painted area into a red ball")
            page.locator("#generate").click()
            page.locator("#output-image img").wait_for(timeout=60000)
            page.locator("#output-sub img").wait_for(timeout=10000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "app_browser.png"), full_page=True)
            settings_text = page.locator("#settings").inner_text()
            status = page.locator("#status").inner_text()
        finally:
            browser.close()
    assert (ARTIFACTS / "app_browser.png").stat().st_size > 10_000
    compact = "".join(settings_text.split())
    assert '"mask":"painted"' in compact, settings_text          # the stroke became the mask
    assert '"size":[320,240]' in compact, settings_text          # the canvas kept the image's size
    assert '"checkpoint":"demo-run/step-50.safetensors"' in compact and '"mode":"bridge"' in compact
    assert "Done" in status
