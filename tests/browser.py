"""Drive Debian's headless chromium over the DevTools protocol (websockets), for the report tests.

`open_page(url)` loads a page and returns what a reader would see go wrong: console errors,
uncaught exceptions, failed requests, and every <img> with whether it loaded (complete and a
natural width). playwright's own browser download cannot run here, so this speaks the protocol
directly to the system's chromium (`apt-get install chromium`; scripts/setup.sh installs it).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str | None:
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # {src, complete, naturalWidth}
    audio: list[str] = field(default_factory=list)  # src of every <audio>
    title: str = ""
    screenshot: bytes | None = None


@contextmanager
def chromium(width: int = 1200, height: int = 900):
    """A headless chromium with remote debugging; yields the DevTools HTTP base URL."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("no chromium on PATH: `apt-get install -y chromium` (scripts/setup.sh installs it)")
    profile = tempfile.mkdtemp(prefix="echat-chromium-")
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
         f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools server")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


class _Session:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        deadline = time.time() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.time() + timeout
        while time.time() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            self.events.append(message)
            if message.get("method") == method:
                return message
        raise TimeoutError(method)

    def drain(self, seconds: float) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.05, deadline - time.time()))))
            except TimeoutError:
                return


def open_page(url: str, *, screenshot: bool = False, width: int = 1200, height: int = 900) -> PageReport:
    from websockets.sync.client import connect

    with chromium(width, height) as base:
        with urllib.request.urlopen(f"{base}/json/list") as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
            s = _Session(ws)
            for domain in ("Page", "Runtime", "Log", "Network"):
                s.call(f"{domain}.enable")
            s.call("Page.navigate", {"url": url})
            s.wait_for("Page.loadEventFired")
            s.drain(0.5)  # late console messages and image decodes
            report = PageReport()
            for e in s.events:
                method, params = e.get("method"), e.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    report.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
                elif method == "Runtime.exceptionThrown":
                    report.exceptions.append(str(params.get("exceptionDetails", {}).get("text")))
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    report.console_errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
                elif method == "Network.loadingFailed":
                    report.failed_requests.append(str(params.get("errorText")))
            probe = ("JSON.stringify({title: document.title, "
                     "images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete, naturalWidth: i.naturalWidth})), "
                     "audio: [...document.querySelectorAll('audio')].map(a => a.getAttribute('src'))})")
            value = json.loads(s.call("Runtime.evaluate", {"expression": probe, "returnByValue": True})["result"]["value"])
            report.title, report.images, report.audio = value["title"], value["images"], value["audio"]
            if screenshot:
                shot = s.call("Page.captureScreenshot", {"format": "png"})
                report.screenshot = base64.b64decode(shot["data"])
            return report
