"""The switchboard's adapter table: long cells shortened to one line, the full text on hover.

Read back with the standard library's HTML parser (an oracle outside lora_lab), not by string
matching: every cell's visible text and ``title`` attribute.
"""

from __future__ import annotations

from html.parser import HTMLParser

import pandas as pd

from lora_lab.ui.switchboard.table import short_path, table_html


class Cells(HTMLParser):
    """(visible text, title or None) of each ``<td>``; the styles of the ``div``s."""

    def __init__(self):
        super().__init__()
        self.cells, self.divs, self._td, self._title = [], [], False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td":
            self._td, self._title, self._text = True, None, ""
        elif tag == "span" and self._td:
            self._title = a.get("title")
        elif tag == "div":
            self.divs.append(a.get("style", ""))

    def handle_data(self, data):
        if self._td:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append((self._text, self._title))
            self._td = False


def test_long_paths_and_target_lists_are_shortened_with_the_full_text_on_hover():
    path = "/tmp/tmp2tqnn7bp/some/deep/folder/runs/<alpha>"
    targets = "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    df = pd.DataFrame([{"name": "a&b", "r": 4, "targets": targets, "source": path, "active": True}])
    parsed = Cells()
    parsed.feed(table_html(df))
    cells = dict(zip(df.columns, parsed.cells))
    assert cells["name"] == ("a&b", None) and cells["r"] == ("4", None)   # escaped, read back
    assert cells["source"] == ("…/runs/<alpha>", path)                    # the end, and all of it
    spaced = targets.replace(",", ", ")
    assert cells["targets"] == (spaced, spaced)                            # the full list on hover
    assert any("overflow-x:auto" in s and "min-width:100%" in s for s in parsed.divs)


def test_short_path_keeps_short_paths():
    assert short_path("alpha") == "alpha" and short_path("runs/alpha") == "runs/alpha"
    assert short_path("/a/b/c/d") == "…/c/d"
