"""One self-contained HTML file of a run: specs, training curves, spectra, quantization, memory.

The page carries plotly.js once, inline in its ``<head>`` (about 4.7 MB), and every figure after
it is a ``<div>`` plus a ``Plotly.newPlot`` call, so the file opens with no network: mail it, put
it on a USB stick, open it in a workshop with no Wi-Fi.  Sections appear only for what was given::

    ll.report("run.html", result=result, spec=[adapter_spec, train_spec],
              spectra=ll.adapter_spectra(model), quant=scan, memory=ll.estimate_memory(model))

:func:`page` is the one builder of these pages; the ``lora-lab`` command's ``--html`` reports use it
too (through :func:`html_page`).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..errors import LoraLabError

__all__ = ["html_page", "page", "report", "report_html"]

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
          "th,td{border:1px solid #ddd;padding:2px 8px;text-align:right}"
          "th:first-child,td:first-child{text-align:left}"
          "pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}")


def _block(item) -> str:
    """HTML of one block: a plotly figure, a DataFrame, a preformatted string or ``("html", s)``."""
    if hasattr(item, "to_html") and hasattr(item, "layout"):                 # a plotly figure
        return item.to_html(full_html=False, include_plotlyjs=False)
    if isinstance(item, pd.DataFrame):
        return item.to_html(index=not isinstance(item.index, pd.RangeIndex), float_format="%.4g")
    if isinstance(item, tuple) and item[:1] == ("html",):
        return item[1]
    return f"<pre>{html.escape(str(item))}</pre>"


def page(title: str, sections: Iterable[tuple[str, str, Sequence]]) -> str:
    """A complete HTML page: ``sections`` are ``(id, heading, blocks)`` (see :func:`_block`).

    plotly.js is inlined once in the head, so the page needs no network to show its figures.
    """
    from plotly.offline import get_plotlyjs

    body = [f"<h1>{html.escape(title)}</h1>"]
    for sid, heading, blocks in sections:
        head = f"<h2>{html.escape(heading)}</h2>" if heading else ""
        body.append(f"<section id='{html.escape(sid)}'>{head}"
                    + "\n".join(_block(b) for b in blocks) + "</section>")
    return "\n".join(["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
                      f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>",
                      f"<script type='text/javascript'>{get_plotlyjs()}</script>", "</head><body>",
                      *body, "</body></html>"])


def html_page(title: str, summary: str, figures, table_heading: str, table) -> str:
    """A summary, figures, then one table: the ``lora-lab spectrum/scan --html`` page."""
    return page(title, [("summary", "", [summary, *figures]), ("table", table_heading, [table])])


# ----------------------------------------------------------------------------- sections
def _fields(spec) -> pd.DataFrame:
    values = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
    return pd.DataFrame({"field": list(values), "value": [repr(v) for v in values.values()]})


def _specs(spec, result) -> list:
    if spec is None:
        specs = {}
    elif isinstance(spec, Mapping):
        specs = dict(spec)
    elif isinstance(spec, (list, tuple)):
        specs = {type(s).__name__: s for s in spec}
    else:
        specs = {type(spec).__name__: spec}
    train_spec = getattr(result, "spec", None)
    if train_spec is not None and not any(s is train_spec for s in specs.values()):
        specs.setdefault(type(train_spec).__name__, train_spec)
    blocks = []
    for name, s in specs.items():
        if not (dataclasses.is_dataclass(s) or isinstance(s, Mapping)):
            raise LoraLabError(f"report got spec {name}={s!r}, which is not a spec.",
                               "pass an AdapterSpec/TrainSpec/QuantSpec/DataSpec, a list of them, "
                               "or a dict of name → spec")
        blocks += [("html", f"<h3>{html.escape(str(name))}</h3>"), _fields(s)]
    return blocks


def _training(result) -> list:
    from .training import training_figure

    if not hasattr(result, "history") or not hasattr(result, "final"):
        raise LoraLabError(f"report got result of type {type(result).__name__}.",
                           "pass the TrainResult that lora_lab.train returned")
    final = pd.DataFrame({"metric": [*result.final, "stop_reason", "steps", "adapter_path"],
                          "value": [*(f"{v:.4g}" if isinstance(v, float) else str(v)
                                      for v in result.final.values()), result.stop_reason,
                                    f"{result.steps} / {result.max_steps}",
                                    str(result.adapter_path)]})
    return [repr(result), training_figure({"run": result.history}), final]


def _spectra(spectra) -> list:
    from .spectrum import spectrum_figure, spectrum_heatmap

    if not hasattr(spectra, "spectra") or not hasattr(spectra, "table"):
        raise LoraLabError(f"report got spectra of type {type(spectra).__name__}.",
                           "pass lora_lab.adapter_spectra(model)")
    if not len(spectra):
        return [repr(spectra)]
    t = spectra.table
    r = int(t["r"].max())
    top = t.loc[t["top_sigma"].idxmax(), "name"]
    return [repr(spectra), spectrum_heatmap(spectra, "effective_rank"),
            spectrum_figure(spectra[top], k=max(1, r // 2)), t]


def _quant(quant) -> list:
    from .quant import error_heatmap, scheme_bars

    if not hasattr(quant, "summary") or not hasattr(quant, "schemes"):
        raise LoraLabError(f"report got quant of type {type(quant).__name__}.",
                           "pass lora_lab.scan_quantization(model_or_checkpoint)")
    if quant.table.empty:
        return [repr(quant)]
    layers = quant.table.to_html(index=False, float_format="%.4g")
    note = getattr(quant, "note", "")
    return [repr(quant).splitlines()[0],
            *([("html", f"<p><b>Note:</b> {html.escape(note)}</p>")] if note else []),
            error_heatmap(quant), scheme_bars(quant), quant.summary,
            ("html", (f"<details><summary>every layer ({len(quant.table)} rows)</summary>"
                      f"{layers}</details>"))]


def _memory(memory) -> list:
    from .memory import memory_figure

    if not hasattr(memory, "scenarios") or not hasattr(memory, "table"):
        raise LoraLabError(f"report got memory of type {type(memory).__name__}.",
                           "pass lora_lab.estimate_memory(model, spec)")
    return [repr(memory), memory_figure(memory), memory.table()]


def report_html(*, result=None, spec=None, spectra=None, quant=None, memory=None,
                summary: Mapping | None = None, title: str = "lora_lab run") -> str:
    """The HTML text of :func:`report` (same arguments, no file)."""
    if all(x is None for x in (result, spec, spectra, quant, memory, summary)):
        raise LoraLabError("report got nothing to report.",
                           "pass at least one of result=, spec=, spectra=, quant=, memory=")
    sections = []
    if summary:
        sections.append(("summary", "Summary", [pd.DataFrame(
            {"": list(summary), "value": [str(v) for v in summary.values()]})]))
    parts = (("specs", "Specs", spec is not None or result is not None, lambda: _specs(spec, result)),
             ("training", "Training", result is not None, lambda: _training(result)),
             ("spectra", "ΔW spectra", spectra is not None, lambda: _spectra(spectra)),
             ("quantization", "Quantization error", quant is not None, lambda: _quant(quant)),
             ("memory", "Memory estimate", memory is not None, lambda: _memory(memory)))
    for sid, heading, given, blocks in parts:
        if given:
            made = blocks()
            if made:
                sections.append((sid, heading, made))
    return page(title, sections)


def report(path, *, result=None, spec=None, spectra=None, quant=None, memory=None,
           summary: Mapping | None = None, title: str = "lora_lab run") -> Path:
    """Write one self-contained HTML report of a run to ``path``; return the path.

    ``result``: a :class:`~lora_lab.TrainResult` (its history becomes the training curves, its
    ``final`` a table, its TrainSpec joins the specs).  ``spec``: a spec, a list of specs or a dict
    name → spec, shown field by field.  ``spectra``: :func:`lora_lab.adapter_spectra` (heatmap of
    effective rank, the largest update's spectrum, the per-module table).  ``quant``: a
    :class:`~lora_lab.QuantScan` (its note, error heatmap, scheme bars, the summary and every
    layer in model order).
    ``memory``: a :class:`~lora_lab.MemoryEstimate` (stacked bars and the term table).  ``summary``:
    extra label → value lines shown first (accuracy before/after, say).  plotly.js is embedded
    once, so the file opens with no network.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise LoraLabError(f"report path {path} is a folder.", "pass a file name such as report.html")
    text = report_html(result=result, spec=spec, spectra=spectra, quant=quant, memory=memory,
                       summary=summary, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
