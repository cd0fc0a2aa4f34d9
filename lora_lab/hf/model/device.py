"""Device and dtype defaults: the one place that asks what hardware is here.

Rule (DESIGN.md, "device-aware defaults"): bf16 on GPUs that support it, fp16 on GPUs that do not
(a Colab T4).  On a CPU, training (``TrainSpec(precision="auto")``) uses bf16 autocast where the chip
has native bf16 matrix products (:func:`cpu_bf16_native`: x86 AVX512-BF16 or AMX, Arm's BF16
extension) and the model is wide enough to gain from it (hidden size >= 512,
:data:`CPU_BF16_MIN_HIDDEN`), and fp32 elsewhere; weights load in fp32 on a CPU unless
``load_model(dtype="auto")`` asks for the same rule, and a 4-bit base's layers compute by it unless
a dtype is asked for (``load_model(quant=...)``: the unquantized parts stay fp32); the memory
planner (``estimate_memory(device="cpu")``) and exported scripts plan and train by it too.
Measured on 2 cores with AVX512-BF16 (benchmarks/cpu_speed.py): a 2048² matrix product runs about
2× faster in bf16 than in fp32.  Users never need to know this.

Without native bf16 "auto" picks fp32.  Where torch has not even oneDNN's conversion path for bf16
(no AVX512 either, :func:`cpu_bf16_onednn`) it multiplies bf16 matrices in its own fallback, and not
a little slower: on 2 cores of an AMD EPYC Zen 3 (AVX2) a 2048² product ran at 0.3 GFLOP/s in bf16
against 108 in fp32, SmolLM2's layer shapes 30-60× slower.  So there ``train()`` refuses bf16 autocast and
bf16 matrices in the model (:data:`EMULATED_BF16`, :func:`emulated_half_weights`: a base loaded in
bf16, 4-bit layers computing in bf16), each with its fix, and ``load_model`` warns when it loads them.
fp16 products are emulated the same way on x86 CPUs without AVX512-FP16 (:func:`cpu_fp16_native`),
and an fp16 base is refused and warned about the same way.
"""

from __future__ import annotations

import torch


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: str | None = None) -> bool:
    """Native bf16 on ``device``: NVIDIA compute capability 8.0+ (Ampere: A100, A10G, L4, H100) or
    ROCm.  ``torch.cuda.is_bf16_supported()`` also answers True on a T4 (sm_75), where bf16 is only
    emulated and slow, so the compute capability decides."""
    device = device or default_device()
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN then runs bf16 GEMMs at about twice
    fp32's rate): x86 with AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX tiles (Sapphire
    Rapids and later), or an Arm CPU with the BF16 extension (``bf16`` in ``/proc/cpuinfo``'s
    Features: Graviton 3, Neoverse V1/N2, Apple M2 and later).  Elsewhere torch emulates bf16 by
    converting to fp32, which is slower than fp32 itself, so the answer there is False."""
    import platform

    cpu = torch.cpu
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as fh:
                return any(line.startswith("Features") and " bf16" in line for line in fh)
        except OSError:  # macOS has no /proc/cpuinfo: stay with fp32 rather than guess
            return False
    return False


def _x86_flags() -> set[str] | None:
    """The x86 CPU flags of ``/proc/cpuinfo``; None on other machines or where it cannot be read."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_bf16_onednn() -> bool:
    """Whether torch hands bf16 matrix products to oneDNN on this CPU (``mkldnn_bf16_device_check`` in
    ATen's ``native/mkldnn/Utils.h``): where bf16 is native (:func:`cpu_bf16_native`), and on x86 CPUs
    with AVX512 BW, VL and DQ or AVX-NE-CONVERT, where oneDNN converts bf16 to fp32 itself (Skylake to
    Ice Lake servers: slower than fp32, not measured here).  Elsewhere (x86 with AVX2 only: AMD Zen 1
    to 3, Intel client chips; an Arm CPU without BF16) torch multiplies bf16 matrices in its own
    fallback, measured at 0.3 GFLOP/s (:data:`EMULATED_BF16`): there ``train()`` refuses them."""
    if cpu_bf16_native():
        return True
    flags = _x86_flags()
    return flags is not None and ({"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags)


def cpu_fp16_native() -> bool:
    """Whether this CPU multiplies fp16 matrices natively.  On x86, torch hands an fp16 GEMM to
    oneDNN only where oneDNN has fp16 instructions (``mkldnn_fp16_device_check`` in ATen's
    ``native/mkldnn/Utils.h``: AVX512-FP16 from Sapphire Rapids on, or AVX-NE-CONVERT; AMX-FP16
    implies both) and emulates it elsewhere, as slowly as bf16 (:data:`EMULATED_FP16`).  Read from
    ``/proc/cpuinfo``'s flags.  Where that file is missing, and on other machines (Arm has fp16
    arithmetic kernels of its own, not measured here), the answer is True: nothing is refused on a
    guess."""
    flags = _x86_flags()
    return flags is None or bool(flags & {"avx512_fp16", "avx_ne_convert", "amx_fp16"})


# What the refusals and the warning below say: measured on 2 cores of an AMD EPYC (Zen 3, AVX2, no
# bf16 or fp16 instructions), torch 2.13: 2048² products at 0.3 GFLOP/s in bf16 against 108 in fp32,
# and SmolLM2-135M's layer shapes (512 tokens) 30-60x slower in bf16; one LoRA step of SmolLM2 on
# 8 x 64 tokens took 112 s in aten::mm alone (benchmarks/cpu_speed.py prints the chip's two rates).
# fp16 the same: 512² at 1.2 GFLOP/s against 118 in fp32, 1024² at 0.8 against 98, and
# builtin:tiny trained at 681 tokens/s with an fp16 base against 7,497 with an fp32 one.
EMULATED_BF16 = ("this CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16) and not the AVX512 that "
                 "oneDNN's bf16 conversion needs, so torch multiplies bf16 matrices in its own fallback: "
                 "30-350x slower than fp32 (measured on an AMD EPYC Zen 3)")
EMULATED_FP16 = ("this CPU has no native fp16 matrix products (no AVX512-FP16 or AVX-NE-CONVERT), so "
                 "torch multiplies fp16 matrices through an emulation: about 100x slower than fp32 "
                 "(measured on an AMD EPYC Zen 3)")


def emulated_dtypes() -> dict[torch.dtype, str]:
    """The 16-bit dtypes whose matrix products this CPU emulates, each with what to tell the user
    (:data:`EMULATED_BF16`, :data:`EMULATED_FP16`): bf16 where torch has no oneDNN path for it
    (:func:`cpu_bf16_onednn`), fp16 where it is not native (:func:`cpu_fp16_native`)."""
    slow = {}
    if not cpu_bf16_onednn():
        slow[torch.bfloat16] = EMULATED_BF16
    if not cpu_fp16_native():
        slow[torch.float16] = EMULATED_FP16
    return slow


def cpu_half_summary() -> str:
    """What ``lora-lab info`` says of this CPU's bf16 (and, when emulated, fp16) matrix products."""
    slow = emulated_dtypes()
    text = "native" if cpu_bf16_native() else (
        "no (torch emulates it: 30-350x slower than fp32)" if torch.bfloat16 in slow
        else "no (oneDNN converts it to fp32: slower than fp32)")
    return text + ("; fp16 emulated too (about 100x slower than fp32)" if torch.float16 in slow else "")


def emulated_half_weights(model) -> list[tuple[str, torch.dtype]]:
    """``(name, dtype)`` of ``model``'s linear layers whose matrix products would run in a 16-bit
    dtype this CPU emulates (:func:`emulated_dtypes`): bf16 or fp16 weights of ``nn.Linear`` layers
    (a base loaded with ``dtype="bf16"`` or ``"fp16"``) and 4-bit layers computing in such a dtype.
    Empty on a CPU that multiplies them natively, on a GPU, and for an fp32 model.  The trainable
    adapter weights are fp32 and never listed."""
    slow = emulated_dtypes()
    if not slow:
        return []
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None or weight.device.type != "cpu":
            continue
        dtype = getattr(module, "compute_dtype", None) or weight.dtype
        if dtype in slow:
            found.append((name, dtype))
    return found


# Below this hidden size bf16 autocast is slower than fp32 on a CPU even where bf16 is native: the
# matrix products are too small for the bf16 GEMM to win back what converting activations and
# weights costs.  Measured (benchmarks/cpu_speed.py, 2 cores with AVX512-BF16, quiet machine, batch
# 8 x 64 tokens, LoRA r=8 all-linear): builtin:tiny (hidden 128) trains at 0.96x fp32's tokens/s
# under bf16 autocast (NF4 base: 0.96x), SmolLM2-135M (hidden 576) at 1.81x (NF4 base: 1.43x).
# 512 sits between the two measured points; no model in between was measured.
CPU_BF16_MIN_HIDDEN = 512


def cpu_prefers_bf16(hidden_size: int | None) -> bool:
    """bf16 on this CPU for a model of ``hidden_size``: the chip multiplies bf16 natively
    (:func:`cpu_bf16_native`) and the model is at least :data:`CPU_BF16_MIN_HIDDEN` wide (None:
    unknown size, decided by the chip alone)."""
    return cpu_bf16_native() and (hidden_size is None or hidden_size >= CPU_BF16_MIN_HIDDEN)


def hidden_size_of(model) -> int | None:
    """``config.hidden_size`` of ``model`` (a peft model's base too), or None."""
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None) if config is not None else None


def default_train_precision(device: str | None = None, hidden_size: int | None = None) -> str:
    """What ``TrainSpec(precision="auto")`` trains in on ``device``: ``"bf16"`` autocast on GPUs with
    native bf16 and on CPUs where :func:`cpu_prefers_bf16` (native bf16, a model of hidden size
    >= 512), ``"fp16"`` (with loss scaling) on other GPUs, ``"fp32"`` on other CPUs.  The trained
    adapter stays fp32 in every case: autocast only changes the dtype the matrix products run in."""
    device = device or default_device()
    if device.startswith("cuda"):
        return "bf16" if bf16_supported(device) else "fp16"
    return "bf16" if device == "cpu" and cpu_prefers_bf16(hidden_size) else "fp32"


def train_precision_choice(choice: str, device_type: str, hidden_size: int | None) -> str:
    """``TrainSpec.precision`` with ``"auto"`` made concrete on a CPU (:func:`default_train_precision`:
    ``"bf16"`` autocast where the chip and the model gain from it, else ``"fp32"``); any other choice,
    and "auto" on CUDA (``lora_lab.train.optim.resolve_precision`` decides there), is returned as is."""
    if choice == "auto" and device_type == "cpu":
        return default_train_precision("cpu", hidden_size)
    return choice


def auto_dtype(device: str | None = None, hidden_size: int | None = None) -> torch.dtype:
    """What ``load_model(dtype="auto")`` stores the frozen weights in on ``device``: the device's
    compute dtype on a GPU; on a CPU bf16 where :func:`cpu_prefers_bf16`, else fp32."""
    device = device or default_device()
    if device == "cpu":
        return torch.bfloat16 if cpu_prefers_bf16(hidden_size) else torch.float32
    return default_compute_dtype(device)


def default_compute_dtype(device: str | None = None) -> torch.dtype:
    """The device's default compute dtype, whatever the model: fp32 on CPU, bf16 on GPUs where
    supported, else fp16 (on a CPU, :func:`auto_dtype` applies the bf16 rule for a model)."""
    device = device or default_device()
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The short name of a floating dtype lora_lab stores weights in (``"fp32"``, ``"bf16"``,
    ``"fp16"``), or None for any other."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def memory_limit_gb() -> float:
    """The memory this process may use, in GB (10⁹ bytes), from the first of: the ``MEM_LIMIT``
    environment variable (what mybinder.org sets: 2 GB there), the container's cgroup limit (v2
    ``memory.max``, then v1 ``memory.limit_in_bytes``; "max" or a huge number means none), and the
    machine's physical RAM.  Notebooks read it to choose what to run (e.g. skip a comparison that
    would not fit a Binder kernel)."""
    import os

    for source in (os.environ.get("MEM_LIMIT"), "/sys/fs/cgroup/memory.max",
                   "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = source if source is None or not source.startswith("/") else open(source).read().strip()
        except OSError:
            continue
        if value and value.isdigit() and 0 < int(value) < 2**60:
            return int(value) / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def free_memory_bytes(device: str | torch.device = "cpu") -> int | None:
    """Bytes a new allocation can take on ``device`` now, or None where that cannot be told.

    On a GPU, the CUDA driver's free memory (``torch.cuda.mem_get_info``).  On a CPU, the smaller
    of the kernel's ``MemAvailable`` (``/proc/meminfo``: free memory plus page cache it can drop)
    and this process's limit (:func:`memory_limit_gb`: Binder's ``MEM_LIMIT``, the cgroup, the RAM)
    less its anonymous memory (``RssAnon``; its mapped file pages, such as safetensors weights,
    can be dropped under the limit and are not counted)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    fields = {}
    for name in ("/proc/meminfo", "/proc/self/status"):
        try:
            with open(name) as fh:
                fields.update(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            return None
    try:
        available = int(fields["MemAvailable"].split()[0]) * 1024
        anon = int(fields["RssAnon"].split()[0]) * 1024
    except (KeyError, ValueError, IndexError):
        return None
    return max(0, min(available, int(memory_limit_gb() * 1e9) - anon))


def as_dtype(value, device: str | None = None, hidden_size: int | None = None) -> torch.dtype | None:
    """Turn ``"bf16"``, ``"float16"``, a ``torch.dtype`` or None into a ``torch.dtype`` (or None);
    ``"auto"`` is :func:`auto_dtype` of ``device`` for a model of ``hidden_size``."""
    from ...errors import LoraLabError

    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() == "auto":
        return auto_dtype(device, hidden_size)
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise LoraLabError(f"dtype {value!r} is not one lora_lab understands.",
                       f"pass 'auto' or one of {sorted(set(_DTYPES))} or a torch.dtype")


def four_bit_check() -> str:
    """Quantize and dequantize a small tensor with NF4 through bitsandbytes; report the outcome."""
    try:
        import bitsandbytes.functional as F

        device = default_device()
        w = torch.randn(256, 256, device=device)
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        err = float((F.dequantize_4bit(q, state) - w).norm() / w.norm())
        return f"works on {device} (NF4 round-trip relative error {err:.3f})"
    except Exception as exc:  # noqa: BLE001 - a diagnostic reports any failure
        return f"FAILS: {type(exc).__name__}: {exc}"
