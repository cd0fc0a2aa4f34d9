"""ipywidgets views over specs and results: thin, no math.

``TrainingDashboard`` (live training), ``AdapterDesigner`` (choose an adapter, see its cost and
memory), ``RankExplorer`` (cut ranks across layers), ``QuantExplorer`` (quantization error per
layer and scheme), ``AdapterSwitchboard`` (many adapters on one base).  Imported lazily so that ``import lora_lab`` does not pull in ipywidgets and plotly.
"""

import importlib

_LAZY = {"TrainingDashboard": "dashboard", "AdapterDesigner": "designer",
         "RankExplorer": "rank_explorer", "RankChoice": "rank_explorer",
         "AdapterSwitchboard": "switchboard", "QuantExplorer": "quant_explorer",
         "ExportPanel": "export_panel"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_lab.ui' has no attribute {name!r}")
