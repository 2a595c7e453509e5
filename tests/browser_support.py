"""Pages in a real browser (no tests here): `load` opens a page in Debian's headless chromium over the
DevTools protocol and returns what the page logged and requested while it loaded and the value of a script
run in it; `check_report_page` asserts what every report.html must be.

The tests that use it skip when chromium is not installed (tests/run.sh installs it as root).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from common.protocol import ALL
from common.stats.report import roc_name, section_title

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "Debian's chromium is not installed (apt-get install chromium; tests/run.sh does it as root)"


@dataclass
class Loaded:
    value: Any
    """What the script returned."""
    errors: list[str] = field(default_factory=list)
    """Uncaught exceptions, console errors and warnings, the browser's own error and warning log entries
    (a refused or failed load, a Content-Security-Policy violation) and failed requests."""
    requests: list[str] = field(default_factory=list)
    """Every URL the page requested."""


class _DevTools:
    """Calls and events over the browser's DevTools websocket, each wait bounded by one deadline."""

    def __init__(self, socket: Any, deadline: float) -> None:
        self.socket, self.deadline, self.last_id = socket, deadline, 0
        self.events: list[dict[str, Any]] = []

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self.socket.recv(timeout=max(self.deadline - time.monotonic(), 0.01)))
        if "method" in message:
            self.events.append(message)
        return message

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params,
                                     **({"sessionId": session} if session else {})}))
        while (reply := self._receive()).get("id") != self.last_id:
            pass
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str) -> None:
        while not any(event["method"] == method for event in self.events):
            self._receive()


def _errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        elif method == "Network.loadingFailed":
            errors.append(f"request failed: {params['errorText']}")
    return errors


def load(path: Path, script: str, timeout_s: float = 60.0) -> Loaded:
    """Open `path` in a fresh headless chromium, wait for its load event, run `script` (an expression,
    awaited if a promise) and close the browser; everything within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="fedmammo-chromium-") as profile:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1000",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"  # chromium writes its port, then its path
            while len(lines := (port_file.read_text().split() if port_file.is_file() else [])) < 2:
                if browser.poll() is not None:
                    raise RuntimeError(f"chromium exited with status {browser.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("chromium did not open its DevTools port")
                time.sleep(0.1)
            with connect(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_size=None, proxy=None,
                         open_timeout=max(deadline - time.monotonic(), 1)) as socket:
                devtools = _DevTools(socket, deadline)
                target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
                session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    devtools.call(f"{domain}.enable", session)
                devtools.call("Page.navigate", session, url=path.resolve().as_uri())
                devtools.wait_for("Page.loadEventFired")
                result = devtools.call("Runtime.evaluate", session, expression=script, awaitPromise=True,
                                       returnByValue=True)
                if "exceptionDetails" in result:
                    raise RuntimeError(f"the test's script failed: {result['exceptionDetails']}")
                requests = [e["params"]["request"]["url"] for e in devtools.events
                            if e["method"] == "Network.requestWillBeSent"]
                return Loaded(result["result"].get("value"), _errors(devtools.events), requests)
        finally:
            _stop(browser)


def _stop(browser: subprocess.Popen[bytes]) -> None:
    """End the browser and its helper processes: the process group `load` started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(browser.pid, sig)
            browser.wait(timeout=10)
            return
        except ProcessLookupError:  # already gone
            browser.wait()
            return
        except subprocess.TimeoutExpired:
            continue


REPORT_SCRIPT = """(async () => {
  const images = [...document.images];
  await Promise.all(images.map(image => image.decode().catch(() => null)));
  const figures = [];
  let heading = null;
  for (const element of document.querySelectorAll("h1, h2, h3, h4, img")) {
    if (element.tagName === "IMG") figures.push({heading, src: element.src, width: element.naturalWidth});
    else heading = element.textContent;
  }
  return {
    figures,
    tables: [...document.querySelectorAll("table")].map(
      table => [...table.rows].map(row => [...row.cells].map(cell => cell.textContent))),
    active: document.querySelectorAll("script, iframe, object, embed, link, base, form, [onerror], [onload]")
      .length,
    text: document.body.innerText,
  };
})()"""
"""What the report check reads from the loaded page: each image (decoded) with the heading above it, every
table's cells, the number of elements that could run or fetch anything, and the page's visible text."""


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The tables of a Markdown text, as their cells' plain text (bold and code marks dropped)."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if not line.startswith("|"):
            previous = line
            continue
        if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            continue
        if not previous.startswith("|"):
            tables.append([])
        tables[-1].append([cell.strip().replace("**", "").replace("`", "")
                           for cell in line.strip().strip("|").split("|")])
        previous = line
    return tables


def check_report_page(folder: Path) -> Loaded:
    """Open the report folder's report.html in chromium and assert: no error or warning logged, nothing
    requested but the page and its data: URIs, nothing that runs; every table of report.md, in order, with
    the same cells; every PNG of the folder embedded byte for byte, decoded, under the heading of its group
    (the learning curves under theirs)."""
    page = load(folder / "report.html", REPORT_SCRIPT)
    assert page.errors == []
    assert {url for url in page.requests if not url.startswith("data:")} == {
        (folder / "report.html").resolve().as_uri()}
    assert page.value["active"] == 0
    tables = markdown_tables((folder / "report.md").read_text())
    assert tables and page.value["tables"][:len(tables)] == tables
    evaluation = json.loads((folder / "report.json").read_text())["evaluation"]
    headings = {roc_name(group): f"{section_title(group)} (n = "
                for group in [ALL, *evaluation["subgroups"]]}
    headings["learning_curves.png"] = "Learning curves"
    pngs = {path.read_bytes(): path.name for path in folder.glob("*.png")}
    shown = {pngs[base64.b64decode(figure["src"].removeprefix("data:image/png;base64,"))]: figure
             for figure in page.value["figures"]}
    assert len(page.value["figures"]) == len(shown) and sorted(shown) == sorted(pngs.values())
    for name, figure in shown.items():
        assert figure["width"] > 0 and figure["heading"].startswith(headings[name]), (name, figure["heading"])
    return page
