"""A real headless browser for the tests: Debian's chromium (installed with apt-get when
missing, through ensure_tool), driven by Playwright's Python client. Never `playwright
install`: its own browser downloads are not how this project gets a browser."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import BrowserContext, sync_playwright

from sidecar.dev.processes import ensure_tool

# Headless, as root (no sandbox), on a machine without a network: nothing started that
# would reach out (updates, sync, first-run pages, background fetches).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """A browser with a fresh profile in `profile`, closed on exit."""
    binary = ensure_tool("chromium", "chromium")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=binary,
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 1400},
        )
        try:
            yield context
        finally:
            context.close()
