"""``QuantExplorer``: pick a quantization scheme and see, layer by layer, what it costs and saves.

::

    model, _ = ll.load_model("builtin:tiny")         # full precision (not quant=...)
    explorer = QuantExplorer(model)                   # or a checkpoint folder / .safetensors file
    display(explorer)
    explorer.result, explorer.memory, print(explorer.code())

* **scheme / blocksize / double quant** — one :func:`lora_lab.scan_quantization` per choice,
  cached per ``(scheme, blocksize, double_quant)``, so switching back is instant.  The heatmap shows
  the relative error ‖W − Q(W)‖_F / ‖W‖_F with decoder layers down and module types across.
  ``int8`` is LLM.int8(), what ``load_model(quant="int8")`` stores (one absmax per row: blocksize
  and double quant do not apply and are greyed out); ``int8-blockwise`` is bitsandbytes' blockwise
  8-bit.  The summary says what each scheme is, and when the weights are already on a 4-bit grid
  (a GGUF Q4 checkpoint), where weight error misleads: compare schemes on logits there.
* **memory** — the linear weights at fp16 (2 bytes each) against the chosen scheme's storage,
  Σ numel × bits_per_param / 8 over the scanned tensors (bits_per_param counts the block constants:
  4.5 bits for NF4 at blocksize 64, ≈ 4.127 with double quantization, QLoRA §3), as a
  :class:`~lora_lab.core.memory.QuantStorage` (:func:`lora_lab.core.memory.quant_storage`).
  Sizes are in MiB (2²⁰ bytes) and GiB (2³⁰), as in ``QuantScan.summary`` (its ``*_mb`` columns).
* **module** — one tensor's detail: its weight histogram with the scheme's code levels
  (:func:`lora_lab.hf.quant.roundtrip.weight_histogram_data`, drawn by
  :func:`lora_lab.viz.quant.weight_histogram`) and its :class:`~lora_lab.QuantError` numbers.
  Clicking a heatmap cell selects it (live figures only).

A source that cannot be scanned (an already quantized model, a missing path) or a choice
bitsandbytes refuses shows inline; the last valid view stays on screen.
"""

from __future__ import annotations

import html
import os

import ipywidgets as widgets

from ..core.memory import QuantStorage, quant_storage
from ..core.quant import SCHEME_NOTES, SCHEMES, canonical_scheme
from ..errors import LoraLabError
from ..hf.quant.roundtrip import BLOCKSIZES, check_scheme, weight_histogram_data
from ..hf.quant.scan import PREQUANT_NOTE, QuantScan, scan_quantization, weight_loaders
from ..viz.quant import error_heatmap, weight_histogram
from .figure import ERROR_DIV, LiveFigure, theme_style

__all__ = ["QuantExplorer"]

_W = {"description_width": "90px"}
_DETAIL = (("rel_error", "relative error ‖W−Q‖/‖W‖", "{:.4g}"),
           ("mean_abs_error", "mean |W−Q|", "{:.4g}"), ("max_abs_error", "max |W−Q|", "{:.4g}"),
           ("snr_db", "SNR", "{:.2f} dB"), ("outlier_share", "share of |w| > 6σ", "{:.3%}"),
           ("bits_per_param", "bits / param", "{:.4g}"))


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _check_choice(scheme, blocksize) -> LoraLabError | None:
    """hf.quant's own check, reworded for the widget, which falls back to nf4 / 64."""
    try:
        check_scheme(scheme, blocksize)
    except LoraLabError as err:
        try:
            canonical_scheme(scheme)
            shown = "blocksize 64"
        except LoraLabError:
            shown = "nf4"
        return LoraLabError(f"QuantExplorer: {err.problem} Showing {shown}.", err.fix)
    return None


class QuantExplorer(widgets.VBox):
    """Explore the quantization error of a full-precision model (see the module docstring).

    ``result``: the current :class:`~lora_lab.QuantScan` (None until one succeeds); ``memory``: its
    :class:`~lora_lab.core.memory.QuantStorage` (fp16 vs quantized bytes); ``error``: the message
    shown for a refusal (``""`` when fine); ``code()``:
    plain Python that reproduces ``result``.
    """

    def __init__(self, source, scheme: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 static: bool | None = None, progress: bool = False):
        self._source, self._progress = source, progress
        self._cache: dict[tuple, QuantScan] = {}
        self.result: QuantScan | None = None
        self.memory: QuantStorage | None = None
        self.error = ""
        refused = _check_choice(scheme, blocksize)
        if refused:
            scheme, blocksize = "nf4", 64
        scheme = canonical_scheme(scheme)                      # "llm.int8" is "int8"
        self.scheme = widgets.Dropdown(options=SCHEMES, value=scheme, description="scheme", style=_W)
        self.blocksize = widgets.Dropdown(options=BLOCKSIZES, value=blocksize, description="blocksize",
                                          style=_W)
        self.double_quant = widgets.Checkbox(value=double_quant, description="double quant")
        self.module = widgets.Dropdown(options=[], description="module", style=_W,
                                       layout=widgets.Layout(width="460px"))
        self.summary, self.detail, self.message = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.heatmap = self.histogram = None
        try:
            self._loaders = weight_loaders(source)
        except LoraLabError as exc:
            self._loaders = {}
            self._show_error(exc)
        self._static = static
        self.update()
        if refused:
            self._show_error(refused)
        controls = widgets.HBox([self.scheme, self.blocksize, self.double_quant])
        figs = [f.widget for f in (self.heatmap, self.histogram) if f is not None]
        super().__init__([theme_style(), controls, self.summary, self.message, self.module,
                          widgets.HBox(figs, layout=widgets.Layout(flex_flow="row wrap")),
                          self.detail])  # wrap: the two figures side by side need ~1,100 px
        for w in (self.scheme, self.blocksize, self.double_quant):
            w.observe(lambda _c: self.update(), names="value")
        self._grey_out()
        self.scheme.observe(lambda _c: self._grey_out(), names="value")
        self.module.observe(lambda _c: self._show_module(), names="value")

    # ------------------------------------------------------------------ scanning
    @property
    def choice(self) -> tuple[str, int, bool]:
        """The current ``(scheme, blocksize, double_quant)``: the cache key."""
        return self.scheme.value, self.blocksize.value, self.double_quant.value

    def _grey_out(self) -> None:
        """LLM.int8() keeps one absmax per row: blocksize and double quant do not apply to it."""
        self.blocksize.disabled = self.double_quant.disabled = self.scheme.value == "int8"

    def scan(self, scheme: str, blocksize: int, double_quant: bool) -> QuantScan:
        """The scan for one choice, from the cache when it was done before.  An interrupted scan
        (its finished rows only) is not cached, and refused when it holds no row.  LLM.int8()
        (``int8``) ignores blocksize and double quant, so all its choices share one scan."""
        scheme = canonical_scheme(scheme)
        key = (scheme, None, False) if scheme == "int8" else (scheme, blocksize, double_quant)
        if key in self._cache:
            return self._cache[key]
        scan = scan_quantization(self._source, schemes=(scheme,), blocksize=blocksize,
                                 double_quant=double_quant, progress=self._progress)
        if scan.table.empty:
            raise LoraLabError(f"The {scheme} scan has no rows ({scan.n_done} of {scan.n_total} "
                               "tensors done).", "pick the choice again to rescan")
        if not scan.interrupted:
            self._cache[key] = scan
        return scan

    def update(self) -> None:
        """Scan (or fetch from the cache) the current choice and redraw; refusals show inline."""
        if not self._loaders:
            if not self.error:
                self._show_error(LoraLabError("The source holds no linear weights to scan.",
                                              "pass a full-precision causal LM or its checkpoint"))
            return
        try:
            scan = self.scan(*self.choice)
        except (LoraLabError, RuntimeError, ValueError) as exc:   # bitsandbytes refusals too
            self._show_error(exc)
            return
        self.error, self.message.value = "", ""
        self.result = scan
        self.memory = quant_storage(scan.table["numel"], scan.table["bits_per_param"])
        self.summary.value = self._summary_html()
        self._draw_heatmap(scan)
        names = list(scan.table["name"])
        if list(self.module.options) != names:
            keep = self.module.value if self.module.value in names else (names[0] if names else None)
            self.module.options = names
            self.module.value = keep
        self._show_module()

    def _show_error(self, exc: Exception) -> None:
        self.error = str(exc)
        self.message.value = (ERROR_DIV + "⚠ "
                              + html.escape(self.error) + "</div>")

    # ------------------------------------------------------------------ drawing
    def _summary_html(self) -> str:
        m, t = self.memory, self.result.table
        scheme, bs, dq = self.choice
        how = "one absmax per row" if scheme == "int8" else \
            f"blocksize {bs}{', double quant' if dq else ''}"
        notes = [SCHEME_NOTES[scheme]] + ([PREQUANT_NOTE] if self.result.prequantized else [])
        notes = "".join(f"<br><i>{html.escape(n)}</i>" for n in notes)
        return (f"<b>{scheme}</b>, {how}: "
                f"{len(t)} linear weights, {m.numel:,} parameters, {m.bits_per_param:.3f} "
                f"bits/param · relative error mean {t['rel_error'].mean():.4g}, "
                f"max {t['rel_error'].max():.4g}<br><b>memory</b> {_size(m.fp16_bytes)} at fp16 → "
                f"{_size(m.quant_bytes)} in {scheme}: <b>saves {_size(m.saved_bytes)} "
                f"({m.saved_share:.1%})</b>" + notes)

    def _draw_heatmap(self, scan: QuantScan) -> None:
        fig = error_heatmap(scan)
        fig.update_layout(width=520, height=420)
        if self.heatmap is None:
            self.heatmap = LiveFigure(fig, static=self._static)
            if not self.heatmap.static and self.heatmap.figure.data:
                self.heatmap.figure.data[0].on_click(self._on_cell_click)
        else:
            with self.heatmap.batch_update() as f:
                for key in ("z", "x", "y", "customdata", "name", "hovertemplate"):
                    setattr(f.data[0], key, getattr(fig.data[0], key))
                f.layout.title.text = fig.layout.title.text

    def _on_cell_click(self, trace, points, _state) -> None:
        if points.point_inds:
            name = trace.customdata[points.point_inds[0][0]][points.point_inds[0][1]]
            if name in self.module.options:
                self.module.value = name

    def _show_module(self) -> None:
        name = self.module.value
        if name is None or self.result is None:
            return
        scheme, bs, _ = self.choice
        try:
            fig = weight_histogram(weight_histogram_data(self._loaders[name]().float().cpu(),
                                                         scheme=scheme, blocksize=bs, name=name))
        except (LoraLabError, RuntimeError, ValueError) as exc:
            self._show_error(exc)
            return
        fig.update_layout(width=560, height=420, title_font_size=12)
        if self.histogram is None:
            self.histogram = LiveFigure(fig, static=self._static)
        else:
            self.histogram.replace(fig)
        row = self.result.table.set_index("name").loc[name]
        cells = "".join(f"<tr><td>{label}</td><td><b>{fmt.format(float(row[k]))}</b></td></tr>"
                        for k, label, fmt in _DETAIL)
        self.detail.value = (f"<b>{html.escape(name)}</b> ({row['out_features']}×{row['in_features']},"
                             f" layer {row['layer']}, {row['module']})<table>{cells}</table>")

    # ------------------------------------------------------------------ take-away
    def code(self) -> str:
        """Plain Python that reproduces ``result`` (the current scan) without widgets."""
        scheme, bs, dq = self.choice
        src = self._source
        if isinstance(src, (str, os.PathLike)):
            lines, arg = [], repr(str(src))
        elif getattr(src, "lora_lab_source", None):
            lines = [f"model, _ = ll.load_model({src.lora_lab_source!r})  # full precision"]
            arg = "model"
        else:
            lines, arg = ["# model: your loaded full-precision model"], "model"
        scan = (f"scan = ll.scan_quantization({arg}, schemes=({scheme!r},), blocksize={bs!r}, "
                f"double_quant={dq!r}, progress=False)")
        return "\n".join(["import lora_lab as ll", "from lora_lab.viz.quant import error_heatmap",
                          "", *lines, scan,
                          "print(scan.table)            # one row per linear weight",
                          "fp16_mb = scan.summary.fp16_mb[0]; size_mb = scan.summary.size_mb[0]",
                          "print(f'{fp16_mb:.2f} MiB at fp16 -> {size_mb:.2f} MiB')",
                          "error_heatmap(scan)          # layers x module type", ""])

    def __repr__(self) -> str:
        if self.result is None:
            return f"QuantExplorer(no scan: {self.error.splitlines()[0] if self.error else ''})"
        m = self.memory
        return (f"QuantExplorer({self.result.source}, {self.choice}: mean rel error "
                f"{self.result.table['rel_error'].mean():.4g}, saves {_size(m.saved_bytes)} "
                f"({m.saved_share:.1%}))")
