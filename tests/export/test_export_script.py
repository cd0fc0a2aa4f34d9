"""export_script: standalone scripts that run (fresh processes, CPU, builtin model), train the same
adapter lora_lab would, and format prompts exactly as lora_lab does."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lora_lab as ll
from lora_lab.errors import LoraLabError
from lora_lab.export.script import ExportedScript, export_script
from lora_lab.hf.adapters.io import read_adapter_spec
from lora_lab.hf.data.prepare import prepare_dataset

ACCELERATE = Path(sys.executable).with_name("accelerate")


def _env(tmp_path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf-cache"))
    env.pop("PYTHONPATH", None)
    return env


def _import(path: Path, name: str):
    """Import a generated script as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+/\d+  loss ([0-9.e+-]+)", text, re.M)]


def _run(cmd, tmp_path, timeout=240) -> str:
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


TRAIN = ll.TrainSpec(steps=8, batch_size=8, lr=3e-3)


# ----------------------------------------------------------------------------- the files
def test_scripts_compile_do_not_import_lora_lab_and_configs_load(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    out = export_script(ll.AdapterSpec(r=4), "nf4", TRAIN, ll.DataSpec(), path=tmp_path / "x",
                        trl=True)
    assert isinstance(out, ExportedScript)
    assert {"train.py", "train_trl.py", "README.md", "data/train.jsonl", "data/eval.jsonl",
            "accelerate/fsdp_qlora.yaml", "accelerate/cpu_ddp.yaml"} <= set(out.files)
    for name in ("train.py", "train_trl.py"):
        tree = ast.parse(out.file(name).read_text(), filename=name)   # valid Python
        compile(tree, name, "exec")
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not [m for m in imported if m.split(".")[0] == "lora_lab"], imported
        assert {"torch", "peft", "datasets", "transformers"} <= {m.split(".")[0] for m in imported}
    assert "trl" in out.file("train_trl.py").read_text()
    fsdp = load_config_from_file(str(out.file("accelerate/fsdp_qlora.yaml")))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is False
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    for name in ("single_gpu", "ddp", "cpu_ddp"):
        load_config_from_file(str(out.file(f"accelerate/{name}.yaml")))
    text = repr(out)
    assert "accelerate launch --config_file" in text and "cpu_ddp.yaml" in text
    assert "nf4" in out.file("train.py").read_text() and "GiB" in out.estimate


@pytest.mark.parametrize("spec", [
    ll.AdapterSpec(r=4, target_modules="attention-qv", layers=(1, 2), dropout=0.05),
    ll.AdapterSpec(r=8, alpha=4.0, use_dora=True, target_modules="mlp"),
    ll.AdapterSpec(r=2, use_rslora=True, init="gaussian", bias="lora_only"),
    ll.AdapterSpec(method="prompt", num_virtual_tokens=7),
    ll.AdapterSpec(method="prefix", num_virtual_tokens=5),
    ll.AdapterSpec(method="ia3", target_modules=("k_proj", "down_proj")),
])
def test_peft_config_is_the_one_to_peft_config_builds(spec, tmp_path):
    out = export_script(spec, path=tmp_path / "x")
    module = _import(out.file("train.py"), "exported_cfg")
    assert module.peft_config().to_dict() == ll.to_peft_config(spec).to_dict()
    assert ll.AdapterSpec(**{**module.ADAPTER_SPEC, "target_modules": spec.target_modules,
                             "layers": spec.layers}) == spec


@pytest.mark.parametrize("dspec", [ll.DataSpec(), ll.DataSpec(use_chat_template=False, max_length=12),
                                   ll.DataSpec(packing=True, max_length=40),
                                   ll.DataSpec(train_on_responses_only=False, eval_fraction=0.25)])
def test_tokenized_rows_are_lora_labs(dspec, tmp_path):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    rows = [{"prompt": f"next {i}", "response": str(i + 1)} for i in range(30)]
    rows += [{"prompt": "reverse " + "abcdefgh" * 2, "response": "hgfedcba" * 2}]
    out = export_script(ll.AdapterSpec(r=2), None, TRAIN, dspec, path=tmp_path / "x", data=rows)
    module = _import(out.file("train.py"), "exported_data")
    train_rows, eval_rows = module.load_rows()
    want = prepare_dataset(rows, tok, dspec)
    got = module.tokenize(train_rows, tok, packing=module.FORMAT["packing"])
    assert got.to_dict() == want.train.to_dict()
    assert ("position_ids" in got.column_names) == dspec.packing  # packed rows: no attention_mask
    assert module.tokenize(eval_rows, tok).to_dict() == want.eval.to_dict()  # eval: never packed


def test_messages_rows_and_file_sources(tmp_path):
    _, tok = ll.load_model("builtin:tiny", device="cpu")
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"next {i}"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(12)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    out = export_script(ll.AdapterSpec(r=2), path=tmp_path / "x", data=path)
    module = _import(out.file("train.py"), "exported_msgs")
    assert module.DATA["source"] == str(path.resolve()) and "data/train.jsonl" not in out.files
    train_rows, eval_rows = module.load_rows()
    want = prepare_dataset(str(path), tok)
    assert module.tokenize(train_rows, tok).to_dict() == want.train.to_dict()
    assert module.tokenize(eval_rows, tok).to_dict() == want.eval.to_dict()


# ----------------------------------------------------------------------------- the chunked loss
def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exported_chunked_loss_is_transformers_loss(tied, tmp_path):
    """train.py's Trainer with TrainSpec(chunked_loss=True): its compute_loss (chunks of 7 tokens,
    which divide nothing) gives transformers' own loss and gradients, fp32, within 1e-5."""
    import torch

    out = export_script(ll.AdapterSpec(r=4, target_modules="all-linear"), None,
                        TRAIN.replace(chunked_loss=True, loss_chunk_size=7), path=tmp_path / "x")
    assert "chunked loss" in out.estimate
    module = _import(out.file("train.py"), f"exported_chunked_{tied}")
    trainer = module.build_trainer("cpu", tmp_path / "out")
    model = trainer.model
    if tied:  # the LM head shares the embedding's weight, as in Llama 3.2 and SmolLM2
        model.get_base_model().lm_head.weight = model.get_base_model().model.embed_tokens.weight
    with torch.no_grad():  # B = 0 at init: make every LoRA gradient non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    assert trainer.use_chunked_loss(model)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    model.zero_grad(set_to_none=True)
    full = model(**batch).loss
    full.backward()
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    chunked = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
    chunked.backward()
    g_chunked = _grads(model)
    assert abs(float(chunked.detach()) - float(full.detach())) <= 1e-5 * float(full.detach())
    assert len(g_full) > 0 and max(_rel(g_chunked[k], g_full[k]) for k in g_full) < 1e-5
    auto = module.build_trainer("cpu", tmp_path / "out2")
    module.TRAIN["chunked_loss"] = "auto"     # the builtin's 100-token vocabulary: the full loss
    assert not auto.use_chunked_loss(auto.model)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_with_a_fix(tmp_path):
    cases = [
        lambda: export_script(ll.AdapterSpec(init="loftq"), path=tmp_path / "a"),
        lambda: export_script(ll.AdapterSpec(init="pissa"), "nf4", path=tmp_path / "b"),
        lambda: export_script({"r": 8}, path=tmp_path / "c"),
        lambda: export_script(ll.AdapterSpec(target_modules=("c_attn",)), path=tmp_path / "d"),
        lambda: export_script(ll.AdapterSpec(), path=tmp_path / "e", data=[{"question": "q"}]),
        lambda: export_script(ll.AdapterSpec(), path=tmp_path / "f", data="builtin:nope"),
        lambda: export_script(ll.AdapterSpec(), path=tmp_path / "g", data="missing.jsonl"),
        lambda: export_script(ll.AdapterSpec(), model_id="builtin:huge", path=tmp_path / "h"),
        lambda: export_script(ll.AdapterSpec(method="prompt"), None, None, ll.DataSpec(packing=True),
                              path=tmp_path / "i"),
        lambda: export_script(ll.AdapterSpec(method="prefix"), None, TRAIN.replace(chunked_loss=True),
                              path=tmp_path / "j"),
    ]
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cases.append(lambda: export_script(ll.AdapterSpec(), path=afile))
    for case in cases:
        with pytest.raises(LoraLabError) as info:
            case()
        assert info.value.fix, str(info.value)
    assert afile.read_text() == "x"


# ----------------------------------------------------------------------------- fresh processes
def _check_adapter(adapter: Path, spec, quant=None):
    assert read_adapter_spec(adapter) == spec
    model, _ = ll.load_model("builtin:tiny", quant=quant, device="cpu")
    model = ll.load_adapter(model, adapter, name="default")
    assert model.lora_lab_specs["default"] == spec
    ref = ll.attach(ll.load_model("builtin:tiny", device="cpu")[0], spec)
    shapes = lambda m: {k.replace(".default", ""): tuple(v.shape)  # noqa: E731
                        for k, v in m.state_dict().items() if "lora_" in k}
    assert shapes(model) == shapes(ref)  # the same modules and ranks as lora_lab's attach
    assert any(float(v.abs().sum()) > 0 for k, v in model.state_dict().items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.parametrize("quant, dspec, train", [
    (None, ll.DataSpec(), TRAIN), ("nf4", ll.DataSpec(), TRAIN),
    (None, ll.DataSpec(packing=True, max_length=96), TRAIN),
    ("nf4", ll.DataSpec(), TRAIN.replace(chunked_loss=True, loss_chunk_size=100))],
    ids=["fp32", "nf4", "packed", "nf4-chunked"])
def test_exported_script_trains_in_a_fresh_process(quant, dspec, train, tmp_path):
    spec = ll.AdapterSpec(r=4)
    out = export_script(spec, quant, train, dspec, path=tmp_path / "x")
    script = str(out.file("train.py"))
    # lora_lab made unimportable: the script must not need it
    runner = ("import runpy, sys; sys.modules['lora_lab'] = None; sys.argv = [sys.argv[1]]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    log = _run([sys.executable, "-c", runner, script], tmp_path)
    # the builtin's 100-token vocabulary: "auto" (the default) keeps the full loss
    assert ("loss: chunked, 100 tokens" if train.chunked_loss is True else "loss: full-vocabulary") in log
    losses = _losses(log)
    assert len(losses) == TRAIN.steps and losses[-1] < 0.7 * losses[0], log
    assert "Memory estimate by lora_lab" in log and "peak RSS" in log and "eval_loss" in log
    trained = re.search(r"rank 0 of 1: \d+ steps, (\d+) tokens trained on here", log)
    assert trained and 0 < int(trained[1]) <= TRAIN.steps * TRAIN.batch_size * dspec.max_length, log
    metrics = (out.file("outputs/metrics.jsonl")).read_text().splitlines()
    assert len(metrics) == TRAIN.steps + 1 and all("tokens_per_s" in m for m in metrics[:-1])
    _check_adapter(out.file("outputs/adapter"), spec, quant)


@pytest.mark.slow
def test_accelerate_two_cpu_processes_train_with_ddp(tmp_path):
    spec = ll.AdapterSpec(r=4)
    out = export_script(spec, None, TRAIN.replace(steps=6, batch_size=4, chunked_loss=True),
                        path=tmp_path / "x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = _run([str(ACCELERATE), "launch", "--config_file", str(out.file("accelerate/cpu_ddp.yaml")),
                "--main_process_port", str(port), str(out.file("train.py")), "--cpu"], tmp_path)
    starts = re.findall(r"rank (\d) of (\d): training on (\S+) \((\w+)\)", log, re.M)
    ends = re.findall(r"rank (\d) of (\d): 6 steps, (\d+) tokens trained on here, adapter "
                      r"checksum ([0-9.e+-]+)", log, re.M)
    assert sorted(r for r, *_ in starts) == ["0", "1"] and {w for _, w, *_ in starts} == {"2"}
    assert {mode for *_, mode in starts} == {"distributed"}
    assert sorted(r for r, *_ in ends) == ["0", "1"] and all(int(t) > 0 for _, _, t, _ in ends)
    assert len({c for *_, c in ends}) == 1  # DDP: the same weights on both processes
    assert len(_losses(log)) == 6
    assert "loss: full-vocabulary (the chunked loss does not run under DDP/FSDP)" in log
    _check_adapter(out.file("outputs/adapter"), spec)


@pytest.mark.slow
def test_trl_script_trains_and_saves_an_adapter(tmp_path):
    spec = ll.AdapterSpec(r=4, target_modules="attention")
    out = export_script(spec, None, TRAIN.replace(steps=6), path=tmp_path / "x", trl=True)
    log = _run([sys.executable, str(out.file("train_trl.py"))], tmp_path)
    assert len(_losses(log)) == 6 and "eval_loss" in log
    _check_adapter(out.file("outputs/adapter"), spec)


@pytest.mark.slow
def test_trl_script_trains_on_lora_labs_token_ids(tmp_path):
    """TRL's own preparation of the prompt-completion rows gives lora_lab's input_ids and labels."""
    _, tok = ll.load_model("builtin:tiny", device="cpu")
    rows = [{"prompt": f"wrap w{i}", "response": f"[w{i}]"} for i in range(20)]
    dspec = ll.DataSpec(max_length=24)          # the long row is cut, as lora_lab cuts it
    rows += [{"prompt": "copy abc", "response": "abcdefghijklmnop"}]
    out = export_script(ll.AdapterSpec(r=2), None, TRAIN, dspec, path=tmp_path / "x", data=rows,
                        trl=True)
    module = _import(out.file("train_trl.py"), "exported_trl")
    trainer = module.build_trainer("cpu", tmp_path / "out")
    want = prepare_dataset(rows, tok, dspec)
    assert trainer.train_dataset["input_ids"] == want.train["input_ids"]
    assert trainer.train_dataset["labels"] == want.train["labels"]
    assert trainer.eval_dataset["labels"] == want.eval["labels"]
