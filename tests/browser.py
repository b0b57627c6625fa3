"Shared by the browser tests: Debian's Chromium driven by Playwright (never Playwright's own browser download)."
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT/"tests"/"output"/"screenshots"
CHROMIUM = os.environ.get("MINDDIFFUSER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@contextmanager
def browser_context(viewport=(1280, 900)):
    "A fresh Chromium profile, headless, no network but loopback; yields a Playwright browser context."
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                    viewport={"width": viewport[0], "height": viewport[1]})
        try: yield ctx
        finally: ctx.close()


def screenshot_path(name:str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS/f"{name}.png"
