"""mixed_throughput times one batch on one adapter, spread over K adapters and on the base, with the
same rows on every side, and says which path lora_lab.generate took (timings are not asserted)."""

import math

import pytest
from lora_testing import randomize_lora_b

import lora_lab as ll
from lora_lab.errors import SpecError
from lora_lab.hf.generate.throughput import default_ks, mixed_throughput

pytestmark = pytest.mark.usefixtures("one_thread")


def test_records_for_one_adapter_k_adapters_and_the_base(tiny_llama):
    model, tok = tiny_llama
    for n in ("t1", "t2", "t3"):
        model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="attention-qv"), name=n)
    randomize_lora_b(model, seed=0).eval()
    prompts = ["reverse abc", "upper hi", "copy xyz", "sort dcba"]
    recs = mixed_throughput(model, tok, prompts, ["t1", "t2", "t3"], max_new_tokens=2, repeats=1,
                            label="tiny")
    assert [(r["way"], r["adapters"]) for r in recs] == [
        ("single", 1), ("mixed", 1), ("mixed", 2), ("mixed", 3), ("base", 0)]
    assert [r["batch_mode"] for r in recs] == ["uniform", "uniform", "mixed", "mixed", "uniform"]
    single = recs[0]
    for r in recs:
        assert r["rows"] == 4 and r["label"] == "tiny" and math.isfinite(r["ms_per_step"])
        assert r["tokens_per_s"] == pytest.approx(4e3 / r["ms_per_step"])
        assert r["vs_single"] == pytest.approx(single["ms_per_step"] / r["ms_per_step"])
    assert recs[1]["ms_per_step"] == single["ms_per_step"]        # K = 1 is the single side
    with pytest.raises(SpecError, match=r"1\.\.3"):
        mixed_throughput(model, tok, prompts, ["t1", "t2", "t3"], ks=(1, 4))


def test_default_ks_are_powers_of_two_up_to_the_adapters_and_rows():
    assert default_ks(16, 16) == (1, 2, 4, 8, 16)
    assert default_ks(3, 6) == (1, 2, 3)
    assert default_ks(16, 5) == (1, 2, 4, 5)
