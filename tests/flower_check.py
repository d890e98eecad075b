"""Drive Flower's pages in a real headless Chromium (Debian's ``chromium``), over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no websocket
client; it works across network namespaces).

    with Chromium(host.command, workdir) as browser:       # host: tests.netns.Host, or None
        page = browser.open("http://10.77.1.1:5555/workers", basic_auth="admin:pw")
        rows = page.wait_for(WORKER_ROWS_JS, lambda rows: len(rows) == 4)
        page.screenshot("test-artifacts/flower-workers.png")

What a check asserts on is what the page shows after its JavaScript ran: the text of
the table cells and of the badges, read from the DOM.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

# Debian's package: /usr/bin/chromium is a shell launcher (it adds flags and Google API keys
# to the environment); the browser itself is /usr/lib/chromium/chromium.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")

# The rows of Flower's workers table, as shown: [worker, status, active, processed, failed, succeeded, load].
WORKER_ROWS_JS = """(() => {
  const rows = document.querySelectorAll('#workers-table tbody tr');
  return Array.from(rows).filter(tr => tr.cells.length > 1)
    .map(tr => Array.from(tr.cells).map(td => td.innerText.trim()));
})()"""

# The summary cards of the workers page ("Online workers", "Succeeded", ...) as shown.
WORKER_METRICS_JS = """(() => {
  const get = id => (document.getElementById(id) || {}).innerText;
  return {online: get('workers-online'), active: get('workers-active'),
          succeeded: get('workers-succeeded'), failed: get('workers-failed'),
          refresh: get('workers-refresh-status')};
})()"""

# The tasks page's own count line ("Showing 1 to 12 of 12 tasks ..."), once its table has loaded.
TASKS_INFO_JS = """(() => {
  const info = document.getElementById('tasks-table_info');
  const busy = document.getElementById('tasks-table_processing');
  if (!info || (busy && busy.offsetParent !== null)) return null;
  return info.innerText.trim();
})()"""


def _high_fd(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def chromium_path() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        if Path(c).exists():
            return c
    return shutil.which("chromium")


class CdpError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium process and its DevTools pipe."""

    def __init__(self, wrap=None, workdir: str | os.PathLike = ".", *, width: int = 1400, height: int = 900,
                 env: dict | None = None):
        exe = chromium_path()
        if not exe:
            raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
        self.workdir = Path(workdir)
        profile = self.workdir / f"chromium-profile-{os.getpid()}-{time.monotonic_ns()}"
        profile.mkdir(parents=True)
        self.width, self.height = width, height
        # fd 3: commands to the browser; fd 4: its answers and events
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        cmd_r, res_w = (_high_fd(cmd_r), _high_fd(res_w))  # never 3 or 4 themselves
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
                "--no-default-browser-check", "--disable-features=Translate,OptimizationHints,MediaRouter",
                "--metrics-recording-only", "--password-store=basic", "--use-mock-keychain",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars",
                "--remote-debugging-pipe", "about:blank"]
        shell = [  # the pipe ends moved to fds 3 and 4, where Chromium expects them (bash: fds >= 10)
            "bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{res_w} {cmd_r}<&- {res_w}>&-', "bash", *args]
        full = wrap(shell) if wrap else shell
        self.log_path = self.workdir / "chromium.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(full, stdout=log, stderr=log, pass_fds=(cmd_r, res_w),
                                     env=env if env is not None else {**os.environ, "HOME": str(profile)},
                                     start_new_session=True)
        log.close()
        os.close(cmd_r)
        os.close(res_w)
        self._next = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue] = {}
        self.events: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send("Browser.getVersion", timeout=60)  # up and answering

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._res_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                for q in list(self._waiting.values()):
                    q.put({"error": {"message": "chromium closed its pipe"}})
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg and msg["id"] in self._waiting:
                    self._waiting[msg["id"]].put(msg)
                else:
                    self.events.put(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        with self._lock:
            self._next += 1
            mid = self._next
            q: queue.Queue = queue.Queue()
            self._waiting[mid] = q
            msg = {"id": mid, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise CdpError(f"{method}: no answer within {timeout}s (see {self.log_path})") from None
        finally:
            self._waiting.pop(mid, None)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open(self, url: str, basic_auth: str | None = None) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        page.call("Page.enable")
        page.call("Network.enable")
        if basic_auth:
            token = base64.b64encode(basic_auth.encode()).decode()
            page.call("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        page.goto(url)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except CdpError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        for fd in (self._cmd_w, self._res_r):
            try:
                os.close(fd)
            except OSError:
                pass


class Page:
    def __init__(self, browser: Chromium, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def call(self, method: str, params: dict | None = None, timeout: float = 30):
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str, timeout: float = 30) -> None:
        res = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if res.get("errorText"):
            raise CdpError(f"cannot open {url}: {res['errorText']}")
        self.wait_for("document.readyState", lambda s: s == "complete", timeout=timeout, what=f"{url} to load")

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if res.get("exceptionDetails"):
            raise CdpError(f"script failed: {res['exceptionDetails'].get('text')}: "
                           f"{res['exceptionDetails'].get('exception', {}).get('description')}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, predicate=bool, timeout: float = 30, what: str = "the page"):
        """Evaluate ``expression`` until ``predicate(value)`` holds; return that value."""
        end = time.time() + timeout
        value = None
        while time.time() < end:
            value = self.evaluate(expression)
            try:
                if predicate(value):
                    return value
            except (TypeError, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {value!r}")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def worker_table(page: Page) -> dict[str, dict]:
    """Flower's workers table as shown: {worker name: {status, active, processed, failed, succeeded}}."""
    out = {}
    for cells in page.evaluate(WORKER_ROWS_JS) or []:
        if len(cells) < 6:
            continue
        out[cells[0]] = {"status": cells[1], "active": cells[2], "processed": cells[3], "failed": cells[4],
                         "succeeded": cells[5]}
    return out


def tasks_count(info: str) -> int:
    """The total from the tasks page's line "Showing 1 to 15 of 27 tasks (filtered ...)"."""
    import re

    if info and info.startswith("No tasks"):
        return 0
    m = re.search(r"of ([\d,]+) tasks", info or "")
    if not m:
        raise AssertionError(f"unexpected tasks info line: {info!r}")
    return int(m.group(1).replace(",", ""))
