"""The board: the adapter table, load and switch, a message line, and the four tabs
(:mod:`~lora_lab.ui.switchboard` tells the whole story).

The board is the tabs' :class:`~lora_lab.ui.switchboard.host.Host`: it owns the model, the
"a generation is running" guard, the stop flag, the message line and the worker thread.  Every
widget and result of a tab is also reachable on the board under its old name (``sb.prompt``,
``sb.merge_report``, ...), and every action is a board method.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets

from ...errors import AdapterError, LoraLabError
from ...hf._peft import base_of
from ...hf.adapters.io import adapter_name_for, load_adapter
from ...hf.adapters.merge import MergeReport
from ...hf.adapters.registry import adapter_sizes, list_adapters
from ...hf.adapters.switch import active_adapter, merged_adapters, switch_adapter
from ..kernel import in_kernel
from .blend_tab import BlendTab
from .compare_tab import CompareTab
from .generate_tab import GenerateTab
from .host import BASE
from .merge_tab import MergeTab
from .style import STYLE, button
from .table import table_html

__all__ = ["AdapterSwitchboard"]

_TITLES = ("generate", "side by side", "merge / delete", "blend")


class AdapterSwitchboard(widgets.VBox):
    """Load, switch, compare, merge, delete and blend adapters on one base model (module docstring
    of :mod:`lora_lab.ui.switchboard`).

    State to read: ``model``, ``adapters`` (DataFrame), ``active.value``, ``switch_ms``, ``result``
    (last :class:`~lora_lab.hf.generate.stream.GenerationResult`), ``comparison`` (name → result),
    ``merge_report``, ``merged_model``, ``blend_report``, ``error`` (``""`` when the last action
    worked), ``info`` (the last non-error message) and ``busy``.  The tabs are ``generate_tab``,
    ``compare_tab``, ``merge_tab`` and ``blend_tab``.
    """

    def __init__(self, model, tokenizer, *, background: bool | None = None,
                 redraw_every_s: float = 0.05, spec=None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.background = in_kernel() if background is None else bool(background)
        self.redraw_every_s = redraw_every_s
        self.switch_ms: float | None = None
        self.error = self.info = ""
        self.busy = False
        self.stop_flag = threading.Event()
        self.blends: dict[str, tuple] = {}       # name -> (weights, combination, density)
        self._worker: threading.Thread | None = None
        self._hold = False
        self._build()
        self.generate_tab = GenerateTab(self)
        self.compare_tab = CompareTab(self, self.generate_tab)
        self.merge_tab = MergeTab(self)
        self.blend_tab = BlendTab(self)
        self.refresh()
        super().__init__([self.table, widgets.HBox([self.folder, self.load_name, self.load_button]),
                          widgets.HBox([self.active, self.switch_label]), self._tabs(), self.message])

    # ================================================================== controls
    def _build(self) -> None:
        W, L = widgets, widgets.Layout
        self.table, self.switch_label, self.message = W.HTML(), W.HTML(), W.HTML()
        self.folder = W.Text(placeholder="adapter folder", description="folder", style=STYLE)
        self.load_name = W.Text(placeholder="name (default: folder name)", layout=L(width="220px"))
        self.active = W.Dropdown(options=[BASE], value=BASE, description="active", style=STYLE)
        self.load_button = button("load", "folder-open")
        self.load_button.on_click(lambda _: self.safely(self._load_clicked))
        self.active.observe(self._on_active, names="value")

    def _tabs(self) -> widgets.Tab:
        tabs = widgets.Tab([self.generate_tab, self.compare_tab, self.merge_tab, self.blend_tab])
        for i, t in enumerate(_TITLES):
            tabs.set_title(i, t)
        return tabs

    # ================================================================== the Host of the tabs
    def safely(self, action) -> None:
        """Run a button's action; show a refusal or failure as a message, never a traceback."""
        try:
            action()
        except LoraLabError as exc:
            self.say(str(exc), error=True)
        except Exception as exc:  # noqa: BLE001 - a widget must not spill a traceback
            self.say(f"Unexpected {type(exc).__name__}: {exc}", error=True)

    def say(self, text: str, error: bool = False) -> None:
        """Show ``text`` (in red with ⚠ when ``error``) and set ``error`` / ``info``."""
        self.error, self.info = (text, "") if error else ("", text)
        color = "var(--jp-error-color1,#b00020)" if error else "inherit"    # follows the theme
        self.message.value = (f"<div style='color:{color};white-space:pre-wrap'>"
                              f"{'⚠ ' if error else ''}{html.escape(text)}</div>") if text else ""

    def guard(self) -> None:
        """Refuse to change the adapters while a generation runs."""
        if self.busy:
            raise AdapterError("A generation is running, so the adapters cannot change now.",
                               "press Stop, or wait until it has finished")

    def names(self) -> list[str]:
        """The model's adapters, in load order."""
        return list(getattr(self.model, "peft_config", {}))

    def unmerge_first(self) -> str:
        """Undo an in-place merge before the adapters change; the note to show (``""`` if none)."""
        return self.merge_tab.unmerge_first()

    def refresh(self, structure: bool = True) -> None:
        """Make the controls show the model's adapters: all of them after load, delete or blend
        (``structure``), only the active and merged marks after a switch or merge."""
        names = self.names()
        if structure:
            table = list_adapters(self.model)
            sizes = adapter_sizes(self.model)
            table["size_MiB"] = [round(sizes[n]["bytes"] / 2**20, 3) for n in table["name"]]
            self.adapters = table[["name", "method", "r", "targets", "params", "size_MiB", "source",
                                   "active"]].copy()
        active = active_adapter(self.model)
        self.adapters["active"] = self.adapters["name"] == active
        self.adapters["merged"] = self.adapters["name"].isin(merged_adapters(self.model))
        self.table.value = ("<i>no adapters yet: load one from a folder</i>" if not names else
                            table_html(self.adapters))  # fits the widget: see .table
        self._hold = True
        try:
            if structure:
                self.active.options = [BASE, *names]
                self.compare_tab.show_names(names)
            self.active.value = active or BASE
        finally:
            self._hold = False
        if structure:
            self.blend_tab.show_names(names)

    def launch(self, job) -> None:
        """Run a generation ``job`` (on a worker thread when ``background``); ``busy`` meanwhile."""
        self.guard()
        self.busy = True
        self.stop_flag.clear()
        self.stop_button.disabled, self.generate_button.disabled = False, True
        self.compare_button.disabled = True

        def run():
            try:
                self.safely(job)
            finally:
                self.busy = False
                self.stop_button.disabled, self.generate_button.disabled = True, False
                self.compare_button.disabled = False

        if self.background:
            self._worker = threading.Thread(target=run, name="lora_lab-switchboard", daemon=True)
            self._worker.start()
        else:
            run()

    # ================================================================== load, switch
    def _load_clicked(self) -> None:
        self.load(self.folder.value, self.load_name.value.strip() or None)

    def load(self, folder, name: str | None = None) -> str:
        """Load the adapter saved in ``folder`` (as ``name``, default the folder's name); activate it."""
        self.guard()
        folder = str(folder).strip()
        if not folder:
            raise AdapterError("No folder given.", "type the adapter's folder, then press load")
        name = adapter_name_for(folder, name)
        if name == BASE:
            raise AdapterError(f"{name!r} cannot name an adapter.", "pass a name without dots")
        self.unmerge_first()
        self.model = load_adapter(self.model, folder, name=name)
        switch_adapter(self.model, name)
        self.refresh()
        self.say(f"loaded {name!r} from {folder}")
        return name

    def _on_active(self, change) -> None:
        if self._hold:
            return
        self.safely(lambda: self.activate(change["new"]))
        if self.error:                                   # refused: show what is really active
            self._hold = True
            self.active.value = active_adapter(self.model) or BASE
            self._hold = False

    def activate(self, name: str | None) -> float:
        """Switch to adapter ``name`` (None or ``"(base)"``: the base model); returns the milliseconds
        the switch took (also in ``switch_ms`` and the label)."""
        self.guard()
        target = None if name in (None, BASE) else name
        if target is not None and target not in self.names():
            raise AdapterError(f"There is no adapter named {target!r}.",
                               f"choose one of {self.names()} or {BASE!r}")
        if target is None and not self.names():
            self.switch_ms = 0.0
            return 0.0
        note = self.unmerge_first()
        t0 = time.perf_counter()
        switch_adapter(self.model, target)
        self.switch_ms = (time.perf_counter() - t0) * 1e3
        self.switch_label.value = (f"switched to <b>{html.escape(target or BASE)}</b> in "
                                   f"<b>{self.switch_ms:.3f} ms</b> (loaded weights re-routed: "
                                   f"no reload, no merge)")
        self.refresh(structure=False)
        self.say(note)
        return self.switch_ms

    # ================================================================== the tabs' actions
    def generate(self, prompt: str | None = None) -> None:
        """Generate from ``prompt`` (default: the prompt box) with the active adapter, streaming into
        ``output``; the result lands in ``result`` (in the background inside a kernel)."""
        self.generate_tab.generate(prompt)

    def stop(self) -> None:
        """Ask the running generation to end after its current token (thread-safe)."""
        self.generate_tab.stop()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background generation has finished (scripts and tests)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def compare(self, prompt: str | None = None, names=None) -> None:
        """Run ``prompt`` through each of ``names`` (default: the ``compare`` selection; None or
        ``"(base)"`` is the base model, shown as ``"(base)"``) into side-by-side columns; results in
        ``comparison``."""
        self.compare_tab.compare(prompt, names)

    def merge(self) -> MergeReport:
        """Merge the active adapter: in place (reversibly) on a full-precision base; on a quantized
        base into a full-precision copy (``merged_model``).  Either way ``merge_report`` (returned)
        gives the logit difference between the merged and the unmerged model."""
        return self.merge_tab.merge()

    def unmerge(self) -> None:
        """Undo an in-place merge (W ← W − s·B·A) and show how close the logits came back."""
        self.merge_tab.unmerge()

    def delete(self, name: str | None = None) -> None:
        """Delete adapter ``name`` (default: the active one) and switch to the base model."""
        self.merge_tab.delete(name)

    def blend(self, weights: dict | None = None, combination: str | None = None,
              name: str | None = None):
        """Create a blended adapter from the weight sliders (or ``weights``) with ``combination``,
        run :func:`lora_lab.blend_adapters`' checks and make the blend active.  ``name`` defaults
        to the name box ("blend", then "blend2", ...)."""
        return self.blend_tab.blend(weights, combination, name)

    # ================================================================== code
    def code(self) -> str:
        """Plain Python that rebuilds the adapters and runs the current prompt without widgets."""
        lines = ["import lora_lab as ll", "from lora_lab.hf.generate.stream import generate", ""]
        base = base_of(self.model)
        source = getattr(base, "lora_lab_source", None)
        quant = getattr(base, "lora_lab_quant", None)
        if source:
            qarg = f", quant=ll.{quant!r}" if quant is not None else ""
            lines.append(f"model, tok = ll.load_model({source!r}{qarg})")
        else:
            lines.append("model, tok = ...  # the base model and tokenizer this switchboard was built on")
        for _, row in self.adapters.iterrows():
            if row["source"]:
                lines.append(f"model = ll.load_adapter(model, {row['source']!r}, name={row['name']!r})")
            elif row["name"] in self.blends:
                w, comb, dens = self.blends[row["name"]]
                lines.append(f"ll.blend_adapters(model, {w!r}, name={row['name']!r}, "
                             f"combination={comb!r}, density={dens!r})")
        active = active_adapter(self.model)
        lines.append(f"ll.set_adapter(model, {active!r})")
        s = {k: v for k, v in self.generate_tab.settings().items() if k != "spec"}
        args = ", ".join(f"{k}={v!r}" for k, v in s.items())
        lines.append(f"result = generate(model, tok, {self.prompt.value!r}, {args})")
        return "\n".join(lines) + "\n"


# The widgets and results of the tabs, on the board under the names they have always had
# (sb.prompt is sb.generate_tab.prompt, sb.merge_report is sb.merge_tab.merge_report, ...).
_FROM_TABS = {
    "generate_tab": ("prompt", "max_new_tokens", "greedy", "temperature", "top_p", "output",
                     "speed", "generate_button", "stop_button", "result"),
    "compare_tab": ("compare_with", "compare_button", "columns", "column_outputs", "comparison"),
    "merge_tab": ("merge_button", "unmerge_button", "delete_button", "merge_label", "merge_report",
                  "merged_model"),
    "blend_tab": ("weights", "weight_box", "combination", "density", "blend_name",
                  "allow_known_bugs", "blend_button", "blend_report"),
}


def _from_tab(tab: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, tab), name),
                    lambda self, value: setattr(getattr(self, tab), name, value),
                    doc=f"``{tab}.{name}``")


for _tab, _names in _FROM_TABS.items():
    for _name in _names:
        setattr(AdapterSwitchboard, _name, _from_tab(_tab, _name))
del _tab, _names, _name
