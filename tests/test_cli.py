"""The lora-lab command, run as a user runs it."""

import subprocess
import sys

import pytest


def test_info_reports_versions_device_and_4bit():
    out = subprocess.run([sys.executable, "-m", "lora_lab.cli", "info"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for name in ("torch", "transformers", "peft", "bitsandbytes", "device", "bf16", "4-bit"):
        assert name in out
    assert "4-bit (bnb)   works on" in out, out
    from lora_lab.hf.model.device import default_device
    from lora_lab.hf.training.compile import compiler_missing

    why = compiler_missing(default_device())   # this machine's answer, as train(compile=True) asks it
    compile_line = next(line for line in out.splitlines() if line.startswith("compile"))
    assert compile_line.endswith("can run here" if why is None else why), compile_line


def test_help_is_plain_text_with_every_command():
    """Issue 16, bug 11: the help showed the docstring's reStructuredText marks (``lora-lab``)."""
    out = subprocess.run([sys.executable, "-m", "lora_lab.cli", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "``" not in out
    for command in ("info", "spectrum", "scan", "demo"):
        assert f"lora-lab {command}" in out  # the epilog explains each command


def test_importing_bitsandbytes_through_lora_lab_prints_no_kernel_hub_warnings():
    """Issue 16, bug 11: offline, every 4-bit import printed the `kernels` package's "Skipping
    publisher trust check for 'kernels-community/...'" and bitsandbytes' failed kernel fetch."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = "import lora_lab.hf.quant.roundtrip, bitsandbytes"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, env=env).stderr
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True,
                           text=True, timeout=120, check=True, env=env).stderr
    if "kernels-community" not in plain:  # the oracle: bitsandbytes imported alone
        pytest.skip("this bitsandbytes/kernels install prints no hub warnings to hide")
    assert "kernels-community" not in err, err
