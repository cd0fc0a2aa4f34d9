"""AdapterDesigner (issue 16): its training controls start at TrainSpec's defaults, it plans for
the CPU too, and every size carries its unit (GiB, MiB)."""

import pytest

import lora_lab as ll
from lora_lab.core import memory as mem
from lora_lab.ui.designer import AdapterDesigner


@pytest.fixture
def designer(tiny_llama_dir):
    return AdapterDesigner(str(tiny_llama_dir))


def _trace(d, name):
    return next(t for t in d.live.figure.data if t.name == name)


def test_training_controls_start_at_trainspecs_defaults(designer):
    train, data = ll.TrainSpec(), ll.DataSpec()
    d = designer
    assert d.batch.value == train.batch_size and d.seq_len.value == data.max_length
    assert d.checkpointing.value == train.gradient_checkpointing
    assert d.optimizer.value == train.optimizer
    est = d.estimate
    assert (est.batch_size, est.seq_len, est.gradient_checkpointing) == \
        (train.batch_size, data.max_length, train.gradient_checkpointing)
    # an untouched designer exports the default TrainSpec
    assert d.export_choice()["train_spec"] == train


def test_cpu_device_plans_in_system_ram(designer):
    d = designer
    d.device.value = "cpu"
    est = d.estimate
    assert d.error == "" and est.on_cpu and est.precision == "fp32"
    assert "system RAM" in d.summary.value
    line = _trace(d, est.device_text)
    assert list(line.y) == [est.device_bytes / mem.GIB] * 3
    assert _trace(d, "Python + libraries").y[1] == pytest.approx(mem.CPU_RUNTIME / mem.GIB)
    d.device.value = "T4"
    assert _trace(d, "CUDA context").y[1] == pytest.approx(mem.CUDA_CONTEXT / mem.GIB)


def test_custom_size_is_gib_and_sizes_say_their_units(designer):
    d = designer
    assert d.device_gb.description == "custom GiB"
    d.device.value = "custom"
    d.device_gb.value = 24.0
    assert d.estimate.device_bytes == 24 * 2**30
    assert _trace(d, "24 GiB") is not None
    assert "MiB" in d.summary.value and " MB" not in d.summary.value
    grads = _trace(d, "gradients")
    assert list(grads.customdata) == [t["gradients_total"] / 2**30
                                      for t in d.estimate.scenarios.values()]
