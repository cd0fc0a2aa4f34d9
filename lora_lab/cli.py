"""The ``lora-lab`` command: the notebook's analyses without a notebook.

``lora-lab info`` prints versions, the device, bf16 support, and whether bitsandbytes' 4-bit path
works on this machine (it runs on x86 CPUs too).
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

PACKAGES = ("lora-lab", "torch", "transformers", "peft", "bitsandbytes", "datasets", "safetensors",
            "ipywidgets", "plotly", "anywidget", "jupyterlab")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    import torch

    from lora_lab.hf.device import (bf16_supported, default_compute_dtype, default_device,
                                    four_bit_check)

    dev = default_device()
    lines = [f"python        {platform.python_version()} ({platform.machine()})"]
    lines += [f"{p:<13} {_version(p)}" for p in PACKAGES]
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "none"
    lines += [f"device        {dev} (GPU: {gpu})",
              f"bf16          {'yes' if bf16_supported(dev) else 'no'}",
              f"compute dtype {str(default_compute_dtype(dev)).replace('torch.', '')}",
              f"4-bit (bnb)   {four_bit_check()}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, bf16 and 4-bit support")
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
