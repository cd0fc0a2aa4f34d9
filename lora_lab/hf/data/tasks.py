"""Builtin tasks: small string problems whose success anyone can see, for ``builtin:tiny``
(and ``"capitals"``, a reply format for the real model ``builtin:smollm2``: :mod:`.chat_tasks`).

Every example is a ``(prompt, response)`` pair of short strings (the builtin tokenizer is character
level).  Two families share one generator table:

* **Pretraining skills** (``builtin:tiny`` was trained on these, see ``scripts/pretrain_builtin.py``):
  ``add`` (``"12+34" -> "46"``), ``copy`` (``"copy HeLlo" -> "HeLlo"``), ``len`` (``"len abcd" -> "4"``),
  ``count`` (``"count 3 6" -> "3 4 5 6"``), ``first``/``last`` (``"first abc" -> "a"``) and ``max``
  (``"max 12 45" -> "45"``).  ``builtin_task("pretrain-eval")`` is a held-out mix of them, so you can
  measure how much a fine-tune *forgets*.
* **Fine-tuning tasks** (never seen in pretraining), easiest first, see :func:`builtin_tasks`:

  - ``next``: ``next 41`` → ``42``, a new instruction over a known skill (counting);
  - ``wrap``: ``wrap abc`` → ``[abc]``, a new answer format around copying;
  - ``upper``: ``upper abc`` → ``ABC``, a new character mapping on top of copying;
  - ``subtract``: ``57-3`` → ``54``, new arithmetic (it learned addition);
  - ``reverse``: ``reverse abcd`` → ``dcba``, a new attention pattern (copying runs forwards);
  - ``sort``: ``sort dbca`` → ``abcd``, letters in alphabetical order, a new algorithm.

  Measured on ``builtin:tiny`` (``benchmarks/builtin_tasks.py``): the base model scores 0-1% on
  each; LoRA r=8 on all linear layers, 300 steps of 16 rows at lr 3e-3, reaches 100% on ``next``,
  ``wrap`` and ``upper``; ``subtract`` climbs with rank (r=1: 13%, r=8: 63%, r=32: 86%); ``reverse``
  and ``sort`` need more rank and steps than that.

Held-out split: a prompt belongs to the ``"test"`` split when ``crc32(prompt) % 5 == 0`` and to the
``"train"`` split otherwise, so train and test prompts never overlap whatever the seeds.
Pretraining used only ``"train"`` prompts.
"""

from __future__ import annotations

import random
import string
import zlib
from typing import Callable

from ...errors import DataError
from .chat_tasks import CHAT_TASKS, capitals_examples

__all__ = ["builtin_tasks", "builtin_task", "pretraining_skills", "sample_examples"]

LOWER = string.ascii_lowercase
Example = tuple[str, str]


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LOWER) for _ in range(rng.randint(lo, hi)))


def _mixed_case(rng: random.Random) -> str:
    w = _word(rng)
    style = rng.random()
    if style < 0.4:
        return w
    if style < 0.6:
        return w.capitalize()
    if style < 0.7:
        return w.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in w)


# ---- pretraining skills -------------------------------------------------------------------------

def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}", str(a + b)


def _copy(rng):
    w = _mixed_case(rng)
    return f"copy {w}", w


def _len(rng):
    w = _word(rng, 1, 9)
    return f"len {w}", str(len(w))


def _count(rng):
    a = rng.randint(0, 20)
    b = a + rng.randint(1, 5)
    return f"count {a} {b}", " ".join(str(i) for i in range(a, b + 1))


def _first(rng):
    w = _mixed_case(rng)
    return f"first {w}", w[0]


def _last(rng):
    w = _mixed_case(rng)
    return f"last {w}", w[-1]


def _max(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"max {a} {b}", str(max(a, b))


# ---- fine-tuning tasks (not in pretraining) -----------------------------------------------------

def _upper(rng):
    w = _word(rng)
    return f"upper {w}", w.upper()


def _wrap(rng):
    w = _word(rng)
    return f"wrap {w}", f"[{w}]"


def _next(rng):
    a = rng.randint(0, 98)
    return f"next {a}", str(a + 1)


def _subtract(rng):
    a = rng.randint(10, 99)
    b = rng.randint(1, 9)
    return f"{a}-{b}", str(a - b)


def _reverse(rng):
    w = _word(rng, 3, 5)
    while w == w[::-1]:
        w = _word(rng, 3, 5)
    return f"reverse {w}", w[::-1]


def _sort(rng):
    w = "".join(rng.sample(LOWER, rng.randint(3, 5)))
    while w == "".join(sorted(w)):
        w = "".join(rng.sample(LOWER, len(w)))
    return f"sort {w}", "".join(sorted(w))


PRETRAIN: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "copy": _copy, "len": _len, "count": _count,
    "first": _first, "last": _last, "max": _max,
}
TASKS: dict[str, Callable[[random.Random], Example]] = {
    "next": _next, "wrap": _wrap, "upper": _upper, "subtract": _subtract, "reverse": _reverse,
    "sort": _sort,
}


def _mixed(rng: random.Random) -> Example:
    return PRETRAIN[rng.choice(list(PRETRAIN))](rng)


def in_split(prompt: str, split: str) -> bool:
    """``True`` when ``prompt`` belongs to ``split`` (``"train"`` or ``"test"``), by crc32."""
    is_test = zlib.crc32(prompt.encode()) % 5 == 0
    return is_test if split == "test" else not is_test


def pretraining_skills() -> list[str]:
    """The skills ``builtin:tiny`` was pretrained on (each is also a task name)."""
    return list(PRETRAIN)


def builtin_tasks() -> list[str]:
    """The fine-tuning task names for ``builtin:tiny``, easiest first (none of them was in its
    pretraining).  The real chat model ``builtin:smollm2`` has its own task, ``"capitals"`` (see
    :mod:`lora_lab.hf.data.chat_tasks`), which :func:`builtin_task` also accepts."""
    return list(TASKS)


def sample_examples(name: str, n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """``n`` ``(prompt, response)`` pairs of task ``name`` from ``split``, reproducible from ``seed``."""
    gens = {**TASKS, **PRETRAIN, "pretrain-eval": _mixed}
    if name not in gens and name not in CHAT_TASKS:
        raise DataError(f"There is no builtin task called {name!r}.",
                        f"use one of {builtin_tasks()}, 'pretrain-eval', a pretraining skill "
                        f"{pretraining_skills()}, or {list(CHAT_TASKS)} for builtin:smollm2")
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} is not a split of the builtin tasks.",
                        "pass split='train' or split='test'")
    if not isinstance(n, int) or n < 1:
        raise DataError(f"n={n!r} examples were asked for.", "pass a positive integer, e.g. n=1000")
    if name == "capitals":
        return capitals_examples(n, seed, split)
    rng = random.Random(f"{name}/{split}/{seed}")
    out: list[Example] = []
    while len(out) < n:
        ex = gens[name](rng)
        if in_split(ex[0], split):
            out.append(ex)
    return out


def builtin_task(name: str, n: int = 1000, seed: int = 0, *, split: str = "train"):
    """A ``datasets.Dataset`` with ``prompt`` and ``response`` columns for builtin task ``name``.

    ``name`` is one of :func:`builtin_tasks` (fine-tuning tasks), ``"pretrain-eval"`` (a held-out mix
    of the pretraining skills, to measure forgetting) or a single pretraining skill.  ``split="test"``
    gives prompts that never occur in the ``"train"`` split::

        train = builtin_task("reverse", n=2000)
        test = builtin_task("reverse", n=200, split="test")
    """
    from datasets import Dataset

    rows = sample_examples(name, n, seed, split)
    return Dataset.from_dict({"prompt": [p for p, _ in rows], "response": [r for _, r in rows]})
