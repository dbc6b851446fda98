"""Headless Chromium for the browser tests: launch flags, a watched page, screenshots.

Needs Debian's ``chromium`` and Playwright's Python package. Without them the tests
skip, saying why; with the ``CI`` environment variable set they fail instead.
"""

from __future__ import annotations

import os
import pathlib
import urllib.parse

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

ARTIFACTS = pathlib.Path(os.environ.get("CONVVIZ_SCREENSHOT_DIR")
                         or pathlib.Path(__file__).parent / "artifacts")
# Set on any element that shows data once everything it asked for has loaded.
IDLE = "[aria-busy='false']"


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser tests must run)")
    pytest.skip(reason)


class Watched:
    """A page whose console errors, CSP violations, uncaught exceptions and alerts are recorded."""

    def __init__(self, browser, color_scheme: str = "light"):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=color_scheme)
        # Runs in every frame, TensorBoard's plugin iframe included; it only listens.
        self.context.add_init_script(
            "window.__csp = []; document.addEventListener('securitypolicyviolation',"
            " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("dialog", self._dialog)

    def _console(self, message):
        # Opening the iframe URL as a top-level page makes Chromium ask for a favicon,
        # which TensorBoard serves only at its root page; that is not the plugin's error.
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            self.problems.append(f"console: {message.text}")

    def _dialog(self, dialog):
        self.problems.append(f"a script opened a dialog: {dialog.message}")
        dialog.dismiss()

    def open(self, server: str, hash_: str = ""):
        """The plugin's iframe document itself, at ``#hash_``."""
        self.page.goto(f"{server}data/plugin_entry.html?name=convviz#{hash_}")
        return self.page

    def assert_clean(self, frame=None):
        csp = (frame or self.page).evaluate("window.__csp")
        assert not csp, f"CSP violations: {csp}"
        assert not self.problems, self.problems


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def hash_state(page) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(page.evaluate("location.hash.slice(1)")))


def mosaic_sources(page) -> list[str]:
    return page.eval_on_selector_all(".cv-grid .cv-mosaic", "els => els.map(e => e.currentSrc)")


def assert_images_loaded(page, selector: str, count: int) -> None:
    sizes = page.eval_on_selector_all(selector, "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(sizes) == count
    assert all(complete and width > 0 for complete, width in sizes), sizes
