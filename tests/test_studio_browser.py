"""The studio in headless Chromium: every tab opens and draws, a screenshot of each, no JavaScript errors.

Driven by Playwright's Python package with the system's Chromium (`executable_path`; Playwright never
downloads a browser here). Screenshots go to test-output/browser/<tab>.png in the repository (git-ignored)
so a person can look at what the test saw. Skipped when Chromium is not installed, except under CI, whose
.ci/run installs it: there a missing browser is a broken install step, not a reason to skip.
"""

import os
import shutil

import pytest

from conftest import REPO

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -r requirements-dev.txt)"
)
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must run the browser test, but chromium is missing: check the install step in .ci/run")
    pytest.skip("Chromium is not installed (Debian/Ubuntu: apt-get install chromium)", allow_module_level=True)

OUTPUT = REPO / "test-output" / "browser"
# The machine's network is closed: without the background-networking flags Chromium keeps trying (and
# failing) to reach Google's services. --no-sandbox because tests run as root here.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Each tab and a label only that tab shows once its components have drawn.
TABS = {
    "Dataset": "Validation report",
    "Train": "Learning rate",
    "Metrics": "Runs (choose several to overlay)",
    "Models": "Import a bundle (.zip)",
    "Chat": "System prompt",
}


def test_every_tab_draws_without_javascript_errors(studio_url, tmp_path):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        # A persistent context on a new folder: the fresh --user-data-dir the browser must start with.
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = browser.new_page()
            # "error" is Chromium's SEVERE level: console.error, failed resource loads (4xx/5xx) and
            # uncaught exceptions (also reported separately as page errors).
            page.on(
                "console",
                lambda message: (
                    message.type == "error"
                    and errors.append(f"console: {message.text} at {message.location.get('url')}")
                ),
            )
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.goto(studio_url, wait_until="load")
            for name, label in TABS.items():
                tab = page.get_by_role("tab", name=name)
                tab.click()
                sync_api.expect(tab).to_have_attribute("aria-selected", "true")
                sync_api.expect(page.get_by_text(label).first).to_be_visible()
                # The tab's refresh (and any first draw) has finished once no "processing" spinner is left.
                page.wait_for_function("() => !document.querySelector('.progress-text')", timeout=30_000)
                page.screenshot(path=OUTPUT / f"{name.lower()}.png")
                assert (OUTPUT / f"{name.lower()}.png").stat().st_size > 5_000, f"{name}: blank screenshot"
            # The listener works: an error logged now is caught, so an empty list above means no errors.
            with page.expect_console_message(lambda message: message.type == "error"):
                page.evaluate("console.error('apertis-probe')")
        finally:
            browser.close()
    assert errors.pop().startswith("console: apertis-probe"), errors
    assert not errors, "JavaScript errors in the studio page:\n" + "\n".join(errors)
