"""``AdapterDesigner``: choose an adapter with widgets and see, live, what it costs and whether it fits.

::

    designer = AdapterDesigner("meta-llama/Llama-3.1-8B")    # or a config, a folder, a loaded model
    display(designer)
    designer.spec, designer.quant, print(designer.code())

The widget is a thin view: every change rebuilds an :class:`~lora_lab.AdapterSpec` and a
:class:`~lora_lab.QuantSpec` and calls the planner (:func:`lora_lab.hf.model.plan.count_adapter` and the
formulas of :mod:`lora_lab.core.memory`) on a meta-device copy of the model made once.  A choice
the specs or the model refuse (r = 0, r larger than a targeted layer, no target module, a layer that
does not exist) is shown inline with the fix; the last valid numbers stay on screen.  Under the
full FT vs LoRA vs QLoRA verdicts the summary says what each assumes: on a T4 full FT is fp32
master weights + fp16 autocast (16 bytes/param), on a bf16 GPU pure bf16 (8), and adapters are
fp32 on a frozen base everywhere (:mod:`lora_lab.core.recipes`).  The Export
button (:class:`ExportPanel`) writes the current choice as a standalone ``train.py`` with accelerate
configs (:func:`lora_lab.export.script.export_script`, data: the builtin task ``next``).
"""

from __future__ import annotations

import html
import os
from contextlib import contextmanager

import ipywidgets as widgets

from ..core.memory import DEVICES, GIB
from ..errors import LoraLabError, SpecError
from ..hf.model.facts import model_facts
from ..hf.model.plan import MemoryEstimate, estimate_from_facts
from ..hf.model.plan_args import PROMPT_LEARNING
from ..specs import (
    INITS,
    OPTIMIZERS,
    PRESET_TARGETS,
    AdapterSpec,
    DataSpec,
    QuantSpec,
    TrainSpec,
)
from ..viz.memory import (
    TERM_LABELS,
    all_gradients,
    hover_template,
    memory_figure,
    memory_limit_name,
    memory_title,
    memory_traces,
    term_label,
)
from .export_panel import ExportPanel
from .figure import ERROR_DIV, LiveFigure, theme_style

__all__ = ["AdapterDesigner", "ExportPanel"]  # ExportPanel lives in .export_panel

METHODS = ("LoRA", "DoRA", "rsLoRA", "QLoRA", "prefix", "prompt", "IA3")
QUANTS = ("none", "int8", "nf4", "fp4")
DEVICE_CHOICES = (*DEVICES, "cpu", "custom")      # cpu: this machine's RAM; custom: GiB below
_W = {"description_width": "110px"}


def _group(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else "model"


class AdapterDesigner(widgets.VBox):
    """Design an adapter and plan its memory (see the module docstring).

    ``spec`` / ``quant`` are the current valid choice; ``estimate`` the current
    :class:`~lora_lab.hf.model.plan.MemoryEstimate`; ``error`` the message shown for an invalid choice
    (``""`` when valid); ``code()`` the plain Python that reproduces the choice.
    """

    def __init__(self, model_or_config, static: bool | None = None, device: str = "T4"):
        self._source = model_or_config
        self._facts = model_facts(model_or_config)
        self._hold = False
        self.spec: AdapterSpec | None = None
        self.quant: QuantSpec | None = None
        self.estimate: MemoryEstimate | None = None
        self.error = ""
        self.updates = 0
        self._build_controls(device)
        self.update()
        est = self.estimate or estimate_from_facts(self._facts, AdapterSpec(r=1), None)
        self.live = LiveFigure(memory_figure(est), static=static)
        self.export_panel = ExportPanel(self.export_choice)
        super().__init__([theme_style(), self._controls_box(), self.summary, self.message,
                          self.export_panel, self.live.widget])
        for w in self._all_controls():
            w.observe(self._on_change, names="value")

    # ------------------------------------------------------------------ controls
    def _build_controls(self, device: str) -> None:
        table = self._facts.table
        self.method = widgets.Dropdown(options=METHODS, value="LoRA", description="method", style=_W)
        self.r = widgets.IntText(value=8, description="rank r", style=_W)
        self.alpha = widgets.FloatText(value=16.0, description="alpha α", style=_W)
        self.scaling_note = widgets.HTML()
        self.dropout = widgets.FloatText(value=0.0, step=0.05, description="dropout", style=_W)
        self.init = widgets.Dropdown(options=INITS, value="default", description="init", style=_W)
        self.quantization = widgets.Dropdown(options=QUANTS, value="none", description="quantization",
                                             style=_W)
        self.double_quant = widgets.Checkbox(value=True, description="double quant")
        self.virtual_tokens = widgets.IntText(value=20, description="virtual tokens", style=_W)
        types = list(dict.fromkeys(table["module_type"]))
        first = table.drop_duplicates("module_type").set_index("module_type")
        self.targets = {t: widgets.Checkbox(
            value=True, indent=False, layout=widgets.Layout(width="auto"),
            description=f"{t} ({first.at[t, 'in_features']}→{first.at[t, 'out_features']})")
            for t in types}
        self.groups: dict[str, list[str]] = {}
        for t in types:
            self.groups.setdefault(_group(first.at[t, "name"]), []).append(t)
        self.presets = {label: widgets.Button(description=label, layout=widgets.Layout(width="auto"))
                        for label in ("attention q+v", "all attention", "all linear")}
        for label, b in self.presets.items():
            b.on_click(lambda _b, label=label: self.apply_preset(label))
        layers = list(range(self._facts.arch.layers))
        self.all_layers = widgets.Checkbox(value=True, description="all layers")
        self.layers = widgets.SelectMultiple(options=layers, value=tuple(layers), rows=4,
                                             description="layers", style=_W)
        train, data = TrainSpec(), DataSpec()       # a default training run, as the planner's
        self.batch = widgets.IntText(value=train.batch_size, description="batch", style=_W)
        self.seq_len = widgets.IntText(value=data.max_length, description="seq len", style=_W)
        self.checkpointing = widgets.Checkbox(value=train.gradient_checkpointing,
                                              description="gradient checkpointing")
        self.optimizer = widgets.Dropdown(options=OPTIMIZERS, value=train.optimizer,
                                          description="optimizer", style=_W)
        self.device = widgets.Dropdown(options=DEVICE_CHOICES, description="device", style=_W,
                                       value=device if device in DEVICE_CHOICES else "T4")
        self.device_gb = widgets.FloatText(value=24.0, description="custom GiB", style=_W)
        self.summary = widgets.HTML()
        self.message = widgets.HTML()

    def _all_controls(self):
        return [self.method, self.r, self.alpha, self.dropout, self.init, self.quantization,
                self.double_quant, self.virtual_tokens, *self.targets.values(), self.all_layers,
                self.layers, self.batch, self.seq_len, self.checkpointing, self.optimizer,
                self.device, self.device_gb]

    def _controls_box(self) -> widgets.Widget:
        adapter = widgets.VBox([self.method, self.r, self.alpha, self.scaling_note, self.dropout,
                                self.init, self.virtual_tokens])
        quant = widgets.VBox([self.quantization, self.double_quant])
        groups = [widgets.HBox([widgets.HTML(f"<b>{g}</b>", layout=widgets.Layout(width="80px")),
                                *[self.targets[t] for t in ts]]) for g, ts in self.groups.items()]
        targets = widgets.VBox([widgets.HBox(list(self.presets.values())), *groups,
                                widgets.HBox([self.all_layers, self.layers])])
        train = widgets.VBox([self.batch, self.seq_len, self.checkpointing, self.optimizer,
                              self.device, self.device_gb])
        tabs = widgets.Tab([adapter, quant, targets, train])
        for i, title in enumerate(("adapter", "quantization", "target modules", "training & device")):
            tabs.set_title(i, title)
        return tabs

    @contextmanager
    def hold(self):
        """Change several controls with one update at the end."""
        self._hold = True
        try:
            yield self
        finally:
            self._hold = False
        self.update()

    def apply_preset(self, label: str) -> None:
        """``"attention q+v"`` (LoRA paper), ``"all attention"`` or ``"all linear"`` (QLoRA)."""
        if label == "attention q+v":
            chosen = set(PRESET_TARGETS["attention-qv"])
        elif label == "all attention":
            chosen = {t for g, ts in self.groups.items() if "att" in g.lower() for t in ts}
        else:
            chosen = set(self.targets)
        with self.hold():
            for t, box in self.targets.items():
                box.value = t in chosen

    def _on_change(self, change) -> None:
        if change["owner"] is self.method and change["new"] == "QLoRA" \
                and self.quantization.value == "none":
            self.quantization.value = "nf4"          # triggers its own update
            return
        if change["owner"] is self.all_layers and not change["new"] and \
                len(self.layers.value) == len(self.layers.options):
            self._enable_controls()                    # same selection: only unlock the list
            return
        if not self._hold:
            self.update()

    # ------------------------------------------------------------------ specs
    def _targets(self):
        chosen = tuple(t for t, b in self.targets.items() if b.value)
        return "all-linear" if len(chosen) == len(self.targets) else chosen

    def build(self) -> tuple[AdapterSpec, QuantSpec | None]:
        """The specs the controls describe; raises :class:`~lora_lab.LoraLabError` if invalid."""
        m = self.method.value
        method = {"prefix": "prefix", "prompt": "prompt", "IA3": "ia3"}.get(m, "lora")
        kw = {"method": method}
        if method == "lora":
            kw.update(r=self.r.value, alpha=self.alpha.value, dropout=self.dropout.value,
                      init=self.init.value, use_dora=m == "DoRA", use_rslora=m == "rsLoRA")
        if method in ("lora", "ia3"):
            kw.update(target_modules=self._targets(),
                      layers=None if self.all_layers.value else tuple(self.layers.value))
        if method in ("prefix", "prompt"):
            kw.update(num_virtual_tokens=self.virtual_tokens.value)
        spec = AdapterSpec(**kw)
        q = self.quantization.value
        quant = None if q == "none" else QuantSpec(bits=8) if q == "int8" else \
            QuantSpec(bits=4, quant_type=q, double_quant=self.double_quant.value)
        if m == "QLoRA" and (quant is None or quant.bits != 4):
            raise SpecError("AdapterDesigner", "quantization", q, "QLoRA is LoRA on a 4-bit base",
                            "choose nf4 (the QLoRA paper's choice) or fp4, or method LoRA")
        if quant is not None and spec.init in ("pissa", "olora"):   # attach() refuses these too
            raise SpecError("AdapterSpec", "init", spec.init,
                            f"{spec.init} rewrites the base weights, which a quantized base cannot take",
                            "choose quantization none, or init default")
        return spec, quant

    def _enable_controls(self) -> None:
        """Grey out what the chosen method does not use."""
        method = self.method.value
        lora = method in ("LoRA", "DoRA", "rsLoRA", "QLoRA")
        for w in (self.r, self.alpha, self.dropout, self.init):
            w.disabled = not lora
        self.virtual_tokens.disabled = method not in ("prefix", "prompt")
        for w in (*self.targets.values(), *self.presets.values(), self.all_layers):
            w.disabled = method in ("prefix", "prompt")
        self.layers.disabled = method in ("prefix", "prompt") or self.all_layers.value
        self.double_quant.disabled = self.quantization.value not in ("nf4", "fp4")
        self.device_gb.disabled = self.device.value != "custom"

    def _device_arg(self):
        return self.device_gb.value if self.device.value == "custom" else self.device.value

    # ------------------------------------------------------------------ update
    def update(self) -> None:
        """Rebuild the specs, recount, re-estimate and redraw; show any refusal inline."""
        self.updates += 1
        self._enable_controls()
        try:
            spec, quant = self.build()
            args = dict(batch_size=self.batch.value, seq_len=self.seq_len.value,
                        gradient_checkpointing=self.checkpointing.value,
                        optimizer=self.optimizer.value, device=self._device_arg())
            est = estimate_from_facts(self._facts, spec, quant, **args)
            # the other loss, for comparison: full-vocabulary logits vs the chunked loss (prefix and
            # prompt tuning train with the full loss only: peft adds their virtual tokens itself)
            other = None if spec is not None and spec.method in PROMPT_LEARNING else estimate_from_facts(
                self._facts, spec, quant, chunked_loss=est.loss_chunk is None, **args)
        except LoraLabError as exc:
            self.error = str(exc)
            self.message.value = (ERROR_DIV + "⚠ "
                                  + html.escape(self.error, quote=False) + "</div>")
            return
        self.error, self.message.value = "", ""
        self.spec, self.quant, self.estimate = spec, quant, est
        self.scaling_note.value = self._scaling_text(spec)
        self.summary.value = self._summary(est, est.trainable[est.chosen]) + self._loss_text(est, other)
        if hasattr(self, "live"):
            self._redraw(est)

    @staticmethod
    def _scaling_text(spec: AdapterSpec) -> str:
        if spec.method != "lora":
            return ""
        rule = f"α/√r = {spec.alpha:g}/√{spec.r}" if spec.use_rslora else f"α/r = {spec.alpha:g}/{spec.r}"
        return f"<small>scaling s = {rule} = <b>{spec.scaling:.3g}</b> (ΔW = s·B·A)</small>"

    def _summary(self, est: MemoryEstimate, trainable: int) -> str:
        total = est.total_params + trainable
        verdicts = " · ".join(f"{s}: {est.need(s) / GIB:.1f} GiB <b>{v}</b>"
                              for s, v in est.verdicts().items())
        merge = ""
        if est.merge_verdict() == "does not fit":
            merge = (f"<br>Merging on this device afterwards needs {est.merge_need() / GIB:.1f} GiB: "
                     "merge on the CPU, or keep the adapter separate.")
        return (f"<b>trainable</b> {trainable:,} of {total:,} ({100 * trainable / total:.4f}%) · "
                f"<b>adapter file</b> {est.adapter_file_bytes / 2**20:.2f} MiB<br>"
                f"<b>{est.chosen}</b> on {est.device_text}: {est.verdict()}<br>{verdicts}"
                f"{self._recipes(est)}{merge}")

    @staticmethod
    def _loss_text(est: MemoryEstimate, other: MemoryEstimate | None) -> str:
        """Both losses side by side: the logits term and the need of the chosen scenario (one when
        ``other`` is None: prefix and prompt tuning, which the chunked loss cannot train)."""
        parts = []
        for e in sorted((est, other) if other is not None else (est,), key=lambda e: e.loss_chunk is None):
            name = "full-vocabulary loss" if e.loss_chunk is None else f"chunked loss ({e.loss_chunk} tokens)"
            mark = " (TrainSpec default)" if e is est else ""
            parts.append(f"{name}{mark}: logits {e.scenarios[e.chosen]['logits'] / GIB:.2f} GiB, "
                         f"need {e.need() / GIB:.1f} GiB <b>{e.verdict()}</b>")
        return "<br><small><b>loss</b> " + " · ".join(parts) + "</small>"

    @staticmethod
    def _recipes(est: MemoryEstimate) -> str:
        """What the comparison assumes, in words: full FT's recipe and the adapters' (the bytes
        per trained parameter differ by device: :mod:`lora_lab.core.recipes`)."""
        lines = est.recipes_text().splitlines()
        if not lines:
            return ""
        items = "".join(f"<li>{html.escape(line, quote=False)}</li>" for line in lines)
        return f"<br><small>Assumed: <ul style='margin:0'>{items}</ul></small>"

    def _redraw(self, est: MemoryEstimate) -> None:
        names, values = memory_traces(est)
        limit = est.device_bytes / GIB
        with self.live.batch_update() as fig:
            renamed = list(fig.data[0].x) != names
            for trace, term in zip(fig.data, TERM_LABELS):
                trace.y = values[term]
                if renamed:
                    trace.x = names
                if term == "gradients":
                    trace.customdata = all_gradients(est)
                label = term_label(est, term)
                if trace.name != label:                  # CUDA context <-> the CPU's libraries
                    trace.name, trace.hovertemplate = label, hover_template(term, label)
            line = fig.data[len(TERM_LABELS)]
            if renamed:
                line.x = names
            line.y, line.name = [limit] * len(names), memory_limit_name(est)
            fig.layout.title.text = memory_title(est)

    # ------------------------------------------------------------------ export
    def export_choice(self) -> dict:
        """The current choice as :func:`lora_lab.export.script.export_script` arguments."""
        if self.error or self.spec is None:
            raise LoraLabError("The current choice is not valid, so there is nothing to export: "
                               + (self.error.splitlines()[0] if self.error else "no choice yet"),
                               "fix the choice shown in red first")
        src = self._source
        model_id = os.fspath(src) if isinstance(src, (str, os.PathLike)) else \
            getattr(src, "lora_lab_source", None)
        if model_id is None:
            raise LoraLabError("This designer was made from a config or a model lora_lab did not "
                               "load, so the export has no model to load.",
                               "make it with AdapterDesigner('<hub id, folder or builtin name>')")
        train = TrainSpec(batch_size=self.batch.value, optimizer=self.optimizer.value,
                          gradient_checkpointing=self.checkpointing.value)
        return {"adapter_spec": self.spec, "quant_spec": self.quant, "train_spec": train,
                    "data_spec": DataSpec(max_length=self.seq_len.value), "model_id": model_id,
                    "device": self._device_arg()}

    # ------------------------------------------------------------------ code
    def code(self) -> str:
        """Plain Python that reproduces the current choice without widgets."""
        spec, quant = self.spec, self.quant
        if spec is None:
            return "# no valid choice yet"
        defaults = AdapterSpec(method=spec.method)
        fields = {k: v for k, v in spec.to_dict().items()
                  if k == "method" or v != getattr(defaults, k) or k in ("r", "alpha")}
        args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        qline = "None" if quant is None else (
            f"ll.QuantSpec(bits={quant.bits}, quant_type={quant.quant_type!r}, "
            f"double_quant={quant.double_quant!r})")
        est = (f"ll.estimate_memory({{model}}, adapter=spec, quant=quant, "
               f"batch_size={self.batch.value!r}, seq_len={self.seq_len.value!r}, "
               f"gradient_checkpointing={self.checkpointing.value!r}, "
               f"optimizer={self.optimizer.value!r}, device={self._device_arg()!r})")
        if isinstance(self._source, str):
            est_line = "estimate = " + est.format(model=repr(self._source))
        else:
            est_line = "# estimate = " + est.format(model="config")
        return "\n".join(["import lora_lab as ll", "",
                          f"spec = ll.AdapterSpec({args})",
                          f"quant = {qline}", est_line, ""])
