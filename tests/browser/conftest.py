"""Browser tests: a Jupyter server, JupyterLab 4 and Notebook 7, driven by Playwright in Chromium.

What these fixtures do, once per session:

* ``jupyter`` starts ``jupyter server`` from this interpreter on 127.0.0.1, on a free port, with a
  random token (``IdentityProvider.token``), ``--allow-root`` when run as root, a temporary
  ``root_dir`` for the generated test notebooks, and its own config/data/runtime/settings folders
  (so a developer's settings or old workspaces never leak in; the "news" popup is switched off).
  Kernels get ``OMP_NUM_THREADS=1`` and the offline environment.  It is shut down (kernels first,
  through the REST API; then the process group; then any kernel still holding one of its
  connection files) even when a test fails.
* ``browser`` launches Debian's Chromium (never a downloaded one) through Playwright.

Tests open a notebook they wrote (:func:`write_notebook`) with :func:`open_notebook` in either front
end, run it through the menu (Run > Run All Cells), and check the DOM with :func:`widget_problems`
(error texts, failed views, tracebacks, blank plots) and :func:`plot_data` (what plotly.js draws).
A failing test leaves a screenshot of every open page in ``tests/browser/artifacts/``.

Skipping: without Chromium or Playwright the tests are skipped locally with the reason, but in CI
(``CI`` set) they fail instead, so CI can never pass without running them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ARTIFACTS = Path(os.environ.get("LORA_LAB_BROWSER_ARTIFACTS", HERE / "artifacts"))
FRONTENDS = ("lab", "notebook")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# What a front end shows when a widget cannot be displayed (ipywidgets 8, anywidget, JupyterLab).
ERROR_TEXTS = ("Error displaying widget", "model not found", "Failed to load view class",
               "Click to show javascript error",
               "Failed to load model class", "Could not create a model", "Could not create view",
               "Error rendering output", "Traceback (most recent call last)")
WAIT_MS = int(os.environ.get("LORA_LAB_BROWSER_TIMEOUT_S", "180")) * 1000  # running a notebook
ACTION_MS = 30_000                                                             # one click or read
DONE = "LL-CELLS-DONE"


def chromium_path() -> str | None:
    """``$LORA_LAB_CHROMIUM`` when set (only that), else Debian's /usr/bin/chromium or `chromium`
    on the PATH; None when there is none."""
    if os.environ.get("LORA_LAB_CHROMIUM"):
        path = os.environ["LORA_LAB_CHROMIUM"]
        return path if os.path.exists(path) else None
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install`)"
    if chromium_path() is None:
        return "Chromium is missing (apt-get install -y chromium, or set LORA_LAB_CHROMIUM)"
    return None


def pytest_collection_modifyitems(config, items):
    why = _missing()
    if why is None or os.environ.get("CI"):
        return  # in CI a missing browser fails in the fixture below, it is never skipped
    skip = pytest.mark.skip(reason=f"browser tests skipped: {why}")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- failure screenshots
_OPEN_PAGES: list = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test fails, save a screenshot and the text of every page still open (while the
    test's fixtures, and so its pages, are still alive)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or not _OPEN_PAGES:
        return
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", item.nodeid)[-150:]
    for i, page in enumerate(list(_OPEN_PAGES)):
        try:
            if not page.is_closed():
                page.screenshot(path=str(ARTIFACTS / f"{stem}-{i}.png"))
                (ARTIFACTS / f"{stem}-{i}.txt").write_text(page.inner_text("body"))
        except Exception as exc:  # noqa: BLE001  (a screenshot must not hide the real failure)
            print(f"screenshot failed: {exc}", file=sys.stderr)


@pytest.fixture
def notebook_page(browser, jupyter):
    """``open(name, frontend, **kw)`` -> a page (see :func:`open_notebook`), closed after the test
    (after any failure screenshot)."""
    opened = []

    def open_(name: str, frontend: str, **kw):
        opened.append(open_notebook(browser, jupyter, name, frontend, **kw))
        return opened[-1]

    yield open_
    for page in opened:
        close_page(page)


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """A running ``jupyter server``: ``url``, ``token``, ``root`` (its notebook folder), ``log``."""

    def __init__(self, base: Path):
        self.root, self.state = base / "root", base / "state"
        self.root.mkdir()
        self.port, self.token = _free_port(), secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.state / "server.log"
        self.runtime = self.state / "runtime"
        settings = self.state / "settings"
        for plugin, values in {
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                             "checkForUpdates": False},
        }.items():
            f = settings / f"{plugin}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values))
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        JUPYTER_CONFIG_DIR=str(self.state / "config"),
                        JUPYTER_DATA_DIR=str(self.state / "data"),
                        JUPYTER_RUNTIME_DIR=str(self.runtime),
                        JUPYTERLAB_SETTINGS_DIR=str(settings),
                        JUPYTERLAB_WORKSPACES_DIR=str(self.state / "workspaces"),
                        JUPYTER_PLATFORM_DIRS="1")
        self.env.pop("LORA_LAB_STATIC_FIGURES", None)  # tests choose the figure path per notebook
        self.proc = None

    def start(self, timeout: float = 120) -> "JupyterServer":
        cmd = [sys.executable, "-m", "jupyter", "server", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.root)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited ({self.proc.returncode}):\n"
                                   + self.log.read_text()[-3000:])
            try:
                self.api("GET", "/api/status")
                return self
            except OSError:
                time.sleep(0.25)
        raise RuntimeError("jupyter server did not answer in time:\n"
                           + self.log.read_text()[-3000:])

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def page_url(self, notebook: str, frontend: str) -> str:
        if frontend == "lab":
            return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"
        return f"{self.url}/notebooks/{notebook}?token={self.token}"

    def _kernel_pids(self) -> list[int]:
        """Processes whose command line names one of this server's kernel connection files."""
        pids = []
        marker = str(self.runtime)
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return [p for p in pids if p != os.getpid()]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            for k in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{k['id']}", timeout=30)
        except OSError:
            pass
        try:
            self.api("POST", "/api/shutdown")
        except OSError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        for pid in self._kernel_pids():   # a kernel that outlived its server (ours only)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture(scope="session")
def jupyter(tmp_path_factory):
    why = _missing()
    if why:
        pytest.fail(f"browser tests cannot run in CI: {why}")
    server = JupyterServer(tmp_path_factory.mktemp("jupyter"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the session (Playwright's sync API may run only once per thread,
    so every browser test shares it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def browser(jupyter, chromium):
    return chromium


# ----------------------------------------------------------------------------- notebooks
def write_notebook(server: JupyterServer, name: str, cells: list[str], done: bool = True) -> str:
    """Write a notebook of code ``cells`` (plus, with ``done``, a last cell printing :data:`DONE`)
    to the server's folder; return its name."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    sources = [*cells, f"print({DONE[:3]!r} + {DONE[3:]!r})"] if done else list(cells)
    nb = new_notebook(cells=[new_code_cell(s) for s in sources], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, server.root / name)
    return name


def open_notebook(browser, server: JupyterServer, name: str, frontend: str, *, run: bool = True,
                  wait_done: str | None = DONE, block: tuple[str, ...] = (),
                  viewport=(1280, 1400)):
    """Open ``name`` in ``frontend`` (``"lab"`` or ``"notebook"``) in a fresh browser context and
    run all its cells through the Run menu, then wait for an output showing ``wait_done`` (by
    default the :data:`DONE` line that :func:`write_notebook` adds; None: do not wait).
    ``block``: URL globs to abort (e.g. a front-end extension, to break a widget on purpose)."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    for pattern in block:
        context.route(pattern, lambda route: route.abort())
    page = context.new_page()
    page.set_default_timeout(ACTION_MS)
    _OPEN_PAGES.append(page)
    page.goto(server.page_url(name, frontend))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=WAIT_MS)
    wait_kernel_idle(page)
    if run:
        run_all(page)
        if wait_done:
            wait_for_output(page, wait_done)
    return page


def close_page(page) -> None:
    if page in _OPEN_PAGES:
        _OPEN_PAGES.remove(page)
    page.context.close()


def wait_kernel_idle(page) -> None:
    """Wait until the notebook has a kernel and it is idle.  (JupyterLab first shows "No Kernel"
    with an idle indicator; running cells then opens a "Select Kernel" dialog.)"""
    page.wait_for_function("""() => {
        const name = document.querySelector('.jp-Toolbar-kernelName');
        const state = document.querySelector('.jp-Notebook-ExecutionIndicator');
        return name && state && !/No Kernel/i.test(name.textContent)
            && state.getAttribute('data-status') === 'idle'; }""", timeout=WAIT_MS)


def run_all(page) -> None:
    """Run > Run All Cells, through the menu as a person would (same menu in both front ends)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def wait_for_output(page, text: str, timeout_ms: int | None = None) -> None:
    page.locator(".jp-OutputArea-output", has_text=text).first.wait_for(
        timeout=timeout_ms or WAIT_MS)


def output_text(page) -> str:
    return "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())


# ----------------------------------------------------------------------------- checks
_PROBLEMS_JS = """(root, errors) => {
  const found = [];
  const outputs = Array.from(root.querySelectorAll('.jp-OutputArea-output'));
  for (const o of outputs) {
    const text = o.textContent || '';   // textContent: also the folded-away error details
    for (const e of errors) if (text.includes(e)) found.push(e + ': ' + text.slice(0, 300));
  }
  for (const gd of root.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')) {
    const r = gd.getBoundingClientRect();
    const out = gd.closest('.jp-OutputArea-output').getBoundingClientRect();
    if (r.right > out.right + 2)
      found.push(`clipped plot: ${Math.round(r.right - out.right)} px past its output's edge`);
    const traces = (gd.data || []).length;
    const svg = gd.querySelector('.main-svg');
    if (!svg || r.width < 50 || r.height < 50)
      found.push(`blank plot: ${traces} traces, ${Math.round(r.width)}x${Math.round(r.height)} px,`
                 + ` svg ${!!svg}`);
  }
  return found;
}"""


def widget_problems(page, root=None) -> list[str]:
    """Everything on the page that shows a widget or figure failed: the front ends' error texts
    (:data:`ERROR_TEXTS`, including tracebacks), plotly figures drawn blank (no svg or no size; a
    figure with no traces yet, such as an idle dashboard's, is allowed) and figures that stick out
    of their output area (cut off by it).  Empty when all is well.  ``root``: a locator to look
    under (default: the whole page)."""
    return (root or page.locator("body")).first.evaluate(_PROBLEMS_JS, list(ERROR_TEXTS))


def plot_data(page, scope: str) -> list[dict]:
    """What plotly.js draws for each figure under CSS selector ``scope``: for each graph div, the
    number of traces, each trace's name and x/y/z arrays, the layout title and the shapes' x0."""
    return page.locator(scope).first.evaluate("""(root) => {
      // typed arrays (FigureWidget sends binary buffers) to lists; NaN/inf to null, so that
      // Python can compare the arrays
      const clean = a => a == null ? null : Array.from(a, v =>
          (typeof v === 'number' && !Number.isFinite(v)) ? null
          : (v != null && typeof v === 'object' && v.length !== undefined) ? clean(v) : v);
      // _fullData: the arrays as plotly.js decoded them (a static figure's JSON carries numpy
      // arrays base64-encoded, {dtype, bdata}, in gd.data)
      const traces = gd => (gd._fullData && gd._fullData.length === (gd.data || []).length)
          ? gd._fullData : (gd.data || []);
      return Array.from(root.querySelectorAll('.js-plotly-plot')).map(gd => ({
          traces: (gd.data || []).length,
          names: traces(gd).map(t => t.name || null),
          x: traces(gd).map(t => clean(t.x)),
          y: traces(gd).map(t => clean(t.y)),
          z: traces(gd).map(t => clean(t.z)),
          title: (gd.layout && gd.layout.title && gd.layout.title.text) || '',
          shapes: ((gd.layout && gd.layout.shapes) || []).map(s => s.x0),
          svg: !!gd.querySelector('.main-svg'),
          height: gd.getBoundingClientRect().height})); }""")


def wait_until(fn, timeout_s: float = 60, every_s: float = 0.25, what: str = "condition"):
    """Poll ``fn()`` until it returns a truthy value; return it, or fail naming ``what``."""
    t0 = time.monotonic()
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def save_screenshot(locator, name: str) -> None:
    """With ``LORA_LAB_SCREENSHOTS=<folder>`` set (``make screenshots``), save ``locator``'s
    screenshot there as ``name`` (for the README)."""
    folder = os.environ.get("LORA_LAB_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(Path(folder) / name), animations="disabled")
