"""The serving playground: requests are queued from the widget, served in mixed batches of the
chosen size, each row equal to its prompt alone with its adapter (``lora_lab.generate``), and the
base comparison reports a throughput ratio.  Logic: tests/hf/generate/test_serving_queue.py."""

import pytest
from lora_testing import randomize_lora_b

import lora_lab as ll

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_playground_queues_serves_and_compares_with_the_base():
    from lora_lab.ui.serving import ServingPlayground

    model, tok = ll.load_model("builtin:tiny", device="cpu")
    for name in ("t1", "t2"):
        model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8, target_modules="all-linear"), name=name)
    randomize_lora_b(model, seed=0, scale=0.5).eval()
    ui = ServingPlayground(model, tok, max_batch=4, max_resident=2, max_new_tokens=6)
    assert list(ui.adapter.options) == ["(base)", "t1", "t2"]
    ui.prompt.value, ui.adapter.value = "reverse abc", "t2"
    ui.add_button.click()
    ui.burst_button.click()
    assert len(ui.queue.queue) == 9 and "reverse abc" in ui.queued.value
    ui.batch_size.value = 5
    ui.serve_button.click()
    assert ui.queue.summary()["served"] == 9 and [b.rows for b in ui.queue.batches] == [5, 4]
    assert "tokens/s" in ui.status.value and "latency ms" in ui.results.value
    assert ui.queue.served[0].text == ll.generate(model, tok, "reverse abc", adapter="t2",
                                                  max_new_tokens=6).text
    ui.base_button.click()
    assert ui.comparison["ratio"] > 0 and "mixed/base" in ui.status.value
    assert "ServingQueue(model, tok" in ui.code()
