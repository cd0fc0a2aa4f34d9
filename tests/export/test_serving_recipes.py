"""serving_recipe: the vLLM / SGLang launch command and the request that names one adapter.

The command is parsed back with shlex (as a shell would, line continuations included) and then
with a parser that mirrors each engine's documented flags, so a flag name, a value outside the
engine's allowed set or a path that is not the saved folder fails here.  No vllm or sglang is
installed or needed."""

from __future__ import annotations

import argparse
import ast
import copy
import json
import shlex
import subprocess
import sys

import pytest

import lora_lab as ll
from lora_lab.errors import AdapterError
from lora_lab.export.serving_recipes import parse_adapters, serving_recipe

# vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# sglang server_args: --lora-target-modules choices=SUPPORTED_LORA_TARGET_MODULES + ["all"]; the
# linear projections every version lists (recent ones add embed_tokens and lm_head)
SGLANG_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj", "all"]


def vllm_parser():
    """``vllm serve BASE --enable-lora --lora-modules name=path ... --max-lora-rank N --max-loras K``
    (docs.vllm.ai/en/latest/features/lora/, "Serving LoRA Adapters")."""
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("prog", choices=["vllm"])
    p.add_argument("sub", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--enable-lora", action="store_true", required=True)
    p.add_argument("--lora-modules", nargs="+", required=True)
    p.add_argument("--max-lora-rank", type=int, choices=VLLM_RANKS, default=16)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--port", type=int)
    return p


def sglang_parser():
    """``python -m sglang.launch_server --model-path BASE --enable-lora --lora-paths name=path ...
    --max-lora-rank R --lora-target-modules ... --max-loras-per-batch K``
    (docs.sglang.io/advanced_features/lora.html)."""
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("py")
    p.add_argument("-m", dest="module", choices=["sglang.launch_server"])
    p.add_argument("--model-path", required=True)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-paths", nargs="*", required=True)
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--lora-target-modules", nargs="*", choices=SGLANG_TARGETS)
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--port", type=int)
    return p


def shell_words(text: str) -> list[str]:
    """What a POSIX shell runs: backslash-newline continuations joined, then split."""
    return shlex.split(text.replace("\\\n", ""))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    base, _ = ll.load_model("builtin:tiny")
    root = tmp_path_factory.mktemp("recipes")
    out = {"math": ll.save_adapter(ll.attach(copy.deepcopy(base), ll.AdapterSpec(r=8)), root / "math"),
           "dora": ll.save_adapter(ll.attach(copy.deepcopy(base), ll.AdapterSpec(r=8, use_dora=True)),
                                   root / "dora")}
    get_peft_model(copy.deepcopy(base), LoraConfig(r=24, target_modules=["q_proj", "v_proj"])) \
        .save_pretrained(root / "sql adapter")                       # a space in the path
    out["sql"] = root / "sql adapter"
    return out


def test_vllm_command_parses_back_with_the_flags_vllm_documents(saved):
    recipe = serving_recipe({"math": saved["math"], "sql": saved["sql"]}, "vllm")
    assert recipe.ok
    assert shlex.split(recipe.launch) == list(recipe.command)
    for text in (recipe.launch, str(recipe).split("# launch (vllm)\n")[1].split("\n\n")[0]):
        args = vllm_parser().parse_args(shell_words(text))
        assert args.enable_lora and args.model == recipe.base
        pairs = dict(m.split("=", 1) for m in args.lora_modules)
        assert pairs == {"math": str(saved["math"].resolve()), "sql": str(saved["sql"].resolve())}
        assert all((saved[k] / "adapter_config.json").exists() for k in pairs)
        assert args.max_lora_rank == 32        # the largest rank is 24: smallest allowed >= 24
        assert args.max_loras == 2 and args.port == 8000
    base = json.loads((saved["math"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recipe.base == base


def test_vllm_request_names_the_adapter_as_the_model(saved):
    """docs.vllm.ai: requests "specify the LoRA adapter as if it were any other model via the
    ``model`` request parameter"."""
    recipe = serving_recipe([saved["math"]], "vllm", base="org/base-model", prompt="2+2=", max_tokens=5)
    words = shell_words(recipe.curl)
    assert words[:2] == ["curl", "http://localhost:8000/v1/completions"]
    body = json.loads(words[words.index("-d") + 1])
    assert body == {"model": "math", "prompt": "2+2=", "max_tokens": 5, "temperature": 0}
    for snippet in (recipe.python, recipe.openai):
        tree = ast.parse(snippet)                                   # valid Python
        assert "'math'" in snippet or '"math"' in snippet
        assert any(isinstance(n, ast.Call) for n in ast.walk(tree))
    assert vllm_parser().parse_args(shlex.split(recipe.launch)).model == "org/base-model"


def test_sglang_command_and_requests(saved):
    """SGLang's OpenAI API takes ``model: "base-model:adapter-name"``; ``--lora-target-modules``
    and ``--max-lora-rank`` are the union over the adapters."""
    recipe = serving_recipe([f"sql={saved['sql']}", saved["math"]], "sglang")
    args = sglang_parser().parse_args(shell_words(recipe.launch))
    assert args.module == "sglang.launch_server" and args.enable_lora
    assert dict(p.split("=", 1) for p in args.lora_paths) == {
        "sql": str(saved["sql"].resolve()), "math": str(saved["math"].resolve())}
    assert args.max_lora_rank == 24
    assert set(args.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"}
    assert args.max_loras_per_batch == 2 and args.port == 30000
    body = json.loads(shell_words(recipe.curl)[shell_words(recipe.curl).index("-d") + 1])
    assert body["model"] == f"{recipe.base}:sql"
    assert any('"lora_path": "sql"' in n for n in recipe.notes)


def test_a_recipe_with_an_unservable_adapter_says_so(saved):
    recipe = serving_recipe([saved["math"], saved["dora"]], "vllm")
    assert not recipe.ok
    assert [c.ok for c in recipe.checks] == [True, False]
    text = str(recipe)
    assert "cannot be served as trained" in text and "DoRA" in text
    html = recipe._repr_html_()
    assert "vllm serve" in html and "<pre>" in html and "DoRA" in html


def test_adapter_names_and_bad_input(saved, tmp_path):
    pairs = parse_adapters([saved["math"], f"other={saved['math']}"])
    assert [n for n, _ in pairs] == ["math", "other"]
    with pytest.raises(AdapterError, match="same name") as err:
        parse_adapters([saved["math"], saved["math"]])
    assert err.value.fix
    with pytest.raises(AdapterError, match="cannot name"):
        parse_adapters({"a b": saved["math"]})
    with pytest.raises(AdapterError):
        parse_adapters([])
    with pytest.raises(AdapterError, match="not a saved adapter"):
        serving_recipe([tmp_path], "vllm")
    with pytest.raises(AdapterError, match="engine"):
        serving_recipe([saved["math"]], "tgi")


def test_the_recipe_module_imports_no_torch():
    """export/ writes text: making a recipe must not import torch, vllm or sglang."""
    code = ("import sys; import lora_lab.export.serving_recipes as r; "
            "print(sorted(m for m in ('torch', 'vllm', 'sglang', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
