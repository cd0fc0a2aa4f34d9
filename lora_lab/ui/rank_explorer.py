"""``RankExplorer``: move a rank cut across every layer's spectrum and see what it would cost.

::

    explorer = RankExplorer(model)              # a model with a trained LoRA adapter
    display(explorer)
    explorer.rank, explorer.result, print(explorer.code())

    RankExplorer(model_r8, other=model_r64)     # also φ: do the two adapters share directions?

A LoRA update ΔW = s·B·A (out × in) has at most r singular values σ₁ ≥ … ≥ σ_r.  Cutting it to rank
k keeps the top k of them: the best rank-k approximation (Eckart–Young), which keeps the share
Σ_{i ≤ k} σ_i² / Σ σ_i² of ‖ΔW‖²_F ("energy") and leaves the relative error
‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(1 − energy).  The LoRA paper (Hu et al. 2021, §7.2) finds that a few top
directions carry most of an adapter: the explorer shows where that is true, layer by layer.

* **rank slider** — the cut k, for all modules at once.  The summary shows the energy kept (whole
  adapter and per module), the LoRA parameter count at k, and the estimated ΔW error.
* **metric picker** — what the layers × module-type heatmap shows: energy or error at k, effective
  rank, stable rank, k for 90% / 99% energy, σ₁; with a second adapter, φ(k, k) and φ summaries.
* **module picker** — whose spectrum the right-hand figure shows (σ_i, cumulative energy, the cut).
* **"compress to this rank"** — :func:`lora_lab.compress_adapter` at k: a new peft adapter whose ΔW
  is the truncated SVD; its report shows under the button.

All SVDs happen once, at construction (:func:`lora_lab.adapter_spectra`, O((out + in)·r²) per
module); a slider move reads precomputed arrays (:class:`lora_lab.core.rank_cut.CutGrid`) and sends
one batched figure update (under 50 ms for a 224-module 7B-shaped adapter, see
``benchmarks/rank_explorer.py``).
Refusals (a rank the adapter cannot be cut to, a DoRA adapter, a name already taken) show inline.

DoRA adapters (Liu et al. 2024, §4: W' = m · (W + s·B·A) / ‖W + s·B·A‖_c) are explored through
their true update W' − W, learned magnitude included: it is full rank, so "energy at k" says how
much of it a rank-k update could hold.  Every view says so (summary, heatmap and spectrum titles).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
import pandas as pd
import traitlets

from ..core.rank_cut import CutGrid, diagonal_phi
from ..errors import AdapterError, LoraLabError
from ..hf.spectra.analysis import (
    DORA_NOTE,
    AdapterComparison,
    AdapterSpectra,
    adapter_spectra,
    compare_adapters,
)
from ..hf.spectra.compress import compress_adapter
from ..viz.spectrum import METRIC_LABELS, phi_figure, spectrum_figure, with_notes
from ..viz.sweep import cut_heatmap
from .figure import ERROR_DIV, LiveFigure, theme_style

__all__ = ["RankExplorer", "RankChoice"]

K_METRICS = ("energy_at_k", "error_at_k", "phi_at_k")
TABLE_METRICS = ("effective_rank", "stable_rank", "k90", "k99", "top_sigma")
PHI_METRICS = ("phi_top", "phi_mean")
_LABELS = {**METRIC_LABELS, "phi_at_k": "φ(k, k) between the two adapters"}
FIG_WIDTH, FIG_HEIGHT = 560, 440
_DORA_HINT = (": the learned magnitude makes each layer's real update W' − W full rank, so a rank-k "
              "cut cannot hold all of it, and compress_adapter refuses DoRA.")


@dataclass(frozen=True, eq=False)
class RankChoice:
    """What a rank cut at ``rank`` keeps: the explorer's take-away (``RankExplorer.result``).

    ``energy_kept``: share of the whole adapter's Σ‖ΔW‖²_F kept; ``error_median`` / ``error_max``:
    per-module ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F; ``parameters`` vs ``parameters_full`` (LoRA parameters at k
    and at the trained r); ``table``: per module r, energy and error at k; ``compression``: the
    :class:`~lora_lab.hf.spectra.compress.Compression` when the button was used at this rank, else None.
    """

    adapter: str | None
    rank: int
    energy_kept: float
    error_median: float
    error_max: float
    parameters: int
    parameters_full: int
    table: pd.DataFrame
    compression: object = None

    def __repr__(self) -> str:
        done = f", compressed → {self.compression.adapter!r}" if self.compression else ""
        return (f"RankChoice({self.adapter!r} at rank {self.rank}: keeps {self.energy_kept:.1%} of "
                f"‖ΔW‖², ΔW error median {self.error_median:.3g} / max {self.error_max:.3g}, "
                f"LoRA parameters {self.parameters:,} of {self.parameters_full:,}{done})")

    def _repr_html_(self) -> str:
        return f"<b>{html.escape(repr(self))}</b>" + self.table.to_html(index=False,
                                                                        float_format="%.4g")


def _is_model(obj) -> bool:
    return hasattr(obj, "peft_config") and hasattr(obj, "named_modules")


class RankExplorer(widgets.VBox):
    """Explore rank cuts of a trained LoRA adapter (see the module docstring).

    ``source``: a model carrying a LoRA adapter (``adapter`` names it; the active one when None), or
    a precomputed :class:`~lora_lab.hf.spectra.analysis.AdapterSpectra` (then there is nothing to
    compress).  ``other``: a second model (its ``other_adapter``), or an
    :class:`~lora_lab.hf.spectra.analysis.AdapterComparison`, for the φ metrics; ``other_adapter``
    alone compares two adapters of ``source``.  ``rank``: the first cut (default: median k90).

    Traits (observable, updated on every slider move): ``rank``, ``energy_kept`` (whole adapter),
    ``relative_error`` (median per-module ΔW error), ``parameters`` (LoRA parameters at ``rank``),
    ``error`` (the inline message, ``""`` when all is well).  ``spectra``, ``comparison``,
    ``compression`` (the last button result) and ``result`` (a :class:`RankChoice`) for plain use.
    """

    rank = traitlets.Int(1)
    energy_kept = traitlets.Float(1.0)
    relative_error = traitlets.Float(0.0)
    parameters = traitlets.Int(0)
    error = traitlets.Unicode("")

    def __init__(self, source, other=None, *, adapter: str | None = None,
                 other_adapter: str | None = None, rank: int | None = None,
                 static: bool | None = None):
        self.model, self.spectra = self._analyse(source, adapter)
        self.adapter = self.spectra.adapter
        self.comparison = self._compare(source, other, adapter, other_adapter)
        self.compression = None
        self.updates = 0
        self.cut = CutGrid.from_spectra(self.spectra)
        self._table = self.spectra.table
        self._phi = (diagonal_phi(self.comparison.grids, self.cut.names, self.cut.max_rank)
                     if self.comparison is not None else None)
        R = self.cut.max_rank
        self._full_params = self.cut.parameters_at(R)
        start = rank if rank is not None else int(np.nanmedian(self._table["k90"]))
        start = int(min(max(start, 1), R))
        self._build_controls(R, start)
        self.live = LiveFigure(self._heatmap_figure(start), static=static)
        self.detail = LiveFigure(self._detail_figure(start), static=static)
        self.phi_live = (LiveFigure(self._phi_module_figure(), static=static)
                         if self.comparison is not None else None)
        figures = [self.live.widget, self.detail.widget]
        rows = [theme_style(), widgets.HBox([self.slider, self.metric]),
                widgets.HBox([self.module, self.compress_button]),
                self.summary, self.message,
                widgets.HBox(figures, layout=widgets.Layout(flex_flow="row wrap"))]
        if self.phi_live is not None:
            rows.append(self.phi_live.widget)
        super().__init__(rows + [self.report])
        self.rank = start
        self._set_rank(start)
        self.slider.observe(lambda ch: self._set_rank(ch["new"]), names="value")
        self.metric.observe(lambda ch: self._redraw_heatmap(), names="value")
        self.module.observe(lambda ch: self._redraw_module(), names="value")
        self.compress_button.on_click(self._on_compress_click)
        self.observe(self._on_rank_trait, names="rank")

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _analyse(source, adapter):
        if isinstance(source, AdapterSpectra):
            model, spectra = None, source
        elif _is_model(source):
            model, spectra = source, adapter_spectra(source, adapter)
        else:
            raise AdapterError(
                f"RankExplorer got a {type(source).__name__}, which is neither a model with a LoRA "
                "adapter nor an AdapterSpectra.",
                "pass a model from lora_lab.attach / load_adapter, or "
                "lora_lab.adapter_spectra(model)")
        if len(spectra) == 0:
            raise AdapterError(f"Adapter {spectra.adapter!r} has no LoRA modules to explore.",
                               "pass a model carrying a LoRA adapter (prefix, prompt and IA3 "
                               "have no rank)")
        return model, spectra

    @staticmethod
    def _compare(source, other, adapter, other_adapter):
        if isinstance(other, AdapterComparison):
            return other
        if other is None and other_adapter is None:
            return None
        if other is not None and not _is_model(other):
            raise AdapterError(f"other= is a {type(other).__name__}, not a model with an adapter.",
                               "pass a second model, an AdapterComparison, or other_adapter='name'")
        if not _is_model(source):
            raise AdapterError("Comparing adapters needs the models, not precomputed spectra.",
                               "pass RankExplorer(model, other=model_b) or "
                               "other=compare_adapters(...)")
        second = other if other is not None else source
        return compare_adapters(source, second, adapter, other_adapter)

    # ------------------------------------------------------------------ controls
    def _build_controls(self, R: int, start: int) -> None:
        style = {"description_width": "90px"}
        self.slider = widgets.IntSlider(value=start, min=1, max=R, description="rank k",
                                        continuous_update=True, style=style,
                                        layout=widgets.Layout(width="420px"))
        options = [(_LABELS[m], m) for m in ("energy_at_k", "error_at_k", *TABLE_METRICS)]
        if self.comparison is not None:
            options += [(_LABELS[m], m) for m in ("phi_at_k", *PHI_METRICS)]
        self.metric = widgets.Dropdown(options=options, value="energy_at_k", description="heatmap",
                                       style=style)
        self.module = widgets.Dropdown(options=list(self.cut.names), value=self._default_module(),
                                       description="module", style=style,
                                       layout=widgets.Layout(width="420px"))
        self.compress_button = widgets.Button(
            description="compress to this rank", icon="compress", disabled=self.model is None,
            tooltip="lora_lab.compress_adapter at k" if self.model is not None
            else "needs the model: RankExplorer(model)")
        self.summary, self.message, self.report = widgets.HTML(), widgets.HTML(), widgets.HTML()

    def _default_module(self) -> str:
        """The module with the largest ‖ΔW‖_F (the most trained one)."""
        return self.cut.names[int(np.argmax(self.cut.frob2))]

    # ------------------------------------------------------------------ values at k
    def _values(self, metric: str, k: int) -> np.ndarray:
        if metric == "energy_at_k":
            return self.cut.energy_at(k)
        if metric == "error_at_k":
            return self.cut.error_at(k)
        if metric == "phi_at_k":
            return self._phi[:, min(k, self.cut.max_rank)]
        if metric in PHI_METRICS:
            col = self.comparison.table.set_index("name")[metric]
            return np.array([col.get(n, np.nan) for n in self.cut.names], dtype=float)
        return self._table[metric].to_numpy(float)

    def _label(self, metric: str, k: int) -> str:
        label = _LABELS[metric] + (f" (k={k})" if metric in K_METRICS else "")
        phi = metric == "phi_at_k" or metric in PHI_METRICS
        return with_notes(label, self.comparison.notes if phi else self.spectra.notes)

    # ------------------------------------------------------------------ figures
    def _heatmap_figure(self, k: int):
        metric = self.metric.value
        fig = cut_heatmap(self.cut, self._values(metric, k), self._label(metric, k))
        return fig.update_layout(width=FIG_WIDTH, height=FIG_HEIGHT)

    def _detail_title(self, k: int) -> str:
        s = self.spectra[self.module.value]
        return with_notes(f"{self.module.value} — rank {k} keeps {s.energy_at(k):.1%} of the energy",
                          [s.note])

    def _detail_figure(self, k: int):
        fig = spectrum_figure(self.spectra[self.module.value], k)
        fig.update_layout(title=self._detail_title(k), margin=dict(l=60, r=40, t=50, b=50),
                          width=FIG_WIDTH, height=FIG_HEIGHT)
        return fig

    def _phi_module_figure(self):
        name = self.module.value
        if name in self.comparison.grids:
            return phi_figure((self.comparison, name))
        return phi_figure(np.full((1, 1), np.nan), title=f"φ — {name}: not adapted by both")

    def _redraw_heatmap(self) -> None:
        k = self.slider.value
        metric = self.metric.value
        z = self.cut.grid(self._values(metric, k))
        label = self._label(metric, k)
        with self.live.batch_update() as fig:
            fig.data[0].z, fig.data[0].text = z, np.round(z, 3)
            fig.data[0].colorbar.title.text = label
            fig.layout.title.text = label

    def _redraw_module(self) -> None:
        self.detail.replace(self._detail_figure(self.slider.value))
        if self.phi_live is not None:
            self.phi_live.replace(self._phi_module_figure())

    # ------------------------------------------------------------------ the slider
    def _on_rank_trait(self, change) -> None:
        if self.slider.value != change["new"]:
            self.slider.value = int(min(max(change["new"], 1), self.slider.max))

    def _set_rank(self, k: int) -> None:
        """Everything a slider move does: traits, summary, heatmap (if k matters), cut line."""
        self.updates += 1
        cut = self.cut
        errors = cut.error_at(k)
        self.rank = k
        self.energy_kept = cut.total_energy_at(k)
        self.relative_error = float(np.median(errors))
        self.parameters = cut.parameters_at(k)
        self.summary.value = self._summary(k, cut.energy_at(k), errors)
        if self.metric.value in K_METRICS:
            self._redraw_heatmap()
        with self.detail.batch_update() as fig:
            if fig.layout.shapes:
                fig.layout.shapes[0].update(x0=k + 0.5, x1=k + 0.5)
            fig.layout.title.text = self._detail_title(k)
        self._show("")

    def _summary(self, k: int, energies: np.ndarray, errors: np.ndarray) -> str:
        if not self.cut.frob2.any():
            return ("<b>ΔW = 0 in every module</b>: the adapter is untrained (peft starts with "
                    "B = 0), so there is nothing to cut yet.  Train it first (lora_lab.train).")
        dora = "".join(f"<br><b>{html.escape(n, quote=False)}</b>"
                       + (_DORA_HINT if n == DORA_NOTE else "") for n in self.spectra.notes)
        return (f"<b>rank {k}</b> of r = {self.cut.max_rank} keeps <b>{self.energy_kept:.1%}</b> "
                f"of the adapter's ‖ΔW‖² (per module: min {energies.min():.1%}, median "
                f"{np.median(energies):.1%}) · estimated ΔW error √(1 − energy): median "
                f"<b>{self.relative_error:.3g}</b>, max {errors.max():.3g} · LoRA parameters "
                f"<b>{self.parameters:,}</b> of {self._full_params:,} "
                f"({self.parameters / max(self._full_params, 1):.0%}){dora}")

    # ------------------------------------------------------------------ actions
    def _show(self, text: str) -> None:
        self.error = text
        self.message.value = ("" if not text else ERROR_DIV
                              + f"⚠ {html.escape(text)}</div>")

    def _on_compress_click(self, _button) -> None:
        try:
            self.compress()
        except Exception as exc:  # noqa: BLE001  (a button shows problems inline, never a trace)
            self._show(f"compress_adapter failed: {type(exc).__name__}: {exc}")

    def compress(self, new_name: str | None = None):
        """Apply :func:`lora_lab.compress_adapter` at the current rank (what the button does).

        Returns the :class:`~lora_lab.hf.spectra.compress.Compression`, or None when refused (the
        reason is shown inline and kept in ``error``)."""
        if self.model is None:
            self._show("This explorer was built from spectra alone, so there is no adapter to "
                       "compress.\n  Fix: build it from the model: RankExplorer(model)")
            return None
        try:
            result = compress_adapter(self.model, self.slider.value, self.adapter, new_name)
        except LoraLabError as exc:
            self._show(str(exc))
            return None
        self.compression = result
        self._show("")
        self.report.value = (
            f"<div><b>{html.escape(repr(result))}</b><br><small>The new adapter is not active: "
            f"<code>ll.set_adapter(model, {result.adapter!r})</code> to use it, "
            f"<code>ll.save_adapter(model, 'out/{result.adapter}', "
            f"adapter={result.adapter!r})</code> to save it.</small></div>")
        return result

    # ------------------------------------------------------------------ take-away
    @property
    def result(self) -> RankChoice:
        """The current cut as a :class:`RankChoice` (built on demand, not on every slider move)."""
        k = self.slider.value
        t = self._table[["name", "layer", "module_type", "r"]].assign(
            energy_kept=self.cut.energy_at(k), rel_error=self.cut.error_at(k))
        comp = self.compression if self.compression is not None and self.compression.rank == k \
            else None
        errors = self.cut.error_at(k)
        return RankChoice(self.adapter, k, self.cut.total_energy_at(k),
                          float(np.median(errors)), float(errors.max()),
                          self.cut.parameters_at(k), self._full_params, t, comp)

    def code(self) -> str:
        """Plain Python that reproduces the current view and its compression, without widgets."""
        k, a = self.slider.value, self.adapter
        lines = ["import lora_lab as ll", "",
                 "# model: the model carrying the adapter (ll.attach or ll.load_adapter)",
                 f"spectra = ll.adapter_spectra(model, adapter={a!r})",
                 "print(spectra.table)                      # effective rank, k90, k99 per module",
                 f"print(spectra.energy_at({k}).describe())   # energy kept per module at rank {k}",
                 f"print(spectra.error_at({k}).max(), spectra.parameters_at({k}))"]
        if self.comparison is not None:
            lines.append("comparison = ll.compare_adapters(model, other_model)  # φ per module")
        done = self.compression is not None and self.compression.rank == k
        name = self.compression.adapter if done else f"{a}_r{k}"
        prefix = "" if done else "# "
        lines += [f"{prefix}compression = ll.compress_adapter(model, {k}, adapter={a!r}, "
                  f"new_name={name!r})",
                  f"{prefix}ll.save_adapter(model, {('out/' + name)!r}, adapter={name!r})", ""]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"RankExplorer({self.adapter!r}, {len(self.cut.names)} modules, rank {self.rank}: "
                f"keeps {self.energy_kept:.1%}, median ΔW error {self.relative_error:.3g}, "
                f"{self.parameters:,} parameters)")
