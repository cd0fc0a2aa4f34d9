"""The adapter table as HTML that fits the widget's width, at Colab's ~800 px output width too.

A plain ``DataFrame.to_html`` is as wide as its longest cell: a temporary folder such as
``/tmp/tmp2tqnn7bp/alpha`` and a target list of seven module names pushed the columns past the
widget's edge, where the output area cut them off.  Here:

* long cells (``targets``, ``source``) are shortened to one line with an ellipsis, and the full
  text is in the cell's ``title`` (shown on hover, read by screen readers);
* a source path keeps its end, the part that tells adapters apart (``…/runs/alpha``);
* the table scrolls inside the widget when it is still wider than the output (``overflow-x:
  auto`` on a box that is never wider than the widget), so nothing is ever cut off.  Checked in
  Chromium at 1280 px and at Colab's ~800 px by tests/browser/test_browser_look.py.

Colours are left to the front end's theme (no fixed text colour), so the table reads in light and
dark themes alike.
"""

from __future__ import annotations

import html
from pathlib import PurePath

import pandas as pd

__all__ = ["table_html", "short_path"]

_CELL = "padding:1px 8px;text-align:left;white-space:nowrap"
_CLIP = "display:block;max-width:{em}em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap"
_CLIPPED = {"targets": 14, "source": 12}      # column -> widest it may be (em)


def short_path(path: str, keep: int = 2) -> str:
    """The last ``keep`` parts of ``path`` after an ellipsis (``…/runs/alpha``); short paths as
    they are."""
    parts = PurePath(path).parts
    return path if len(parts) <= keep + 1 else "…/" + "/".join(parts[-keep:])


def _cell(col: str, value) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    if col == "targets":
        text = text.replace(",", ", ")
    if col not in _CLIPPED or not text:
        return f"<td style='{_CELL}'>{html.escape(text)}</td>"
    shown = short_path(text) if col == "source" else text
    return (f"<td style='{_CELL}'><span title='{html.escape(text, quote=True)}' "
            f"style='{_CLIP.format(em=_CLIPPED[col])}'>{html.escape(shown)}</span></td>")


def table_html(df: pd.DataFrame) -> str:
    """``df`` (the switchboard's ``adapters``) as a table that fits its widget (module docstring)."""
    head = "".join(f"<th style='{_CELL};border-bottom:1px solid'>{html.escape(str(c))}</th>"
                   for c in df.columns)
    rows = "".join("<tr>" + "".join(_cell(c, v) for c, v in zip(df.columns, row)) + "</tr>"
                   for row in df.itertuples(index=False))
    # width 0 + min-width 100%: the box takes the widget's width and never asks for more (its
    # table's width does not count toward the widget's), so a wide table scrolls inside it
    return ("<div class='ll-table' style='width:0;min-width:100%;overflow-x:auto'>"
            "<table style='border-collapse:collapse;font-size:var(--jp-ui-font-size1,13px)'>"
            f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")
