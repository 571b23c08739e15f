"""What the console's browser tests share: Debian's Chromium (headless,
``/usr/bin/chromium``) driven by Playwright, and a visit that screenshots
every page it lands on to ``$PDG_TEST_SCREENSHOTS`` (default
``tests/.screenshots``), once the page's fonts have loaded."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.conftest import World
from tests.test_console import PASSWORD

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(os.environ.get("PDG_TEST_SCREENSHOTS") or Path(__file__).parent / ".screenshots")
#: Locally a machine without Chromium skips the browser tests; CI installs it and runs them.
MISSING = not CHROMIUM.exists() and os.environ.get("CI") != "true"
SKIP_REASON = "Chromium is not installed at /usr/bin/chromium (apt-get install chromium)"


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium, closed afterwards."""
    from playwright.async_api import async_playwright

    await asyncio.to_thread(SHOTS.mkdir, parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Visit:
    """A page in a browser context of its own, screenshotting each page it lands on."""

    def __init__(self, page: Any, base: str, name: str) -> None:
        self.page, self.base, self.name, self.n = page, base, name, 0

    @classmethod
    async def open(cls, browser: Any, world: World, name: str) -> Visit:
        context = await browser.new_context(
            locale="zh-CN", viewport={"width": 1280, "height": 800}, accept_downloads=True
        )
        return cls(await context.new_page(), f"http://127.0.0.1:{world.client.server.port}", name)

    async def shot(self, label: str) -> None:
        self.n += 1
        await self.page.evaluate("document.fonts.ready.then(() => true)")
        await self.page.screenshot(path=str(SHOTS / f"{self.name}-{self.n:02d}-{label}.png"), full_page=True)

    async def go(self, path: str, label: str) -> Any:
        response = await self.page.goto(self.base + path)
        await self.shot(label)
        return response

    async def submit(self, selector: str, label: str) -> None:
        async with self.page.expect_navigation():
            await self.page.click(f"{selector} button[type=submit]")
        await self.shot(label)

    async def sign_in(self, username: str, password: str = PASSWORD) -> None:
        await self.go("/console/login", "login")
        await self.page.fill("input[name=username]", username)
        await self.page.fill("input[name=password]", password)
        await self.submit("form[action='/console/login']", "signed-in")

    async def download(self, selector: str) -> bytes:
        async with self.page.expect_download() as info:
            await self.page.click(selector)
        download = await info.value
        return await asyncio.to_thread(Path(await download.path()).read_bytes)
