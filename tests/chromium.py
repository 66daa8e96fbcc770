"""Prefect's real UI on loopback, seen in Debian's headless Chromium driven by Playwright.

The session's Prefect test server (``prefect_test_harness``) runs its API with the UI turned off, so
:func:`prefect_ui` serves Prefect's own UI app (``create_ui_app``, the one ``prefect server start`` mounts) on
another loopback port, pointed at that API. Playwright drives the distribution's Chromium
(``executable_path``): its own browser download is never needed, and its driver works offline.
``infra/ci/services.sh`` installs ``chromium`` when it is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import socket
import threading
import time
from collections.abc import Iterator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WHY_NOT = "Debian's chromium is not installed: run infra/ci/services.sh (the README's `make test` does)"
TIMEOUT_MS = 15_000  # any one page action or wait; a whole test stays well under its pytest timeout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def prefect_ui(api_url: str, startup_s: float = 30.0) -> Iterator[str]:
    """Prefect's UI (v1, its default) served on loopback against ``api_url``; yields the UI's base URL."""
    import uvicorn
    from prefect.server.api.server import create_ui_app
    from prefect.settings import PREFECT_UI_API_URL, PREFECT_UI_ENABLED, temporary_settings

    with temporary_settings(updates={PREFECT_UI_ENABLED: True, PREFECT_UI_API_URL: api_url}):
        app = create_ui_app(ephemeral=False)
        context = contextvars.copy_context()  # the server's thread answers /ui-settings with these settings
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=context.run, args=(server.run,), daemon=True, name="prefect-ui")
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("Prefect's UI server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def chromium(profile_dir) -> Iterator[object]:
    """A headless Chromium (Debian's binary) under Playwright; yields the Browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, timeout=TIMEOUT_MS,
            # no sandbox: CI containers run as root; the rest keeps Chromium off the network
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", f"--disk-cache-dir={profile_dir}"])
        try:
            yield browser
        finally:
            browser.close()


def field(page, label: str):
    """The schema form's property whose label reads ``label`` (innermost match)."""
    return page.locator(".schema-form-property", has=page.get_by_text(label, exact=True)).last


def choices(page, prop) -> list[str]:
    """The options a schema form's select offers, read from its open popover (then closed again).

    Opened from the keyboard: the select opens on a press of its button, and Playwright's click (a press
    and a release) reads to it as open-then-click-outside."""
    prop.locator("button.p-select-button__control").first.focus()
    page.keyboard.press("ArrowDown")
    options = page.locator(".p-select-options .p-select-option__text")
    options.first.wait_for(timeout=TIMEOUT_MS)
    texts = [text.strip() for text in options.all_inner_texts()]
    page.keyboard.press("Escape")
    return texts


def pick(page, prop, option: str) -> None:
    """Choose ``option`` in a schema form's select, as a person does (open it, click the option)."""
    prop.locator("button.p-select-button__control").first.focus()
    page.keyboard.press("ArrowDown")
    page.locator(".p-select-options .p-select-option", has_text=option).first.click(timeout=TIMEOUT_MS)
