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

What a person would see is checked by :func:`look_problems` (content wider than the widget,
repeated tick labels, low-contrast text) and :func:`console_errors` (every page records its
console errors, uncaught exceptions and failed requests from the moment it opens).  Menus are
used through :func:`click_menu`, which waits for the opened menu and presses again if a press was
lost under load, and :func:`save_notebook` waits for the server's answer to the save (issue 18's
flaky "Save" timeout).  :func:`set_theme` picks JupyterLab's light or dark theme for pages opened
next.

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
from concurrent.futures import ThreadPoolExecutor
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
        try:  # all at once (12 idle kernels: 2.0 s against 3.4 s one by one)
            kernels = self.api("GET", "/api/kernels")
            with ThreadPoolExecutor(max_workers=max(1, len(kernels))) as pool:
                list(pool.map(lambda k: self.api("DELETE", f"/api/kernels/{k['id']}", timeout=30), kernels))
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
    page.console_errors = []             # what the browser's console shows as errors (see look.py)
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(f"uncaught: {e}"))
    page.on("response", lambda r: r.status >= 400 and page.console_errors.append(
        f"HTTP {r.status} {r.request.method} {r.url.split('?')[0]}"))
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


def click_menu(page, top: str, item) -> None:
    """Open menu ``top`` of the menu bar and click its entry ``item`` (text or regex), as a person
    would (the same menus in both front ends).

    Waits for the event, not for time: the menu must be open with ``item`` enabled before the
    click.  Under load the press on the menu bar can be lost (Lumino opens menus on the pointer
    press; a busy page can eat it or a press can close a menu that had just opened), which
    once left a test waiting 30 s for a Save entry that was never shown.  If the menu has not
    opened a third of the way into the action timeout, Escape closes whatever is open and the
    press is repeated (at most three times)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    bar = page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(top)}$")).first
    entry = page.locator(".lm-Menu .lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel",
                         has_text=item).first
    for attempt in range(3):
        bar.click()
        try:
            entry.wait_for(state="visible", timeout=ACTION_MS // 3)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    entry.click()


def run_all(page) -> None:
    """Run > Run All Cells, through the menu (:func:`click_menu`)."""
    click_menu(page, "Run", "Run All Cells")


def save_notebook(page, server: "JupyterServer", name: str) -> dict:
    """File > Save, and wait for the server to have written it: the ``PUT /api/contents/<name>``
    answer (the event itself; the tab's "dirty" dot is no sign, it comes back whenever an output
    changes).  Returns the saved notebook as the server holds it on disk."""
    with page.expect_response(lambda r: r.request.method == "PUT" and
                              f"/api/contents/{name}" in r.url, timeout=WAIT_MS) as saved:
        click_menu(page, "File", re.compile(r"^Save( Notebook)?$"))
    assert saved.value.ok, f"saving {name} failed: HTTP {saved.value.status}"
    return json.loads((server.root / name).read_text())


def set_theme(server: "JupyterServer", theme: str) -> None:
    """Make pages opened from now on use JupyterLab's ``"light"`` or ``"dark"`` theme (JupyterLab
    and Notebook 7 read the same user setting; the server reads it at each page load)."""
    f = server.state / "settings" / "@jupyterlab/apputils-extension/themes.jupyterlab-settings"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"theme": {"light": "JupyterLab Light",
                                       "dark": "JupyterLab Dark"}[theme]}))


def wait_theme(page, theme: str) -> None:
    """Wait until the page shows ``theme`` (JupyterLab marks the body when a theme is loaded)."""
    light = "true" if theme == "light" else "false"
    page.wait_for_selector(f'body[data-jp-theme-light="{light}"]', state="attached",
                           timeout=WAIT_MS)


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


# ----------------------------------------------------------------------------- what a person sees
_LOOK_JS = """(root, minContrast) => {
  const found = [];
  const seen = new Set();
  const box = root.getBoundingClientRect();
  const out = root.closest('.jp-OutputArea-output');
  const edge = Math.min(box.right, out ? out.getBoundingClientRect().right : box.right) + 1;
  if (out && box.right > out.getBoundingClientRect().right + 1)
    found.push(`the widget is ${Math.round(box.right - out.getBoundingClientRect().right)} px `
               + `wider than its output area`);
  const shown = el => { const s = getComputedStyle(el);
    return s.display !== 'none' && s.visibility !== 'hidden' && el.getClientRects().length > 0; };
  const name = el => `${el.tagName.toLowerCase()}${typeof el.className === 'string' && el.className
    ? '.' + el.className.trim().split(/\\s+/).slice(0, 2).join('.') : ''}`
    + ` "${(el.textContent || '').trim().slice(0, 40)}"`;
  // 1. nothing wider than the widget, unless it scrolls inside a box that fits
  for (const el of root.querySelectorAll('*')) {
    if (el.tagName === 'STYLE' || (el.closest('.js-plotly-plot') && !el.matches('.js-plotly-plot')))
      continue;
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || r.right <= edge || !shown(el)) continue;
    // a box that scrolls on purpose (not an ipywidgets Box or Lumino widget: those scroll
    // whatever overflows them, which is how the switchboard's table hid its last columns)
    let a = el.parentElement, inScroller = false, inReported = false;
    for (; a && a !== root.parentElement; a = a.parentElement) {
      if (seen.has(a)) inReported = true;
      const o = getComputedStyle(a).overflowX;
      if ((o === 'auto' || o === 'scroll') && a.getBoundingClientRect().right <= edge
          && !a.matches('.jupyter-widgets, .lm-Widget, .widget-box, .widget-html-content'))
        inScroller = true;
    }
    if (inScroller || inReported) continue;
    seen.add(el);
    found.push(`${name(el)} sticks out ${Math.round(r.right - edge)} px past the widget's edge`);
  }
  // 2. every axis of every figure: tick labels that differ
  for (const gd of root.querySelectorAll('.js-plotly-plot')) {
    const axes = {};             // tick groups are "xtick", "y2tick", ... : one class per axis
    for (const t of gd.querySelectorAll('g[class$="tick"] > text, g.cbaxis text')) {
      if (!(t.getBoundingClientRect().width > 0) || !t.textContent.trim()) continue;
      const bar = t.closest('g.colorbar');
      const axis = (bar ? bar.getAttribute('class') + ' ' : '') + t.parentNode.getAttribute('class');
      (axes[axis] = axes[axis] || []).push(t.textContent.trim());
    }
    for (const [axis, texts] of Object.entries(axes))
      if (new Set(texts).size < texts.length)
        found.push(`repeated tick labels ${JSON.stringify(texts)} (${axis})`);
  }
  // 3. text contrast (WCAG 2 relative luminance) against what is really behind it
  const rgba = c => { const m = /rgba?\\(([^)]+)\\)/.exec(c || ''); if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const lum = c => { const f = v => { v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const behind = el => { for (let a = el; a; a = a.parentElement) {
      const c = rgba(getComputedStyle(a).backgroundColor); if (c && c[3] > 0.5) return c; }
    return [255, 255, 255, 1]; };
  const check = (el, color) => {
    const fg = rgba(color); if (!fg || fg[3] < 0.1) return;
    const bg = behind(el.parentElement || el);
    const [hi, lo] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const big = parseFloat(getComputedStyle(el).fontSize) >= 18.5;
    if (ratio < (big ? 3 : minContrast))
      found.push(`${name(el)}: contrast ${ratio.toFixed(2)} (${color} on rgb(${bg.slice(0, 3)}))`);
  };
  const svgText = 'g[class$="tick"] > text, g[class^="g-"][class$="title"] text, '
                  + '.annotation-text, .legendtext, .cbaxis text, .cbtitle text';
  for (const t of root.querySelectorAll(svgText))
    if (t.getBoundingClientRect().width > 0 && t.textContent.trim())
      check(t, getComputedStyle(t).fill);
  for (const el of root.querySelectorAll('*')) {
    if (el.closest('.js-plotly-plot, option, style, [disabled], .mod-disabled') || !shown(el))
      continue;
    const own = Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim());
    if (own && el.getBoundingClientRect().width > 0) check(el, getComputedStyle(el).color);
  }
  return found.slice(0, 20);
}"""


def look_problems(page, scope: str, min_contrast: float = 4.5) -> list[str]:
    """What a person would see wrong in the widget under CSS selector ``scope``: content wider
    than the widget (unless it scrolls inside a box that fits), repeated tick labels on any axis
    of any figure, and text whose contrast with what is behind it is under ``min_contrast``
    (WCAG AA: 4.5 for body text, 3 for text of 18.5 px and up).  Empty when all is well."""
    return page.locator(scope).first.evaluate(_LOOK_JS, min_contrast)


# What the front ends themselves log as errors, whatever the notebook holds (2026-12): Notebook 7.x
# throws the settings-registry TypeError on every page load (measured on a one-cell `1+1` notebook,
# light and dark; JupyterLab logs nothing there), and its notebook page calls a command that only
# its file-browser page registers.  "Failed to load resource" lines are dropped because each
# failed request is also listed with its method and URL ("HTTP 403 GET ..."), which is checked.
BENIGN_CONSOLE = (re.compile(r"^Failed to load resource: "),
                  re.compile(r"^uncaught: Cannot read properties of undefined \(reading 'schema'\)$"),
                  re.compile(r"^uncaught: Command 'filebrowser:open-path' not registered\.$"),
                  # Notebook 7's server now and then refuses one of its own font files (seen twice
                  # in four Notebook 7 page loads under load; the text falls back to another font)
                  re.compile(r"^HTTP 403 GET \S+/static/notebook/[0-9a-f]+\.woff2?$"))


def console_errors(page) -> list[str]:
    """The page's console errors (and uncaught exceptions) so far, without :data:`BENIGN_CONSOLE`."""
    return [e for e in page.console_errors if not any(p.search(e) for p in BENIGN_CONSOLE)]
