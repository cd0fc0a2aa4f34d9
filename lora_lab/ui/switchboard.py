"""``AdapterSwitchboard``: one base model, many adapters, switched in real time.

::

    sb = AdapterSwitchboard(model, tok)          # a base model, or a peft model with adapters
    sb.load("runs/reverse/adapter")              # or type the folder and press "load"
    display(sb)
    sb.model                                     # the peft model the switchboard manages

Switching re-routes adapters that are already loaded (:func:`lora_lab.hf.adapters.switch.switch_adapter`):
each LoRA layer adds a different ``s·B_k A_k x`` to ``W x``; nothing is read from disk or merged,
and the widget shows how long it took.  "(base)" disables the adapter layers: exactly ``y = W x``.

Tabs: **generate** (streamed into the widget; max new tokens, greedy, temperature, top-p, Stop),
**side by side** (one prompt through the base and the chosen adapters, in columns, with tokens/s),
**merge / delete** (in place on a full-precision base, reversibly; on a quantized base a merged
full-precision *copy* via :func:`lora_lab.merged_copy`, because merging into packed 4-bit weights
silently corrupts them on AVX512-BF16 CPUs — PITFALLS.md) and **blend** (weights across adapters
and a combination type through :func:`lora_lab.blend_adapters`, whose self-check and known-bug
refusals are shown inline).

Every action is also a method (``load``, ``activate``, ``generate``, ``compare``, ``merge``,
``unmerge``, ``delete``, ``blend``, ``stop``) that raises :class:`~lora_lab.LoraLabError` on bad
input; the buttons call them and show the message instead (``sb.error``), never a traceback.

**Stop while generating.**  In a Jupyter kernel a button click is a message the kernel handles only
when it is idle (ipywidgets #3468), so the switchboard generates on a worker thread there
(``background=None`` picks this automatically; the Generate click returns at once) and Stop sets a
flag that generation checks after every token.  Outside a kernel (scripts, pytest) generation runs
on the calling thread; Stop still works from ``on_token`` hooks or observers.  While a generation
runs, the other actions are refused with a message, so the model never changes under it.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import ipywidgets as widgets
import torch

from ..errors import AdapterError, LoraLabError
from ..hf.adapters.io import load_adapter
from ..hf.adapters.merge import merge_adapter, merged_copy, unmerge_adapter
from ..hf.adapters.registry import delete_adapter, list_adapters
from ..hf.adapters.switch import active_adapter
from ..hf.model.inspect import is_quantized
from ..hf.adapters.blend import blend_adapters
from ..hf.generate.stream import GenerationResult, encode_for_generation, generate
from ..hf.adapters.switch import merged_adapters, switch_adapter
from ..hf.adapters.merge import MergeReport

__all__ = ["AdapterSwitchboard", "BASE", "BLEND_COMBINATIONS"]

BASE = "(base)"
BLEND_COMBINATIONS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties")
_W = {"description_width": "110px"}


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def _adapter_bytes(model) -> dict[str, int]:
    """Bytes of each adapter's parameters (what its safetensors file holds, less the header)."""
    out = dict.fromkeys(getattr(model, "peft_config", {}), 0)
    for n, p in model.named_parameters():
        for part in set(n.split(".")) & out.keys():
            out[part] += p.numel() * p.element_size()
    return out


class AdapterSwitchboard(widgets.VBox):
    """Load, switch, compare, merge, delete and blend adapters on one base model (module docstring).

    State to read: ``model``, ``adapters`` (DataFrame), ``active.value``, ``switch_ms``, ``result``
    (last :class:`~lora_lab.hf.generate.stream.GenerationResult`), ``comparison`` (name → result),
    ``merge_report``, ``merged_model``, ``blend_report``, ``error`` (``""`` when the last action
    worked), ``info`` (the last non-error message) and ``busy``.
    """

    def __init__(self, model, tokenizer, *, background: bool | None = None,
                 redraw_every_s: float = 0.05, spec=None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.background = _in_kernel() if background is None else bool(background)
        self.redraw_every_s = redraw_every_s
        self.switch_ms: float | None = None
        self.result: GenerationResult | None = None
        self.comparison: dict[str, GenerationResult] = {}
        self.merge_report: MergeReport | None = None
        self.merged_model = None
        self.blend_report = None
        self.error = self.info = ""
        self.busy = False
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._hold = False
        self._pre_merge: torch.Tensor | None = None
        self._blends: dict[str, tuple] = {}
        self._build()
        self._refresh()
        super().__init__([self.table, widgets.HBox([self.folder, self.load_name, self.load_button]),
                          widgets.HBox([self.active, self.switch_label]), self._tabs(), self.message])

    # ================================================================== controls
    def _build(self) -> None:
        W, L = widgets, widgets.Layout

        def button(text, icon):
            return W.Button(description=text, icon=icon, layout=L(width="auto"))

        def slider(kind, value, lo, hi, label, step=0.05):
            return kind(value=value, min=lo, max=hi, step=step, description=label, style=_W)

        self.table, self.switch_label, self.speed = W.HTML(), W.HTML(), W.HTML()
        self.merge_label, self.message = W.HTML(), W.HTML()
        self.folder = W.Text(placeholder="adapter folder", description="folder", style=_W)
        self.load_name = W.Text(placeholder="name (default: folder name)", layout=L(width="220px"))
        self.active = W.Dropdown(options=[BASE], value=BASE, description="active", style=_W)
        self.prompt = W.Textarea(placeholder="prompt", description="prompt", style=_W,
                                 layout=L(width="95%"))
        self.max_new_tokens = slider(W.IntSlider, 48, 1, 512, "max new tokens", step=1)
        self.greedy = W.Checkbox(value=True, description="greedy")
        self.temperature = slider(W.FloatSlider, 0.7, 0.05, 2.0, "temperature")
        self.top_p = slider(W.FloatSlider, 0.95, 0.05, 1.0, "top-p")
        self.output = W.Textarea(disabled=True, layout=L(width="95%", height="8em"))
        self.compare_with = W.SelectMultiple(options=[BASE], value=(BASE,), rows=4,
                                             description="compare", style=_W)
        self.columns, self.column_outputs = W.HBox(), {}
        self.weights: dict[str, widgets.FloatSlider] = {}
        self.weight_box = W.VBox()
        self.combination = W.Dropdown(options=BLEND_COMBINATIONS, value="cat",
                                      description="combination", style=_W)
        self.density = slider(W.FloatSlider, 0.5, 0.05, 1.0, "density (ties/dare)")
        self.blend_name = W.Text(value="blend", description="new name", style=_W)
        self.allow_known_bugs = W.Checkbox(value=False, layout=L(width="auto"), description=(
            "let peft try known-bad inputs (rsLoRA, DoRA); the self-check still runs"))
        self.load_button = button("load", "folder-open")
        self.generate_button, self.stop_button = button("generate", "play"), button("stop", "stop")
        self.stop_button.disabled = True
        self.compare_button = button("run side by side", "columns")
        self.merge_button, self.unmerge_button = button("merge active", "compress"), \
            button("unmerge", "expand")
        self.delete_button, self.blend_button = button("delete active", "trash"), \
            button("blend", "sliders")
        for b, action in ((self.load_button, self._load_clicked), (self.generate_button, self.generate),
                          (self.compare_button, self.compare), (self.merge_button, self.merge),
                          (self.unmerge_button, self.unmerge), (self.delete_button, self.delete),
                          (self.blend_button, self.blend)):
            b.on_click(lambda _, action=action: self._safely(action))
        self.stop_button.on_click(lambda _: self.stop())
        self.active.observe(self._on_active, names="value")

    def _tabs(self) -> widgets.Tab:
        sampling = widgets.HBox([self.greedy, self.temperature, self.top_p])
        gen = widgets.VBox([self.prompt, widgets.HBox([self.max_new_tokens, self.generate_button,
                                                      self.stop_button]), sampling, self.output,
                            self.speed])
        side = widgets.VBox([widgets.HBox([self.compare_with, self.compare_button]), self.columns])
        merge = widgets.VBox([widgets.HBox([self.merge_button, self.unmerge_button,
                                            self.delete_button]), self.merge_label])
        blend = widgets.VBox([self.weight_box, widgets.HBox([self.combination, self.density]),
                              widgets.HBox([self.blend_name, self.blend_button]),
                              self.allow_known_bugs])
        tabs = widgets.Tab([gen, side, merge, blend])
        for i, t in enumerate(("generate", "side by side", "merge / delete", "blend")):
            tabs.set_title(i, t)
        return tabs

    # ================================================================== messages and state
    def _safely(self, action) -> None:
        """Run a button's action; show a refusal or failure as a message, never a traceback."""
        try:
            action()
        except LoraLabError as exc:
            self._say(str(exc), error=True)
        except Exception as exc:  # noqa: BLE001 - a widget must not spill a traceback
            self._say(f"Unexpected {type(exc).__name__}: {exc}", error=True)

    def _say(self, text: str, error: bool = False) -> None:
        self.error, self.info = (text, "") if error else ("", text)
        color = "#b00020" if error else "#444"
        self.message.value = (f"<div style='color:{color};white-space:pre-wrap'>"
                              f"{'⚠ ' if error else ''}{html.escape(text)}</div>") if text else ""

    def _guard(self) -> None:
        if self.busy:
            raise AdapterError("A generation is running, so the adapters cannot change now.",
                               "press Stop, or wait until it has finished")

    def _names(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def _refresh(self, structure: bool = True) -> None:
        """Make the controls show the model's adapters: all of them after load, delete or blend
        (``structure``), only the active and merged marks after a switch or merge."""
        names = self._names()
        if structure:
            table = list_adapters(self.model)
            sizes = _adapter_bytes(self.model)
            table["size_MB"] = [round(sizes.get(n, 0) / 2**20, 3) for n in table["name"]]
            self.adapters = table[["name", "method", "r", "targets", "params", "size_MB", "source",
                                   "active"]].copy()
        active = active_adapter(self.model)
        self.adapters["active"] = self.adapters["name"] == active
        self.adapters["merged"] = self.adapters["name"].isin(merged_adapters(self.model))
        self.table.value = ("<i>no adapters yet: load one from a folder</i>" if not names else
                            "<div style='overflow-x:auto'>"       # long paths: scroll, not clip
                            + self.adapters.to_html(index=False, escape=True, border=0) + "</div>")
        self._hold = True
        try:
            if structure:
                self.active.options = [BASE, *names]
                seen, picked = set(self.compare_with.options), set(self.compare_with.value)
                chosen = [c for c in [BASE, *names] if c in picked or c not in seen]  # new: in
                self.compare_with.options = [BASE, *names]
                self.compare_with.value = tuple(chosen or [BASE, *names])
            self.active.value = active or BASE
        finally:
            self._hold = False
        if structure:
            old = {n: s.value for n, s in self.weights.items()}
            self.weights = {n: widgets.FloatSlider(value=old.get(n, 0.0), min=-1.0, max=2.0,
                                                   step=0.05, description=n, style=_W) for n in names}
            self.weight_box.children = list(self.weights.values())

    # ================================================================== load, switch
    def _load_clicked(self) -> None:
        self.load(self.folder.value, self.load_name.value.strip() or None)

    def load(self, folder, name: str | None = None) -> str:
        """Load the adapter saved in ``folder`` (as ``name``, default the folder's name); activate it."""
        self._guard()
        folder = str(folder).strip()
        if not folder:
            raise AdapterError("No folder given.", "type the adapter's folder, then press load")
        name = name or Path(folder).name
        if name == BASE or "." in name:
            raise AdapterError(f"{name!r} cannot name an adapter.", "pass a name without dots")
        self._ensure_unmerged()
        self.model = load_adapter(self.model, folder, name=name)
        switch_adapter(self.model, name)
        self._refresh()
        self._say(f"loaded {name!r} from {folder}")
        return name

    def _on_active(self, change) -> None:
        if self._hold:
            return
        self._safely(lambda: self.activate(change["new"]))
        if self.error:                                   # refused: show what is really active
            self._hold = True
            self.active.value = active_adapter(self.model) or BASE
            self._hold = False

    def activate(self, name: str | None) -> float:
        """Switch to adapter ``name`` (None or ``"(base)"``: the base model); returns the milliseconds
        the switch took (also in ``switch_ms`` and the label)."""
        self._guard()
        target = None if name in (None, BASE) else name
        if target is not None and target not in self._names():
            raise AdapterError(f"There is no adapter named {target!r}.",
                               f"choose one of {self._names()} or {BASE!r}")
        if target is None and not self._names():
            self.switch_ms = 0.0
            return 0.0
        note = self._ensure_unmerged()
        t0 = time.perf_counter()
        switch_adapter(self.model, target)
        self.switch_ms = (time.perf_counter() - t0) * 1e3
        self.switch_label.value = (f"switched to <b>{html.escape(target or BASE)}</b> in "
                                   f"<b>{self.switch_ms:.3f} ms</b> (loaded weights re-routed: "
                                   f"no reload, no merge)")
        self._refresh(structure=False)
        self._say(note)
        return self.switch_ms

    def _ensure_unmerged(self) -> str:
        merged = merged_adapters(self.model)
        if not merged:
            return ""
        unmerge_adapter(self.model)
        self._pre_merge = None
        return f"unmerged {', '.join(merged)} first: switching runs on the unmerged weights"

    # ================================================================== generation
    def _settings(self) -> dict:
        return dict(max_new_tokens=int(self.max_new_tokens.value), greedy=bool(self.greedy.value),
                    temperature=float(self.temperature.value), top_p=float(self.top_p.value),
                    spec=self.spec)

    def stop(self) -> None:
        """Ask the running generation to end after its current token (thread-safe)."""
        self._stop.set()
        if self.busy:
            self.speed.value = "<b>stopping…</b>"

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background generation has finished (scripts and tests)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _launch(self, job) -> None:
        self._guard()
        self.busy = True
        self._stop.clear()
        self.stop_button.disabled, self.generate_button.disabled = False, True
        self.compare_button.disabled = True

        def run():
            try:
                self._safely(job)
            finally:
                self.busy = False
                self.stop_button.disabled, self.generate_button.disabled = True, False
                self.compare_button.disabled = False

        if self.background:
            self._worker = threading.Thread(target=run, name="lora_lab-switchboard", daemon=True)
            self._worker.start()
        else:
            run()

    def _streamer(self, box: widgets.Textarea):
        """An ``on_token`` that appends to ``box``, redrawing at most every ``redraw_every_s``."""
        state = {"text": "", "drawn": 0.0}

        def on_token(piece: str) -> None:
            state["text"] += piece
            now = time.perf_counter()
            if now - state["drawn"] >= self.redraw_every_s:
                state["drawn"] = now
                box.value = state["text"]
        return on_token

    def generate(self, prompt: str | None = None) -> None:
        """Generate from ``prompt`` (default: the prompt box) with the active adapter, streaming into
        ``output``; the result lands in ``result`` (in the background inside a kernel)."""
        prompt = self.prompt.value if prompt is None else prompt
        settings = self._settings()
        encode_for_generation(self.tokenizer, prompt, self.spec)      # refuse a bad prompt now

        def job():
            self.output.value, self.speed.value = "", "<i>generating…</i>"
            res = generate(self.model, self.tokenizer, prompt, on_token=self._streamer(self.output),
                           stop=self._stop, **settings)
            self.result = res
            self.output.value = res.text
            self.speed.value = self._speed_text(res)
        self._launch(job)

    @staticmethod
    def _speed_text(res: GenerationResult) -> str:
        return (f"{res.n_tokens} tokens · <b>{res.tokens_per_s:.1f} tokens/s</b> · first token "
                f"{res.first_token_s * 1e3:.0f} ms · ended by {res.finish_reason}")

    def compare(self, prompt: str | None = None, names=None) -> None:
        """Run ``prompt`` through each of ``names`` (default: the ``compare`` selection; ``"(base)"``
        is the base model) into side-by-side columns; results in ``comparison``."""
        prompt = self.prompt.value if prompt is None else prompt
        names = list(self.compare_with.value if names is None else names)
        unknown = [n for n in names if n != BASE and n not in self._names()]
        if not names or unknown:
            raise AdapterError(f"Cannot compare {names}: unknown adapters {unknown}.",
                               f"choose from {[BASE, *self._names()]}")
        settings = self._settings()
        encode_for_generation(self.tokenizer, prompt, self.spec)
        self._guard()
        self._say(self._ensure_unmerged())
        self.column_outputs = {n: widgets.Textarea(disabled=True, layout=widgets.Layout(
            width="100%", height="8em")) for n in names}
        speeds = {n: widgets.HTML() for n in names}
        self.columns.children = [widgets.VBox([widgets.HTML(f"<b>{html.escape(n)}</b>"),
                                               self.column_outputs[n], speeds[n]],
                                              layout=widgets.Layout(flex="1 1 0")) for n in names]

        def job():
            self.comparison = {}
            for n in names:
                if self._stop.is_set():
                    speeds[n].value = "<i>skipped (stopped)</i>"
                    continue
                box = self.column_outputs[n]
                res = generate(self.model, self.tokenizer, prompt, adapter=None if n == BASE else n,
                               on_token=self._streamer(box), stop=self._stop, **settings)
                self.comparison[n] = res
                box.value, speeds[n].value = res.text, self._speed_text(res)
        self._launch(job)

    # ================================================================== merge, delete
    def _probe_logits(self) -> torch.Tensor:
        base = self.model.get_base_model()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, base.config.vocab_size, (1, 16), generator=g)
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model(input_ids=ids.to(next(self.model.parameters()).device)).logits
        self.model.train(was)
        return out.float().cpu()

    def merge(self) -> MergeReport:
        """Merge the active adapter: in place (reversibly) on a full-precision base; on a quantized
        base into a full-precision copy (``merged_model``).  Either way ``merge_report`` gives the
        logit difference between the merged and the unmerged model."""
        self._guard()
        name = active_adapter(self.model)
        if name is None:
            raise AdapterError("No adapter is active, so there is nothing to merge.",
                               "choose an adapter in 'active' first")
        if is_quantized(self.model):
            self.merged_model, rep = merged_copy(self.model, name)
            self.merge_report = rep
            self.merge_label.value = (
                f"Quantized base: <b>{html.escape(name)}</b> was merged into a full-precision copy "
                f"(<code>sb.merged_model</code>); the packed 4-bit weights were not touched.<br>"
                f"Logits of the merged copy vs the quantized model with the adapter: relative "
                f"difference <b>{rep.rel_logit_diff:.2e}</b>, max |Δ| {rep.max_abs_logit_diff:.2e} "
                f"(the adapter was trained on Q(W), the copy uses W).")
            self._say("")
            return rep
        if merged_adapters(self.model):
            raise AdapterError(f"{merged_adapters(self.model)} is merged already.",
                               "press unmerge first")
        before = self._probe_logits()
        merge_adapter(self.model, name)
        diff = self._probe_logits() - before
        self._pre_merge = before
        rep = MergeReport(adapter=name, max_abs_logit_diff=float(diff.abs().max()),
                          rel_logit_diff=float(diff.norm() / before.norm().clamp_min(1e-12)),
                          from_quantized=False)
        self.merge_report = rep
        self.merge_label.value = (f"merged <b>{html.escape(name)}</b> in place (W ← W + s·B·A); "
                                  f"logits vs unmerged: relative difference "
                                  f"<b>{rep.rel_logit_diff:.2e}</b>")
        self._refresh(structure=False)
        self._say("")
        return rep

    def unmerge(self) -> None:
        """Undo an in-place merge (W ← W − s·B·A) and show how close the logits came back."""
        self._guard()
        merged = merged_adapters(self.model)
        if not merged:
            extra = " (the merged copy of a quantized base is sb.merged_model)" \
                if self.merged_model is not None else ""
            raise AdapterError(f"No adapter is merged in place{extra}.", "merge one first")
        unmerge_adapter(self.model)
        note = ""
        if self._pre_merge is not None:
            back = float((self._probe_logits() - self._pre_merge).abs().max())
            note = f"; logits back within {back:.1e} of before the merge"
        self._pre_merge = None
        self.merge_label.value = f"unmerged {html.escape(', '.join(merged))}{note}"
        self._refresh(structure=False)
        self._say("")

    def delete(self, name: str | None = None) -> None:
        """Delete adapter ``name`` (default: the active one) and switch to the base model."""
        self._guard()
        name = name or active_adapter(self.model)
        if name is None:
            raise AdapterError("No adapter is active, so there is nothing to delete.",
                               "choose the adapter to delete in 'active' first")
        self._ensure_unmerged()
        others = [n for n in self._names() if n != name]
        if others and name == active_adapter(self.model):
            switch_adapter(self.model, others[0])     # peft warns when the active one goes
        delete_adapter(self.model, name)
        switch_adapter(self.model, None)
        self._blends.pop(name, None)
        self._refresh()
        self._say(f"deleted {name!r}; now running the base model")

    # ================================================================== blend
    def blend(self, weights: dict | None = None, combination: str | None = None,
              name: str | None = None):
        """Create a blended adapter from the weight sliders (or ``weights``) with ``combination``,
        run :func:`lora_lab.blend_adapters`' checks and make the blend active.  ``name`` defaults
        to the name box ("blend", then "blend2", ...)."""
        self._guard()
        weights = weights if weights is not None else {
            n: s.value for n, s in self.weights.items() if s.value != 0}
        combination = combination or self.combination.value
        if not weights:
            raise AdapterError("Every blend weight is 0.", "move at least one weight slider")
        name = (name or self.blend_name.value).strip() or "blend"
        self._ensure_unmerged()
        density = self.density.value if combination.startswith(("ties", "dare")) else None
        rep = blend_adapters(self.model, dict(weights), name=name, combination=combination,
                             density=density, refuse_known_bugs=not self.allow_known_bugs.value)
        self.blend_report = rep
        self._blends[name] = (dict(weights), combination, density)
        switch_adapter(self.model, name)
        k = 2
        while f"blend{k}" in self._names():
            k += 1
        self.blend_name.value = f"blend{k}"
        self._refresh()
        self._say(f"blended {rep!r}; {name!r} is active")
        return rep

    # ================================================================== code
    def code(self) -> str:
        """Plain Python that rebuilds the adapters and runs the current prompt without widgets."""
        lines = ["import lora_lab as ll", "from lora_lab.hf.generate.stream import generate", ""]
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
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
            elif row["name"] in self._blends:
                w, comb, dens = self._blends[row["name"]]
                lines.append(f"ll.blend_adapters(model, {w!r}, name={row['name']!r}, "
                             f"combination={comb!r}, density={dens!r})")
        active = active_adapter(self.model)
        lines.append(f"ll.set_adapter(model, {active!r})")
        s = {k: v for k, v in self._settings().items() if k != "spec"}
        args = ", ".join(f"{k}={v!r}" for k, v in s.items())
        lines.append(f"result = generate(model, tok, {self.prompt.value!r}, {args})")
        return "\n".join(lines) + "\n"

