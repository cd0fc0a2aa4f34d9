"""Errors that lora_lab raises on purpose.

Every error names the problem and the fix.  A user should never see a deep stack trace from inside
peft or transformers for a mistake lora_lab can recognise; instead they get one of these::

    LoraLabError: AdapterSpec.r = 0 is out of range: r must be an integer >= 1.
      Fix: pass r=8 (a good default) or any positive integer.

All subclasses derive from :class:`LoraLabError`; the ones about bad values also derive from
``ValueError`` so that generic code which catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "LoraLabError",
    "SpecError",
    "ModelLoadError",
    "TargetModuleError",
    "AdapterError",
    "AdapterMismatchError",
    "BlendError",
    "MergeError",
    "DataError",
    "TrainingError",
]


class LoraLabError(Exception):
    """Base class: ``problem`` says what is wrong, ``fix`` says what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  Fix: {fix}")


class SpecError(LoraLabError, ValueError):
    """A spec field has a value outside its allowed range."""

    def __init__(self, spec: str, field: str, value, allowed: str, fix: str | None = None):
        self.spec, self.field, self.value = spec, field, value
        super().__init__(f"{spec}.{field} = {value!r} is invalid: {allowed}.", fix)


class ModelLoadError(LoraLabError):
    """A model could not be found or loaded."""


class TargetModuleError(LoraLabError, ValueError):
    """The adapter names modules, layers or a rank that the model does not have."""


class AdapterError(LoraLabError):
    """An adapter operation (add, switch, delete, save, load) could not be done."""


class AdapterMismatchError(AdapterError, ValueError):
    """A saved adapter does not fit the base model it is loaded onto."""


class BlendError(AdapterError):
    """A weighted combination of adapters was refused or failed its self-check."""


class MergeError(AdapterError):
    """Merging an adapter into the base weights was refused or produced wrong outputs."""


class DataError(LoraLabError, ValueError):
    """A dataset is missing columns, is empty, or was truncated away."""


class TrainingError(LoraLabError):
    """Training stopped on something that needs the user's attention (NaN loss, bad data)."""
