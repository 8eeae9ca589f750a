"""A headless Chromium for the dashboard's browser tests: Debian's `chromium`, driven by
Playwright from PyPI (never a browser of Playwright's own: nothing is downloaded).

Without chromium these tests skip, saying how to get it, except under CI=true, where that
fails the run (`.ci/setup-system`, which `make test` runs, installs it as root).
"""

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI

CHROMIUM = os.environ.get("TRAINSVC_TEST_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that reaches outside the machine (updates, sync, QUIC probes).
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


def _missing(reason: str) -> None:
    message = (
        f"{reason}: the dashboard's browser tests need Debian's chromium "
        "(`apt-get install chromium`, or `make test` as root) and the dev extras (playwright)"
    )
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """One browser for the session; each test opens its own context (its own sessionStorage)."""
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        _missing(f"no chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
