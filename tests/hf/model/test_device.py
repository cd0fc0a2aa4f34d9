"""Device facts: the memory limit a notebook plans under, and dtype names."""

import os

import torch

import lora_lab as ll
from lora_lab.hf.model.device import as_dtype, dtype_name


def test_mem_limit_is_what_binder_sets(monkeypatch):
    monkeypatch.setenv("MEM_LIMIT", str(2 * 1024**3))  # mybinder.org: 2 GiB
    assert ll.memory_limit_gb() == 2 * 1024**3 / 1e9


def test_without_mem_limit_it_is_at_most_the_physical_ram(monkeypatch):
    monkeypatch.delenv("MEM_LIMIT", raising=False)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    assert 0 < ll.memory_limit_gb() <= max(ram, ll.memory_limit_gb())
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        if os.path.exists(path) and open(path).read().strip().isdigit():
            value = int(open(path).read().strip())
            if value < 2**60:
                assert ll.memory_limit_gb() == value / 1e9
                return
    assert ll.memory_limit_gb() == ram


def test_a_nonsense_mem_limit_is_ignored(monkeypatch):
    monkeypatch.delenv("MEM_LIMIT", raising=False)
    unset = ll.memory_limit_gb()
    for nonsense in ("lots", "0", ""):
        monkeypatch.setenv("MEM_LIMIT", nonsense)
        assert ll.memory_limit_gb() == unset


def test_dtype_names_round_trip():
    for name in ("fp32", "bf16", "fp16"):
        assert dtype_name(as_dtype(name)) == name
    assert dtype_name(torch.int8) is None
