"""Hot-swap: after swapping a saved adapter into a slot, the logits equal (to float rounding: the
padded rank sums in another order) those of a fresh ``load_adapter`` of that adapter (peft's own
loading is the oracle); a compiled model recompiles 0 times across swaps (dynamo's own counter); a
mismatch names the tensor and changes nothing."""

import pytest
import torch
from lora_testing import logits, randomize_lora_b

import lora_lab as ll
from lora_lab.errors import AdapterMismatchError
from lora_lab.hf.adapters.hotswap import CompileCounter, hotswap_adapter, prepare_hotswap

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three adapters for builtin:tiny: x (r=4, α=8, all linear), y (r=8, α=4, all linear) and
    qv (r=2, α=2, attention q and v only)."""
    root = tmp_path_factory.mktemp("hotswap")
    out = {}
    for k, (name, r, alpha, targets) in enumerate([("x", 4, 8, "all-linear"), ("y", 8, 4, "all-linear"),
                                                    ("qv", 2, 2, "attention-qv")]):
        model, _ = ll.load_model("builtin:tiny", device="cpu")
        model = ll.attach(model, ll.AdapterSpec(r=r, alpha=alpha, target_modules=targets), name=name)
        randomize_lora_b(model, seed=k, scale=0.5)
        out[name] = ll.save_adapter(model, root / name)
    return out


def _fresh(path):
    model, _ = ll.load_model("builtin:tiny", device="cpu")
    return logits(ll.load_adapter(model, path))


def _slot(path, name="slot"):
    model, _ = ll.load_model("builtin:tiny", device="cpu")
    return ll.load_adapter(model, path, name=name).eval()


def test_swapped_slot_gives_the_logits_of_a_fresh_load(saved):
    model = _slot(saved["x"])
    prepare_hotswap(model, target_rank=8)
    x = logits(model)
    torch.testing.assert_close(x, _fresh(saved["x"]), rtol=1e-5, atol=1e-4)   # padding changes nothing
    for name in ("y", "qv", "x"):
        report = hotswap_adapter(model, saved[name], "slot")
        torch.testing.assert_close(logits(model), _fresh(saved[name]), rtol=1e-5, atol=1e-4)
        assert report.slot_rank == 8 and report.copied > 0
    assert report.zeroed == 0 and ll.list_adapters(model).source[0] == str(saved["x"])
    assert not torch.allclose(x, _fresh(saved["y"]))       # the adapters differ: the swap matters


def test_a_compiled_model_does_not_recompile_across_swaps(saved):
    model = _slot(saved["x"])
    prepare_hotswap(model, target_rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")       # dynamo's guards decide recompiles
    with torch.no_grad(), CompileCounter() as first:
        compiled(input_ids=torch.ones(2, 12, dtype=torch.long))
    assert first.count >= 1                                  # the counter sees compilations
    with torch.no_grad(), CompileCounter() as swaps:
        for name in ("y", "qv", "x", "y"):
            hotswap_adapter(compiled, saved[name], "slot")
            out = compiled(input_ids=torch.ones(2, 12, dtype=torch.long)).logits
    assert swaps.count == 0, swaps
    fresh, _ = ll.load_model("builtin:tiny", device="cpu")
    fresh = ll.load_adapter(fresh, saved["y"]).eval()
    with torch.no_grad():
        want = fresh(input_ids=torch.ones(2, 12, dtype=torch.long)).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    torch._dynamo.reset()


def test_a_mismatch_names_the_tensor_and_changes_nothing(saved):
    model = _slot(saved["qv"])                               # rank 2, attention q/v only
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(AdapterMismatchError, match=r"tensor model\.layers\.\d+\.\w+\.\w+_proj\.lora_.\.slot"
                                                  r"\.weight, .*a layer the slot does not") as err:
        hotswap_adapter(model, saved["x"], "slot")           # x also targets k, o and the MLP
    assert "load_adapter" in err.value.fix
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    model = _slot(saved["x"])                                # rank 4, not padded
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(AdapterMismatchError, match=r"lora_A\.slot\.weight .* \(8, \d+\).*\(4, \d+\)") as err:
        hotswap_adapter(model, saved["y"], "slot")
    assert "target_rank=8" in err.value.fix
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
