"""The serving queue: batches are formed across adapters within the limits, every request gets what
its prompt gets alone with its adapter (``lora_lab.generate`` on one prompt is the oracle), and at
most ``max_resident`` pool adapters stay loaded.  The widget over it: tests/ui/test_serving_playground.py."""

import pytest
from lora_testing import randomize_lora_b

import lora_lab as ll
from lora_lab.errors import AdapterError
from lora_lab.hf.generate.serving import Request, ServingQueue, form_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batches_take_requests_in_order_within_the_adapter_limit():
    reqs = [Request(i, "p", a, 0.0) for i, a in enumerate(["a", "b", "c", "a", None, "d", "b"])]
    assert [r.id for r in form_batch(reqs, max_batch=4, max_loras=2)] == [0, 1, 3, 4]
    assert [r.id for r in form_batch(reqs, max_batch=10, max_loras=1)] == [0, 3, 4]
    assert [r.id for r in form_batch(reqs[2:], max_batch=2, max_loras=3)] == [2, 3]
    assert form_batch([], 4, 2) == []


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Three saved LoRA adapters for builtin:tiny, each with random B (so each changes outputs)."""
    root = tmp_path_factory.mktemp("pool")
    out = {}
    for k, name in enumerate(("t1", "t2", "t3")):
        model, _ = ll.load_model("builtin:tiny", device="cpu")
        model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8, target_modules="all-linear"), name=name)
        out[name] = ll.save_adapter(randomize_lora_b(model, seed=k, scale=0.5), root / name)
    return out


PLAN = [("reverse abc", "t1"), ("upper hello", "t2"), ("copy xyz", None), ("reverse abc", "t3"),
        ("sort dcba", "t1"), ("reverse abc", None), ("upper hello", "t3")]


def test_a_pool_queue_serves_every_request_as_alone_with_at_most_k_resident(pool):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    server = ServingQueue(model, tok, pool=pool, max_batch=3, max_resident=2, max_new_tokens=8)
    for prompt, adapter in PLAN:
        server.submit(prompt, adapter)
    with pytest.raises(AdapterError, match="'nope'"):
        server.submit("x", "nope")
    resident = []
    batches = server.run(on_batch=lambda b: resident.append(server.resident()))
    assert all(len(r) <= 2 for r in resident) and server.loads >= 3 and not server.queue
    assert sum(b.rows for b in batches) == len(PLAN) and all(b.rows <= 3 for b in batches)
    assert all(len(b.adapters) <= 2 for b in batches)
    assert any(b.mode == "mixed" for b in batches)
    # the oracle: each prompt alone, on a fresh model with only its adapter loaded
    for served in server.served:
        fresh, _ = ll.load_model("builtin:tiny", device="cpu")
        if served.request.adapter is not None:
            fresh = ll.load_adapter(fresh, pool[served.request.adapter])
        alone = ll.generate(fresh, tok, served.request.prompt, max_new_tokens=8)
        assert served.text == alone.text, served
        assert served.latency_s >= served.queued_s >= 0
    s = server.summary()
    assert s["served"] == len(PLAN) and s["tokens"] == sum(x.tokens for x in server.served)
    server.set_max_resident(1)
    assert len(server.resident()) == 1
