"""The serving figure draws the throughput records it is given, and only them."""

from __future__ import annotations

import pandas as pd
import pytest

from lora_lab.viz.serving import throughput_figure


def _records(label, single, steps, base):
    """Records as mixed_throughput returns them: ``steps`` maps K to ms per step (16 rows)."""
    out = [{"way": "single", "adapters": 1, "ms_per_step": steps[1], "label": label}]
    out += [{"way": "mixed", "adapters": k, "ms_per_step": s, "label": label} for k, s in steps.items()]
    out.append({"way": "base", "adapters": 0, "ms_per_step": base, "label": label})
    for r in out:
        r.update(rows=16, tokens_per_s=16e3 / r["ms_per_step"], vs_single=single / r["ms_per_step"])
    return out


TINY = _records("builtin:tiny", 10.0, {1: 10.0, 2: 10.5, 4: 11.0, 8: 12.5, 16: 16.0}, 8.0)
SMOL = _records("builtin:smollm2", 400.0, {1: 400.0, 2: 404.0, 4: 410.0, 8: 430.0, 16: 470.0}, 380.0)


def test_each_label_gets_its_tokens_per_s_its_base_line_and_its_ratio():
    fig = throughput_figure(TINY + SMOL, target=0.75)
    names = [tr.name for tr in fig.data]
    assert names == ["builtin:tiny", "builtin:tiny base", "builtin:tiny vs one adapter",
                     "builtin:smollm2", "builtin:smollm2 base", "builtin:smollm2 vs one adapter", "target"]
    by = {tr.name: tr for tr in fig.data}
    for label, recs in (("builtin:tiny", TINY), ("builtin:smollm2", SMOL)):
        mixed = [r for r in recs if r["way"] == "mixed"]
        assert list(by[label].x) == [1, 2, 4, 8, 16]
        assert list(by[label].y) == pytest.approx([r["tokens_per_s"] for r in mixed])
        assert list(by[f"{label} vs one adapter"].y) == pytest.approx([r["vs_single"] for r in mixed])
        base = next(r["tokens_per_s"] for r in recs if r["way"] == "base")
        assert list(by[f"{label} base"].y) == pytest.approx([base, base])
        line = by[f"{label} base"].line
        assert line.dash == "dot" and line.color == by[label].line.color
    assert list(by["target"].y) == [0.75, 0.75] and by["target"].xaxis == "x2"
    # tokens/s of the two models differ 40x: a log axis; K on log2 ticks
    assert fig.layout.yaxis.type == "log" and list(fig.layout.xaxis.tickvals) == [1, 2, 4, 8, 16]


def test_one_model_from_a_dataframe_on_a_linear_axis_without_target():
    fig = throughput_figure(pd.DataFrame(TINY), target=None, title="t")
    assert [tr.name for tr in fig.data][-1] == "builtin:tiny vs one adapter"
    assert fig.layout.yaxis.type == "linear" and fig.layout.title.text == "t"
    with pytest.raises(ValueError, match="at least one record"):
        throughput_figure([])
