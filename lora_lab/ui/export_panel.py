"""``ExportPanel``: a folder box and an Export button, shared by the designer and the dashboard.

::

    panel = ExportPanel(designer.export_choice)      # any callable returning export_script's arguments
    panel.export()                                   # or press Export; panel.exported is the result

It writes :func:`lora_lab.export.script.export_script` (a standalone ``train.py`` with accelerate
configs and a README) and shows the files and the commands to run, or the
:class:`~lora_lab.LoraLabError` with its fix, inline: never a traceback.
"""

from __future__ import annotations

import html
from typing import Callable

import ipywidgets as widgets

from ..errors import LoraLabError
from .figure import ERROR_DIV

__all__ = ["ExportPanel"]

_W = {"description_width": "110px"}


class ExportPanel(widgets.VBox):
    """A folder box and an Export button: writes :func:`~lora_lab.export.script.export_script`
    for ``choice()`` (a dict of its arguments) and shows the files and the commands, or the
    :class:`~lora_lab.LoraLabError` with its fix, inline.  ``exported`` is the last result."""

    def __init__(self, choice: Callable[[], dict], folder: str = "export"):
        self.choice = choice
        self.exported = None
        self.folder = widgets.Text(value=folder, description="export to", style=_W)
        self.button = widgets.Button(description="Export", icon="download",
                                     tooltip="Write train.py, accelerate configs and a README")
        self.result = widgets.HTML()
        self.button.on_click(lambda _b: self.export())
        super().__init__([widgets.HBox([self.folder, self.button]), self.result])

    def export(self):
        """Write the export now; return the ExportedScript (None after an error)."""
        from ..export.script import export_script

        try:
            self.exported = export_script(**self.choice(), path=self.folder.value)
        except LoraLabError as exc:
            self.exported = None
            self.result.value = (ERROR_DIV + "⚠ "
                                 + html.escape(str(exc), quote=False) + "</div>")
            return None
        self.result.value = self.exported._repr_html_()
        return self.exported
