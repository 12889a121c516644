"""Headless Chromium for the studio's browser tests: the system's Chromium driven by Playwright's Python package.

Playwright never downloads a browser here (`executable_path`). A test is skipped when Chromium or
playwright is missing, except under CI, whose .ci/run installs both: there a missing browser is a broken
install step, not a reason to skip. Screenshots go to test-output/browser/ (git-ignored) so a person can
look at what a test saw.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

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


def _require(found, what: str, install: str):
    if found is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError(
                f"CI must run the browser tests, but {what} is missing: check the install step in .ci/run"
            )
        pytest.skip(f"{what} is not installed ({install})")
    return found


def sync_api():
    """playwright.sync_api, or a skip (an error under CI)."""
    try:
        import playwright.sync_api as api
    except ImportError:
        api = None
    return _require(api, "playwright", "pip install -r requirements-dev.txt")


@contextlib.contextmanager
def open_page(profile: Path, width: int = 1280, height: int = 800) -> Iterator[tuple[object, list[str]]]:
    """(page, errors): a fresh browser profile in `profile`; `errors` collects console errors and uncaught
    exceptions ("error" is Chromium's SEVERE level: console.error, failed loads (4xx/5xx), exceptions)."""
    api = sync_api()
    chromium = _require(shutil.which("chromium"), "Chromium", "Debian/Ubuntu: apt-get install chromium")
    errors: list[str] = []
    with api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height}, accept_downloads=True,
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(
                f"console: {message.text} at {message.location.get('url')}"))  # fmt: skip
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            yield page, errors
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    """Save what the page shows now as test-output/browser/<name>.png; a blank page fails the test."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    page.screenshot(path=path)
    assert path.stat().st_size > 5_000, f"{name}: blank screenshot"
    return path


def settle(page) -> None:
    """Wait until no Gradio "processing" spinner is left (handlers and first draws finished)."""
    page.wait_for_function("() => !document.querySelector('.progress-text')", timeout=60_000)
