"""The **merge / delete** tab.

On a full-precision base, merge folds the active adapter into the weights in place, reversibly
(W ← W + s·B·A, then unmerge: W ← W − s·B·A), checked by
:func:`lora_lab.hf.adapters.merge.merge_checked`: the logits on one probe sequence before and after.
Unmerge reports how close the logits came back (:func:`~lora_lab.hf.adapters.merge.logit_gap`).
On a quantized base merging in place is never done (on CPUs with AVX512-BF16, bitsandbytes repacks
4-bit weights on their first eval forward and peft's merge misreads the packed layout, silently: the
logits end about 127% off): the tab makes a merged full-precision *copy* instead
(:func:`lora_lab.merged_copy`), kept in ``merged_model``.  Delete removes an adapter for good.
"""

from __future__ import annotations

import html

import ipywidgets as widgets

from ...errors import AdapterError
from ...hf.adapters.merge import (
    MergeReport,
    logit_gap,
    make_probe_ids,
    merge_checked,
    merged_copy,
    probe_logits,
    unmerge_adapter,
)
from ...hf.adapters.registry import delete_adapter
from ...hf.adapters.switch import active_adapter, merged_adapters, switch_adapter
from ...hf.model.inspect import is_quantized
from .host import Host
from .style import button

__all__ = ["MergeTab"]


class MergeTab(widgets.VBox):
    """Merge, unmerge and delete buttons; ``merge_report`` (:class:`MergeReport`) and
    ``merged_model`` (the full-precision merged copy of a quantized base) are the results."""

    def __init__(self, host: Host):
        self.host = host
        self.merge_report: MergeReport | None = None
        self.merged_model = None
        # one probe sequence (1 × 16 ids) and its logits before an in-place merge: the unmerge is
        # checked against them
        self.probe_ids = self.pre_merge = None
        self.merge_label = widgets.HTML()
        self.merge_button, self.unmerge_button = button("merge active", "compress"), \
            button("unmerge", "expand")
        self.delete_button = button("delete active", "trash")
        for b, action in ((self.merge_button, self.merge), (self.unmerge_button, self.unmerge),
                          (self.delete_button, self.delete)):
            b.on_click(lambda _, action=action: host.safely(action))
        super().__init__([widgets.HBox([self.merge_button, self.unmerge_button,
                                        self.delete_button]), self.merge_label])

    def unmerge_first(self) -> str:
        """Undo an in-place merge (before the adapters change); the note to show, or ``""``."""
        model = self.host.model
        merged = merged_adapters(model)
        if not merged:
            return ""
        unmerge_adapter(model)
        self.pre_merge = None
        return f"unmerged {', '.join(merged)} first: switching runs on the unmerged weights"

    def merge(self) -> MergeReport:
        """Merge the active adapter: in place (reversibly) on a full-precision base; on a quantized
        base into a full-precision copy (``merged_model``).  Either way ``merge_report`` gives the
        logit difference between the merged and the unmerged model."""
        host = self.host
        host.guard()
        model = host.model
        name = active_adapter(model)
        if name is None:
            raise AdapterError("No adapter is active, so there is nothing to merge.",
                               "choose an adapter in 'active' first")
        if is_quantized(model):
            self.merged_model, rep = merged_copy(model, name)
            self.merge_report = rep
            self.merge_label.value = (
                f"Quantized base: <b>{html.escape(name)}</b> was merged into a full-precision copy "
                f"(<code>sb.merged_model</code>); the packed 4-bit weights were not touched.<br>"
                f"Logits of the merged copy vs the quantized model with the adapter: relative "
                f"difference <b>{rep.rel_logit_diff:.2e}</b>, max |Δ| {rep.max_abs_logit_diff:.2e} "
                f"(the adapter was trained on Q(W), the copy uses W).")
            host.say("")
            return rep
        if merged_adapters(model):
            raise AdapterError(f"{merged_adapters(model)} is merged already.",
                               "press unmerge first")
        self.probe_ids = make_probe_ids(model, n=1, length=16)
        rep, self.pre_merge = merge_checked(model, name, probe_ids=self.probe_ids)
        self.merge_report = rep
        self.merge_label.value = (f"merged <b>{html.escape(name)}</b> in place (W ← W + s·B·A); "
                                  f"logits vs unmerged: relative difference "
                                  f"<b>{rep.rel_logit_diff:.2e}</b>")
        host.refresh(structure=False)
        host.say("")
        return rep

    def unmerge(self) -> None:
        """Undo an in-place merge (W ← W − s·B·A) and show how close the logits came back."""
        host = self.host
        host.guard()
        model = host.model
        merged = merged_adapters(model)
        if not merged:
            extra = " (the merged copy of a quantized base is sb.merged_model)" \
                if self.merged_model is not None else ""
            raise AdapterError(f"No adapter is merged in place{extra}.", "merge one first")
        unmerge_adapter(model)
        note = ""
        if self.pre_merge is not None:
            back = logit_gap(self.pre_merge, probe_logits(model, self.probe_ids)).max_abs
            note = f"; logits back within {back:.1e} of before the merge"
        self.pre_merge = None
        self.merge_label.value = f"unmerged {html.escape(', '.join(merged))}{note}"
        host.refresh(structure=False)
        host.say("")

    def delete(self, name: str | None = None) -> None:
        """Delete adapter ``name`` (default: the active one) and switch to the base model."""
        host = self.host
        host.guard()
        name = name or active_adapter(host.model)
        if name is None:
            raise AdapterError("No adapter is active, so there is nothing to delete.",
                               "choose the adapter to delete in 'active' first")
        self.unmerge_first()
        model = host.model
        others = [n for n in host.names() if n != name]
        if others and name == active_adapter(model):
            switch_adapter(model, others[0])     # peft warns when the active one goes
        delete_adapter(model, name)
        switch_adapter(model, None)
        host.blends.pop(name, None)
        host.refresh()
        host.say(f"deleted {name!r}; now running the base model")
