"""Serve saved adapters with vLLM or SGLang: the launch command, and the request that picks one.

One base model, many adapters, one adapter per request: both engines batch requests for different
adapters together (S-LoRA, Punica) and route each row through its own B·A.  The recipe is text only:
nothing here imports torch, vllm or sglang, and the commands run on the serving machine.

vLLM (https://docs.vllm.ai/en/latest/features/lora/, "Serving LoRA Adapters")::

    vllm serve BASE --enable-lora --lora-modules name=path ... --max-lora-rank R --max-loras K

``--max-lora-rank`` must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (``vllm/config/lora.py``,
``MaxLoRARanks``; default 16) and at least every adapter's rank; ``--max-loras`` (default 1) is how
many different adapters one batch may hold.  A request names its adapter as the OpenAI ``model``.

SGLang (https://docs.sglang.io/advanced_features/lora.html, "Arguments for LoRA Serving")::

    python -m sglang.launch_server --model-path BASE --enable-lora --lora-paths name=path ...
        --max-lora-rank R --lora-target-modules q_proj ... --max-loras-per-batch K

``--max-lora-rank`` and ``--lora-target-modules`` are inferred from ``--lora-paths`` when left out;
the recipe states them, so that adapters loaded later with ``/load_lora_adapter`` fit too.  The
OpenAI-compatible API names an adapter as ``model: "BASE:name"``; the native ``/generate`` takes
``lora_path: "name"`` (per row when ``text`` is a list).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..hf.adapters.serving_check import (
    ENGINES,
    LINEAR_TARGETS,
    VOCAB_TARGETS,
    ServingCheck,
    check_serving,
    read_saved_adapter,
    vllm_max_lora_rank,
)

__all__ = ["ServingRecipe", "serving_recipe", "parse_adapters"]

PORTS = {"vllm": 8000, "sglang": 30000}


@dataclass(frozen=True)
class ServingRecipe:
    """How to serve ``adapters`` (``(name, path)`` pairs) on ``base`` with ``engine``.

    ``command``: the launch argv (``launch`` is it as one shell line); ``curl``, ``python`` and
    ``openai``: a request that names the first adapter; ``checks``: one :class:`ServingCheck` per
    adapter; ``notes``: what to know before running it.  ``ok`` is False when an adapter cannot be
    served as trained (see its check's errors)."""

    engine: str
    base: str
    adapters: tuple[tuple[str, str], ...]
    command: tuple[str, ...]
    curl: str
    python: str
    openai: str
    checks: tuple[ServingCheck, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def launch(self) -> str:
        """The launch command as a shell line (quoted with :func:`shlex.join`)."""
        return shlex.join(self.command)

    def __str__(self) -> str:
        verdict = "" if self.ok else ("\nWARNING: some adapters cannot be served as trained; "
                                      "fix the errors above first.")
        parts = ["\n\n".join(str(c) for c in self.checks), verdict,
                 f"\n# launch ({self.engine})\n{_multiline(self.command)}",
                 f"\n# request with curl\n{self.curl}", f"\n# request from Python\n{self.python}",
                 f"\n# with the openai client\n{self.openai}"]
        parts += ["\n# notes"] + [f"- {n}" for n in self.notes]
        return "\n".join(p for p in parts if p)

    def _repr_html_(self) -> str:
        from html import escape

        def code(title, text):
            return f"<p><b>{escape(title)}</b></p><pre>{escape(text)}</pre>"

        checks = "".join(c._repr_html_() for c in self.checks)
        warn = "" if self.ok else ("<p style='color:#b00020'><b>Some adapters cannot be served as "
                                   "trained: fix the errors first.</b></p>")
        notes = "".join(f"<li>{escape(n)}</li>" for n in self.notes)
        return (f"<h4>Serving with {escape(self.engine)}</h4>{checks}{warn}"
                + code("launch", _multiline(self.command)) + code("request (curl)", self.curl)
                + code("request (Python requests)", self.python)
                + code("request (openai client)", self.openai) + f"<ul>{notes}</ul>")


def parse_adapters(adapters) -> tuple[tuple[str, str], ...]:
    """``(name, absolute path)`` pairs from a path, a list of paths or ``"name=path"`` strings, or a
    ``{name: path}`` dict.  A name defaults to the folder's name; names must be unique."""
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    items = list(adapters.items()) if isinstance(adapters, dict) else [
        tuple(str(a).split("=", 1)) if "=" in str(a) and not Path(str(a)).exists()
        else (None, a) for a in adapters]
    if not items:
        raise AdapterError("No adapter was given.", "pass one or more saved adapter folders")
    pairs = []
    for name, path in items:
        path = os.path.abspath(os.fspath(path))
        name = name or Path(path).name
        if not name or any(ch.isspace() or ch in "=:'\"" for ch in name):
            raise AdapterError(f"{name!r} cannot name a served adapter (it becomes the request's "
                               "model name).", "pass a name without spaces, '=', ':' or quotes: "
                               "name=path")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise AdapterError(f"Two adapters have the same name {dup}.",
                           "name them: serving_recipe({'a': path1, 'b': path2}) or a=path1 b=path2")
    return tuple(pairs)


def serving_recipe(adapters, engine: str = "vllm", base: str | None = None, *, port: int | None = None,
                   prompt: str = "Hello", max_tokens: int = 32) -> ServingRecipe:
    """The launch command and requests that serve saved ``adapters`` on ``base`` with ``engine``.

    ``adapters``: a folder, a list of folders (named after the folders) or ``"name=path"`` strings,
    or ``{name: folder}``.  ``base``: the base model id or folder (default: the first adapter's
    ``base_model_name_or_path``).  Each adapter is checked first (:func:`check_serving`); the recipe
    is made even when a check fails, and ``recipe.ok`` says so."""
    if engine not in ENGINES:
        raise AdapterError(f"engine {engine!r} is not known.", f"pass one of {ENGINES}")
    pairs = parse_adapters(adapters)
    saved = [read_saved_adapter(p) for _, p in pairs]
    base = base or saved[0].base
    if not base:
        raise AdapterError("The adapter does not name its base model.", "pass base='org/model'")
    checks = tuple(check_serving(s, engine, base) for s in saved)
    ranks = [c.rank for c in checks if c.rank]
    port = port or PORTS[engine]
    build = _vllm if engine == "vllm" else _sglang
    command, model, notes = build(base, pairs, max(ranks, default=8), checks, port)
    bases = {s.base for s in saved if s.base and s.base != base}
    if bases:
        notes.append(f"some adapters were trained on another base ({sorted(bases)}): serve each "
                     "adapter with the base it was trained on")
    notes.append("paths are absolute on this machine: copy the folders to the server and change them")
    curl, py, oa = _requests(engine, base, model, port, prompt, max_tokens)
    return ServingRecipe(engine, base, pairs, tuple(command), curl, py, oa, checks, tuple(notes))


def _vllm(base, pairs, rank, checks, port):
    cap = vllm_max_lora_rank(rank) or 512
    cmd = ["vllm", "serve", base, "--enable-lora", "--lora-modules",
           *(f"{n}={p}" for n, p in pairs), "--max-lora-rank", str(cap),
           "--max-loras", str(len(pairs)), "--port", str(port)]
    notes = [f"--max-lora-rank {cap}: the smallest allowed value >= the largest rank ({rank}); "
             "vLLM reserves every slot at this rank",
             f"--max-loras {len(pairs)}: all adapters can share one batch; add --max-cpu-loras N "
             "to keep more adapters in CPU memory than on the GPU",
             "the base model stays reachable as model=" + json.dumps(base)]
    return cmd, pairs[0][0], notes


def _sglang(base, pairs, rank, checks, port):
    known = LINEAR_TARGETS + VOCAB_TARGETS           # --lora-target-modules rejects other names
    mods = sorted({m for c in checks for m in c.modules if m in known})
    cmd = ["python", "-m", "sglang.launch_server", "--model-path", base, "--enable-lora",
           "--lora-paths", *(f"{n}={p}" for n, p in pairs), "--max-lora-rank", str(rank),
           "--lora-target-modules", *(mods or ["all"]), "--max-loras-per-batch",
           str(max(len(pairs), 1)), "--port", str(port)]
    notes = [f"--max-lora-rank {rank} and --lora-target-modules {' '.join(mods) or 'all'}: the union "
             "over these adapters; raise them to load larger adapters later (/load_lora_adapter)",
             f"--max-loras-per-batch {len(pairs)} (default 8): adapters one batch may mix",
             f"native API: POST /generate with \"lora_path\": \"{pairs[0][0]}\" (a list gives one "
             "adapter per prompt, None for the base)"]
    return cmd, f"{base}:{pairs[0][0]}", notes


def _requests(engine, base, model, port, prompt, max_tokens):
    url = f"http://localhost:{port}/v1/completions"
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    curl = (f"curl {url} \\\n  -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(json.dumps(body))}")
    py = ("import requests\n\n"
          f"r = requests.post({url!r},\n                  json={body!r})\n"
          "print(r.json()[\"choices\"][0][\"text\"])")
    oa = ("from openai import OpenAI\n\n"
          f"client = OpenAI(base_url=\"http://localhost:{port}/v1\", api_key=\"EMPTY\")\n"
          f"out = client.completions.create(model={model!r}, prompt={prompt!r}, "
          f"max_tokens={max_tokens}, temperature=0)\n"
          "print(out.choices[0].text)")
    return curl, py, oa


def _multiline(argv) -> str:
    """argv as a shell command with one option per line (``\\`` continuations)."""
    out, line = [], []
    for a in argv:
        if a.startswith("--") and line:
            out.append(" ".join(line))
            line = []
        line.append(shlex.quote(a))
    out.append(" ".join(line))
    return " \\\n  ".join(out)
