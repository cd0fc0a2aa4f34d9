"""The lora-lab command, run as a user runs it."""

import subprocess
import sys


def test_info_reports_versions_device_and_4bit():
    out = subprocess.run([sys.executable, "-m", "lora_lab.cli", "info"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for name in ("torch", "transformers", "peft", "bitsandbytes", "device", "bf16", "4-bit"):
        assert name in out
    assert "4-bit (bnb)   works on" in out, out
