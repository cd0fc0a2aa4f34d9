"""The **blend** tab: a weight per adapter and a combination type, through
:func:`lora_lab.blend_adapters`.

With ``"cat"`` the blend is exactly ΔW = Σ w_k·ΔW_k (the factors stacked, rank Σ r_k); the other
combinations are peft's.  ``blend_adapters`` first runs a self-check (one adapter blended alone at
weight 1.0 must come back unchanged) and refuses inputs peft is known to get wrong (rsLoRA, DoRA,
mixed ranks for ``"linear"``) unless "let peft try" is ticked; its refusals and a failed
self-check are shown inline.  The new adapter becomes the active one.
"""

from __future__ import annotations

import ipywidgets as widgets

from ...errors import AdapterError
from ...hf.adapters.blend import blend_adapters
from ...hf.adapters.switch import switch_adapter
from .host import Host
from .style import STYLE, button, slider

__all__ = ["BLEND_COMBINATIONS", "BlendTab"]

BLEND_COMBINATIONS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties")


class BlendTab(widgets.VBox):
    """Weight sliders (``weights``: name → slider), ``combination``, ``density`` (ties and dare),
    the new adapter's name, and Blend; ``blend_report`` is the last report."""

    def __init__(self, host: Host):
        W, L = widgets, widgets.Layout
        self.host = host
        self.blend_report = None
        self.weights: dict[str, widgets.FloatSlider] = {}
        self.weight_box = W.VBox()
        self.combination = W.Dropdown(options=BLEND_COMBINATIONS, value="cat",
                                      description="combination", style=STYLE)
        self.density = slider(W.FloatSlider, 0.5, 0.05, 1.0, "density (ties/dare)")
        self.blend_name = W.Text(value="blend", description="new name", style=STYLE)
        self.allow_known_bugs = W.Checkbox(value=False, layout=L(width="auto"), description=(
            "let peft try known-bad inputs (rsLoRA, DoRA); the self-check still runs"))
        self.blend_button = button("blend", "sliders")
        self.blend_button.on_click(lambda _: host.safely(self.blend))
        super().__init__([self.weight_box, W.HBox([self.combination, self.density]),
                          W.HBox([self.blend_name, self.blend_button]), self.allow_known_bugs])

    def show_names(self, names: list[str]) -> None:
        """One weight slider per adapter, keeping the weights already set."""
        old = {n: s.value for n, s in self.weights.items()}
        self.weights = {n: widgets.FloatSlider(value=old.get(n, 0.0), min=-1.0, max=2.0,
                                               step=0.05, description=n, style=STYLE) for n in names}
        self.weight_box.children = list(self.weights.values())

    def blend(self, weights: dict | None = None, combination: str | None = None,
              name: str | None = None):
        """Create a blended adapter from the weight sliders (or ``weights``) with ``combination``,
        run :func:`lora_lab.blend_adapters`' checks and make the blend active.  ``name`` defaults
        to the name box ("blend", then "blend2", ...)."""
        host = self.host
        host.guard()
        weights = weights if weights is not None else {
            n: s.value for n, s in self.weights.items() if s.value != 0}
        combination = combination or self.combination.value
        if not weights:
            raise AdapterError("Every blend weight is 0.", "move at least one weight slider")
        name = (name or self.blend_name.value).strip() or "blend"
        host.unmerge_first()
        density = self.density.value if combination.startswith(("ties", "dare")) else None
        rep = blend_adapters(host.model, dict(weights), name=name, combination=combination,
                             density=density, refuse_known_bugs=not self.allow_known_bugs.value)
        self.blend_report = rep
        host.blends[name] = (dict(weights), combination, density)
        switch_adapter(host.model, name)
        k = 2
        while f"blend{k}" in host.names():
            k += 1
        self.blend_name.value = f"blend{k}"
        host.refresh()
        host.say(f"blended {rep!r}; {name!r} is active")
        return rep
