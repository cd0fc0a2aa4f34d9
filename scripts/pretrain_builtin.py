"""Pretrain ``builtin:tiny``: a seeded, reproducible run on a synthetic corpus, on CPU.

The corpus is generated here from the pretraining skills of :mod:`lora_lab.hf.data.tasks` (addition,
copying, length, counting, first/last letter, max of two numbers), using only prompts of the
``"train"`` split.  Every example is rendered with the builtin tokenizer's chat template,
``<s>Q: {prompt}\\nA: {response}</s>``, exactly as :func:`lora_lab.prepare_dataset` renders
fine-tuning data, and the model learns it as a plain causal LM (loss on every token).

Usage (1,500 steps at about 0.34 CPU-seconds each: about 10 minutes on one free core)::

    python scripts/pretrain_builtin.py --threads 1          # writes lora_lab/assets/tiny/
    python scripts/pretrain_builtin.py --threads 1 --check  # retrain in a temp folder, compare

The shipped weights were made with ``--threads 1``: on a CPU shared with other jobs, two OpenMP
threads spin-wait and cost about five times the CPU time per step.  A different thread count may
change the last bits of the weights (not the accuracy; ``--check`` compares accuracy).

``--check`` exits with status 1 when the reproduced held-out accuracy differs from the shipped
card's by more than 2 points.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_lab.hf.model.builtin import ASSETS, TOKENIZER_DIR, builtin_config
from lora_lab.hf.data.tasks import PRETRAIN, in_split, pretraining_skills, sample_examples
from lora_lab.hf.generate.batch import generate_greedy

DEFAULTS = dict(seed=0, steps=1500, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.1,
                eval_per_skill=100, threads=2)


def render(tok, prompt: str, response: str | None = None) -> str:
    msgs = [{"role": "user", "content": prompt}]
    if response is None:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": response})
    return tok.apply_chat_template(msgs, tokenize=False)


def corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` training examples: an even mix of the skills, train-split prompts only."""
    rng = random.Random(f"pretrain/{seed}")
    skills = list(PRETRAIN)
    out = []
    while len(out) < n:
        p, r = PRETRAIN[rng.choice(skills)](rng)
        if in_split(p, "train"):
            out.append((p, r))
    return out


def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_accuracy(model, tok, per_skill: int) -> dict[str, float]:
    """Exact-match greedy accuracy per skill on ``"test"``-split prompts (never trained on)."""
    acc = {}
    for skill in pretraining_skills():
        rows = sample_examples(skill, per_skill, seed=1234, split="test")
        ids = [tok(render(tok, p), add_special_tokens=False)["input_ids"] for p, _ in rows]
        got = generate_greedy(model, tok, ids, max_new_tokens=20)
        acc[skill] = sum(g.strip() == r for g, (_, r) in zip(got, rows)) / len(rows)
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc


def pretrain(cfg: dict, log=print):
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = LlamaForCausalLM(builtin_config())
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.98))
    data = corpus(cfg["steps"] * cfg["batch_size"], cfg["seed"])
    texts = [render(tok, p, r) for p, r in data]
    tokens, t0 = 0, time.time()
    model.train()
    for step in range(cfg["steps"]):
        batch = texts[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        # Right padding under a causal mask: real tokens never attend to the pads that follow them,
        # so no attention mask is needed (and the unmasked SDPA path is faster on CPU).
        loss = model(input_ids=enc["input_ids"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(enc["attention_mask"].sum())
        if step % 100 == 0 or step == cfg["steps"] - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, cfg):.2e}  "
                f"{time.time() - t0:6.1f}s")
    wall = time.time() - t0
    model.eval()
    acc = heldout_accuracy(model, tok, cfg["eval_per_skill"])
    card = {"name": "builtin:tiny", "architecture": "LlamaForCausalLM",
            "parameters": sum(p.numel() for p in model.parameters()), "stored_dtype": "float32",
            **{k: cfg[k] for k in ("seed", "steps", "batch_size", "lr", "warmup", "weight_decay", "threads")},
            "tokens": tokens, "wall_time_s": round(wall, 1), "torch": torch.__version__,
            "heldout_accuracy": {k: round(v, 4) for k, v in acc.items()},
            "heldout_examples_per_skill": cfg["eval_per_skill"]}
    return model, tok, card


def save(model, tok, card: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS / "tiny")
    ap.add_argument("--check", action="store_true",
                    help="retrain in a temp folder and compare held-out accuracy with the shipped card")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    log = lambda s: print(s, flush=True)  # noqa: E731
    model, tok, card = pretrain(cfg, log)
    log(json.dumps(card["heldout_accuracy"]))
    if not args.check:
        save(model, tok, card, args.out)
        log(f"wrote {args.out}  ({card['wall_time_s']} s, {card['tokens']} tokens)")
        return 0
    shipped = json.loads((ASSETS / "tiny" / "card.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tok, card, Path(tmp))
    a, b = card["heldout_accuracy"]["mean"], shipped["heldout_accuracy"]["mean"]
    ok = abs(a - b) <= 0.02
    log(f"reproduced held-out accuracy {a:.4f} vs shipped {b:.4f}: diff {100 * (a - b):+.2f} points "
        f"-> {'OK' if ok else 'FAIL'} (limit 2 points)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
