"""The playground page in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import os
import shutil

import pytest

from .test_serve import Server

# slow: a server and a browser
pytestmark = pytest.mark.slow

pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra")
playwright = pytest.importorskip(
    "playwright.sync_api", reason="the page test needs Playwright (pip install playwright)"
)
CHROMIUM = os.environ.get("LAYERDECODE_CHROMIUM") or shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "no chromium browser installed (apt-get install chromium, or set LAYERDECODE_CHROMIUM)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    # Playwright's node driver fails to start with OpenBLAS preloaded (see .ci/run): the
    # browser side runs without it; the server keeps it.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        p = playwright.sync_playwright().start()
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    yield browser
    browser.close()
    p.stop()


def test_playground_streams_two_answers_and_colours_tokens(tiny_model_dir, browser, tmp_path):
    with Server(tiny_model_dir, "--api-key", "sesame") as server:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        assert page.title() == "layerdecode playground"
        page.fill("#prompt", "w1 w2 w3")
        page.fill("#max-tokens", "12")
        page.fill("#api-key", "sesame")
        page.select_option("#pane-a .strategy", "final")
        page.select_option("#pane-b .strategy", "fixed")
        page.fill("#pane-b .params", '{"layer": 2}')
        page.click("#run")
        for pane in ("#pane-a", "#pane-b"):
            page.wait_for_selector(f"{pane}[data-state=done]", timeout=30_000)
        final_tokens = page.locator("#pane-a .answer .tok")
        fixed_tokens = page.locator("#pane-b .answer .tok")
        assert final_tokens.count() > 0 and fixed_tokens.count() > 0
        assert set(final_tokens.evaluate_all("ts => ts.map(t => t.dataset.layer)")) == {"5"}
        assert set(fixed_tokens.evaluate_all("ts => ts.map(t => t.dataset.layer)")) == {"2"}
        backgrounds = fixed_tokens.evaluate_all(
            "ts => ts.map(t => getComputedStyle(t).backgroundColor)"
        )
        assert all(b not in ("rgba(0, 0, 0, 0)", "transparent") for b in backgrounds)
        assert "non-final share 100%" in page.inner_text("#pane-b .stats")
        assert "non-final share 0%" in page.inner_text("#pane-a .stats")
        assert "tokens/s" in page.inner_text("#pane-a .stats")
        assert page.locator("#legend .sw").count() == 6
        page.screenshot(path=str(tmp_path / "playground.png"))
        # A wrong key is shown as the server's error, in the page.
        page.fill("#api-key", "wrong")
        page.click("#run")
        page.wait_for_selector("#pane-a[data-state=error]", timeout=30_000)
        assert "API key" in page.inner_text("#pane-a .stats")
        assert not errors
