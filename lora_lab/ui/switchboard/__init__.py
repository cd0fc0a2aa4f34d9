"""``AdapterSwitchboard``: one base model, many adapters, switched in real time.

::

    sb = AdapterSwitchboard(model, tok)          # a base model, or a peft model with adapters
    sb.load("runs/reverse/adapter")              # or type the folder and press "load"
    display(sb)
    sb.model                                     # the peft model the switchboard manages

Switching re-routes adapters that are already loaded (:func:`lora_lab.set_adapter`): each LoRA
layer adds a different ``s·B_k A_k x`` to ``W x``; nothing is read from disk or merged, and the
widget shows how long it took.  "(base)" disables the adapter layers: exactly ``y = W x``.

Tabs: **generate** (streamed into the widget; max new tokens, greedy, temperature, top-p, Stop),
**side by side** (one prompt through the base and the chosen adapters, in columns, with tokens/s),
**merge / delete** (in place on a full-precision base, reversibly; on a quantized base a merged
full-precision *copy* via :func:`lora_lab.merged_copy`, because on CPUs with AVX512-BF16
bitsandbytes repacks 4-bit weights on their first eval forward and peft's merge misreads the packed
layout, silently) and **blend** (weights across adapters
and a combination type through :func:`lora_lab.blend_adapters`, whose self-check and known-bug
refusals are shown inline).

Every action is also a method (``load``, ``activate``, ``generate``, ``compare``, ``merge``,
``unmerge``, ``delete``, ``blend``, ``stop``) that raises :class:`~lora_lab.LoraLabError` on bad
input; the buttons call them and show the message instead (``sb.error``), never a traceback.

**Stop while generating.**  In a Jupyter kernel a button click is a message the kernel handles only
when it is idle (ipywidgets #3468), so the switchboard generates on a worker thread there
(``background=None`` picks this automatically; the Generate click returns at once) and Stop sets a
flag that generation checks after every token.  Outside a kernel (scripts, pytest) generation runs
on the calling thread; Stop still works from ``on_token`` hooks or observers.  While a generation
runs, the other actions are refused with a message, so the model never changes under it.

The board (:mod:`.board`) holds the table, load and switch, and one widget per tab
(:mod:`.generate_tab`, :mod:`.compare_tab`, :mod:`.merge_tab`, :mod:`.blend_tab`); a tab knows the
board only as the small :class:`~lora_lab.ui.switchboard.host.Host` Protocol.  The math (switching,
the merge check, blending, generation) lives in :mod:`lora_lab.hf`.
"""

from .blend_tab import BLEND_COMBINATIONS
from .board import AdapterSwitchboard
from .host import BASE

__all__ = ["BASE", "BLEND_COMBINATIONS", "AdapterSwitchboard"]
