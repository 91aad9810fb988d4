"""A headless Chromium driven over the DevTools protocol (a websocket, through aiohttp's client): load a page, read
what its console and runtime reported, evaluate expressions in it. No browser download: Debian's ``chromium`` (or
``$LOWBAND_CHROMIUM``); ``.ci/run`` installs it. Every wait is bounded."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp


def find_chromium() -> str | None:
    explicit = os.environ.get("LOWBAND_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One page of a headless Chromium. Use ``async with Page.open(url) as page``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.problems: list[str] = []  # console errors, uncaught exceptions, failed loads
        self.console: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                self.console.append(f"{params.get('type')}: {text}")
                if params.get("type") in ("error", "assert"):
                    self.problems.append(f"console.{params.get('type')}: {text}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.problems.append(f"uncaught: {details.get('exception', {}).get('description') or details}")
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                if entry.get("level") == "error":
                    self.problems.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")

    async def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, timeout_s)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def wait_until(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll ``expression`` in the page until it is truthy (bounded); its value."""
        end = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= end:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} ({expression}); page "
                                     f"problems: {self.problems}; console: {self.console[-10:]}")
            await asyncio.sleep(0.25)

    async def screenshot(self, path: Path) -> None:
        import base64

        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


class Chromium:
    """A headless Chromium process with a private profile; ``devtools`` is its DevTools HTTP endpoint."""

    def __init__(self, binary: str, log_path: Path) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="lowband-chromium-"))
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL, start_new_session=True)
        self.devtools = self._wait_port(60.0)

    def _wait_port(self, timeout_s: float) -> str:
        path = self.profile / "DevToolsActivePort"
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before listening")
            if path.exists():
                lines = path.read_text().split()
                if lines and lines[0].isdigit():
                    return f"http://127.0.0.1:{lines[0]}"
            time.sleep(0.1)
        raise RuntimeError(f"chromium wrote no DevToolsActivePort within {timeout_s:.0f} s")

    async def page(self, session: aiohttp.ClientSession) -> Page:
        async with session.put(f"{self.devtools}/json/new?about:blank") as resp:
            target = await resp.json()
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        page = Page(ws)
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await page.call(domain)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
