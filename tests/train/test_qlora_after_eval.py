"""QLoRA keeps learning after an evaluation (bitsandbytes repacks 4-bit weights in eval mode on
AVX512-BF16 CPUs and the packed path drops input gradients; see lora_lab/hf/model/kbit.py)."""

import torch

import lora_lab as ll
from lora_lab.hf.model.kbit import unpack_4bit_weights

X = torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(5))


def qlora(tiny_llama_dir):
    model, tok = ll.load_model(tiny_llama_dir, quant="nf4", device="cpu")
    torch.manual_seed(0)
    return ll.attach(model, ll.AdapterSpec(r=4)), tok


def lora_grads(model):
    model.train()
    model.zero_grad()
    model(input_ids=X, labels=X).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_after_an_eval_forward_equal_a_fresh_models(tiny_llama_dir):
    fresh, _ = qlora(tiny_llama_dir)
    want = lora_grads(fresh)
    used, _ = qlora(tiny_llama_dir)
    used.eval()
    with torch.no_grad():
        used(input_ids=X)
    unpack_4bit_weights(used)
    got = lora_grads(used)
    assert got.keys() == want.keys()
    # B starts at zero, so layer 0's lora_B gradient exists only if the gradient flows back through
    # every 4-bit layer above it
    first = [n for n in want if ".layers.0." in n and "lora_B" in n]
    assert first and all(got[n].abs().sum() > 0 for n in first)
    # the round trip through bitsandbytes' packed layout is not bit-exact, so compare relatively
    for n in want:
        rel = float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12))
        assert rel < 1e-2, (n, rel)


def test_evaluation_does_not_change_the_qlora_training_trajectory(tiny_llama_dir, tmp_path):
    rows = [{"prompt": f"upper {w}", "response": w.upper()}
            for w in ("abc", "dog", "lora", "rank", "tiny", "bits", "cat", "nf")] * 4
    losses = []
    for eval_every in (None, 2):  # reference: never evaluated; then: evaluated before and during
        model, tok = qlora(tiny_llama_dir)
        if eval_every:
            with torch.no_grad():  # an accuracy check before training, as a notebook would do
                model.eval()
                model(input_ids=X)
        spec = ll.TrainSpec(steps=6, batch_size=4, lr=1e-2, eval_every=eval_every, seed=0,
                            output_dir=str(tmp_path / f"run{eval_every}"))
        result = ll.train(model, tok, rows, eval_data=rows[:8], spec=spec)
        per_step = result.history.dropna(subset=["loss"]).groupby("step")["loss"].first()
        losses.append(per_step.to_numpy())
    assert len(losses[0]) == len(losses[1]) == 6
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    assert losses[0][-1] < losses[0][0]
