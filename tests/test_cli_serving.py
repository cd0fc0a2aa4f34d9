"""``lora-lab serve-recipe``: the checks and the launch command on stdout; exit status 0 when every
adapter can be served as trained, 1 when one cannot (DoRA on vLLM: ``"vLLM does not yet support
DoRA."``, vllm/lora/peft_helper.py), 2 with a one-line "Fix:" for a folder that is no adapter."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys

import pytest

import lora_lab as ll
from lora_lab.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    base, _ = ll.load_model("builtin:tiny")
    root = tmp_path_factory.mktemp("cli_serving")
    plain = ll.save_adapter(ll.attach(copy.deepcopy(base), ll.AdapterSpec(r=16)), root / "plain")
    dora = root / "dora"
    get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(dora)
    return {"plain": plain, "dora": dora}


def launch_words(out: str) -> list[str]:
    block = out.split("# launch (")[1].split("\n", 1)[1].split("\n\n")[0]
    return shlex.split(block.replace("\\\n", ""))


def test_vllm_recipe_for_a_servable_adapter(saved, capsys):
    assert main(["serve-recipe", str(saved["plain"]), "--engine", "vllm", "--base", "org/base"]) == 0
    out = capsys.readouterr().out
    assert "can be served" in out and "source: vllm/config/lora.py" in out
    words = launch_words(out)
    assert words[:3] == ["vllm", "serve", "org/base"]
    assert words[words.index("--lora-modules") + 1] == f"plain={saved['plain'].resolve()}"
    assert words[words.index("--max-lora-rank") + 1] == "16"       # 16 is an allowed value
    assert '"model": "plain"' in out


def test_an_unservable_adapter_exits_1_with_the_reason(saved, capsys):
    code = main(["serve-recipe", f"m={saved['plain']}", f"d={saved['dora']}", "--engine", "vllm"])
    out = capsys.readouterr().out
    assert code == 1
    assert "CANNOT be served" in out and "[error  ] dora" in out
    assert launch_words(out)[launch_words(out).index("--max-loras") + 1] == "2"


def test_sglang_by_subprocess(saved):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_lab.cli", "serve-recipe", str(saved["plain"]),
                           "--engine", "sglang"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    words = launch_words(done.stdout)
    assert words[:3] == ["python", "-m", "sglang.launch_server"]
    assert words[words.index("--max-lora-rank") + 1] == "16"
    assert "/v1/completions" in done.stdout and ":plain" in done.stdout
    dora = subprocess.run([sys.executable, "-m", "lora_lab.cli", "serve-recipe", str(saved["dora"]),
                           "--engine", "sglang"], capture_output=True, text=True, env=env, timeout=120)
    assert dora.returncode == 1 and "doesn't support DoRA" in dora.stdout


def test_a_folder_that_is_no_adapter_exits_2(tmp_path, capsys):
    assert main(["serve-recipe", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lora-lab serve-recipe:" in err and "Fix:" in err and len(err.strip().splitlines()) == 1


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "serve-recipe" in text and "``" not in text and ":func:" not in text
    with pytest.raises(SystemExit):
        main(["serve-recipe", "--help"])
    assert "--engine {vllm,sglang}" in capsys.readouterr().out
