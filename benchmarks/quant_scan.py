"""Benchmark: streaming quantization scan (memory, throughput) and one-SVD low-rank recovery.

Run:  nice python benchmarks/quant_scan.py  [--size 4096 --n 8 --schemes nf4,fp4,int8]
      [--model /path/to/fp32/model]
      python benchmarks/quant_scan.py --quick     # 2 tensors of 1024×1024, nf4 only (no targets)

1. Memory.  A synthetic checkpoint of ``n`` tensors of size×size fp16 is written to a temp dir.
   Two fresh subprocesses each scan it and report their peak RSS increase (VmHWM, reset through
   /proc/self/clear_refs after imports and warm-up, minus VmRSS then): one streams the file with
   ``scan_quantization(path)``, the other loads the whole state dict first.  Target: streaming
   stays under 3× the largest tensor's fp32 size.
2. Throughput.  ``scan_quantization(path)`` against a bare bitsandbytes quantize + dequantize loop
   over the same tensors already in memory, same schemes.  Target: scan ≥ 80 % of the bare loop.
3. Low-rank recovery of one size×size weight at ranks (8, 16, 32, 64): the single truncated SVD
   that ``lowrank_recovery`` uses, against one SVD per rank.
4. With ``--model``, a real model (a folder ``load_model`` reads, e.g. SmolLM2-135M in fp32):
   * int8 is LLM.int8().  Its weights: ``roundtrip("int8")`` against the int8 weights of a real
     ``load_model(quant="int8")`` (max |difference|).  Its logits on a few chat prompts: the KL
     (p_fp32 ‖ p_int8) per token that ``quantized_output_error(..., "int8")`` predicts, against the
     real int8 model's, next to what the weights alone give and what blockwise int8 gives.
   * the scan's weight error against the logit KL for NF4 and FP4, and whether the scan flags the
     weights as already on a 4-bit grid (a GGUF Q4 model converted back to fp32: there NF4 has the
     lower weight error but the higher KL).
Every ratio is against a baseline measured in the same run.  The last line of the output is the
JSON line of ``benchmarks/_report.py``.

glibc's dynamic mmap threshold lets the heap keep freed 1-8 MB temporaries (bitsandbytes' CPU
kernels allocate many); run once more with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment to
see the peak without that effect.  On a shared machine, ``--threads 1`` avoids OpenMP contention.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MB = 2**20


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakSampler:
    """Samples VmRSS every millisecond in a thread: the kernel updates VmHWM lazily, so both are
    reported."""

    def __init__(self):
        import threading

        self.peak, self._stop = status_kb("VmRSS"), False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, status_kb("VmRSS"))
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def child(mode: str, path: str, schemes: list[str]) -> None:
    """Run in a fresh process: scan ``path`` and print the peak RSS increase as JSON."""
    import safetensors.torch

    from lora_lab.hf.quant.scan import scan_quantization

    # warm up imports (pandas, tqdm), kernels and the allocator outside the measurement
    scan_quantization({"warm.up.weight": torch.randn(256, 256, dtype=torch.float16)},
                      schemes=schemes, progress=False)
    start = status_kb("VmRSS")
    was_reset = reset_peak()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        if mode == "stream":
            scan = scan_quantization(path, schemes=schemes, progress=False)
        else:
            state = safetensors.torch.load_file(path)
            scan = scan_quantization(state, schemes=schemes, progress=False)
    secs = time.perf_counter() - t0
    hwm = (status_kb("VmHWM") - start) / 1024 if was_reset else float("nan")
    print(json.dumps({"mode": mode, "increase_mb": max((sampler.peak - start) / 1024, hwm),
                      "sampled_mb": (sampler.peak - start) / 1024, "hwm_mb": hwm,
                      "seconds": secs, "rows": len(scan.table)}))


def run_child(mode: str, path: Path, schemes: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path),
                          "--schemes", ",".join(schemes), "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_checkpoint(folder: Path, n: int, size: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.mlp.up_proj.weight":
             (0.02 * torch.randn(size, size, generator=g)).half() for i in range(n)}
    path = folder / "model.safetensors"
    save_file(state, path)
    return path


def bare_loop(tensors: list[torch.Tensor], schemes: list[str]) -> float:
    import bitsandbytes.functional as F

    t0 = time.perf_counter()
    for w in tensors:
        for s in schemes:
            if s in ("int8", "llm.int8"):                      # LLM.int8(): one absmax per row
                cb, scb, _ = F.int8_vectorwise_quant(w.half())
                F.int8_vectorwise_dequant(cb, scb)
            elif s == "int8-blockwise":
                q, st = F.quantize_blockwise(w, blocksize=64)
                F.dequantize_blockwise(q, st)
            else:
                q, st = F.quantize_4bit(w, blocksize=64, quant_type=s)
                F.dequantize_4bit(q, st)
    return time.perf_counter() - t0


def bench_memory(path: Path, size: int, schemes: list[str]) -> dict:
    fp32_mb = size * size * 4 / MB
    stream = run_child("stream", path, schemes)
    full = run_child("full", path, schemes)
    print(f"[memory] largest tensor fp32: {fp32_mb:.0f} MB (limit 3× = {3 * fp32_mb:.0f} MB); "
          f"increase = max(sampled VmRSS, VmHWM) over the RSS after warm-up")
    for r in (stream, full):
        print(f"[memory]   {r['mode']:6s}: sampled {r['sampled_mb']:.1f} MB, VmHWM {r['hwm_mb']:.1f} MB,"
              f" {r['seconds']:.1f} s, {r['rows']} rows")
    print(f"[memory] streaming scan peak RSS increase : {stream['increase_mb']:8.1f} MB "
          f"= {stream['increase_mb'] / fp32_mb:.2f}× largest fp32 tensor "
          f"({'OK' if stream['increase_mb'] < 3 * fp32_mb else 'OVER'})")
    print(f"[memory] load state dict, then scan      : {full['increase_mb']:8.1f} MB "
          f"= {full['increase_mb'] / fp32_mb:.2f}×")
    print(f"[memory] ratio full / streaming          : {full['increase_mb'] / stream['increase_mb']:.2f}×")
    return {"stream_increase/largest_fp32": stream["increase_mb"] / fp32_mb,
            "full_increase/stream_increase": full["increase_mb"] / stream["increase_mb"]}


def bench_throughput(path: Path, schemes: list[str]) -> dict:
    from safetensors.torch import load_file

    from lora_lab.hf.quant.scan import scan_quantization

    tensors = list(load_file(path).values())
    bare_loop(tensors[:1], schemes)  # warm-up
    best_bare = best_scan = float("inf")
    for _ in range(2):  # interleaved, best of two: the machine is shared
        best_bare = min(best_bare, bare_loop(tensors, schemes))
        t0 = time.perf_counter()
        scan_quantization(path, schemes=schemes, progress=False)
        best_scan = min(best_scan, time.perf_counter() - t0)
    n = len(tensors) * len(schemes)
    ratio = best_bare / best_scan
    print(f"[speed] bare bnb quantize+dequantize : {best_bare:6.2f} s ({n / best_bare:.2f} round trips/s)")
    print(f"[speed] scan_quantization (streamed) : {best_scan:6.2f} s ({n / best_scan:.2f} round trips/s)")
    print(f"[speed] scan throughput / bare loop  : {ratio:.0%} ({'OK' if ratio >= 0.8 else 'BELOW'} 80%)")
    return {"scan_throughput/bare_loop": ratio}


def bench_lowrank(size: int, ranks=(8, 16, 32, 64)) -> dict:
    from lora_lab.core.lowrank import truncated_svd
    from lora_lab.hf.quant.roundtrip import lowrank_recovery, roundtrip

    g = torch.Generator().manual_seed(1)
    w = 0.02 * torch.randn(size, size, generator=g)
    w += torch.randn(size, 32, generator=g) @ torch.randn(32, size, generator=g) * 0.004
    E = w - roundtrip("nf4")(w)
    t0 = time.perf_counter()
    truncated_svd(E, max(ranks))
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in ranks:
        truncated_svd(E, r)
    per_rank = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = lowrank_recovery(w, "nf4", ranks=ranks)
    total = time.perf_counter() - t0
    print(f"[lowrank] one truncated SVD at r={max(ranks)}: {one:.2f} s; one per rank: {per_rank:.2f} s "
          f"({per_rank / one:.1f}× more)")
    print(f"[lowrank] lowrank_recovery({size}×{size}, nf4, {ranks}): {total:.2f} s -> {res!r}")
    return {"svd_per_rank/one_svd": per_rank / one}


PROMPTS = ("What is the capital of France?", "Write a short poem about the sea.",
           "Explain how a transformer language model works in two sentences.",
           "List three prime numbers and explain why they are prime.",
           "Translate 'good morning' into Spanish and German.", "What is 12 times 7?",
           "Give me a recipe for pancakes.", "Who wrote Romeo and Juliet?")


def token_kl(z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    """KL(p_z ‖ p_zq) per token (nats) of logits shaped (..., vocab)."""
    logp, logq = torch.log_softmax(z.float(), -1), torch.log_softmax(zq.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).reshape(-1)


def bench_real_model(source: str) -> None:
    import bitsandbytes.functional as F

    import lora_lab as ll
    from lora_lab.hf.quant.output import quantized_output_error
    from lora_lab.hf.quant.roundtrip import roundtrip

    fp, tok = ll.load_model(source, device="cpu")
    q8, _ = ll.load_model(source, quant="int8", device="cpu")
    fp.eval(), q8.eval()
    params = dict(fp.named_parameters())
    int8 = {n: m for n, m in q8.named_modules() if type(m).__name__ == "Linear8bitLt"}
    diff = max((F.int8_vectorwise_dequant(m.weight.data, m.weight.SCB if m.weight.SCB is not None
                                          else m.state.SCB)
                - roundtrip("int8")(params[n + ".weight"].detach())).abs().max().item()
               for n, m in int8.items())
    print(f"[int8] roundtrip('int8') vs the weights of load_model(quant='int8'): {len(int8)} "
          f"layers, max |difference| {diff:.3g}")
    batches = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), return_tensors="pt")
               for p in PROMPTS]            # one prompt per batch: no padding
    with torch.no_grad():
        ref = [fp(**b).logits for b in batches]
        real = torch.cat([token_kl(z, q8(**b).logits) for z, b in zip(ref, batches)])
        saved = {n: params[n + ".weight"].data for n in int8}
        for n in int8:                      # LLM.int8() weights alone, fp32 inputs
            params[n + ".weight"].data = roundtrip("int8")(saved[n])
        weights_only = torch.cat([token_kl(z, fp(**b).logits) for z, b in zip(ref, batches)])
        for n, w in saved.items():
            params[n + ".weight"].data = w
    data = [dict(b) for b in batches]
    t0 = time.perf_counter()
    pred = quantized_output_error(fp, data, "int8", per_layer=False, max_batches=len(data))
    secs = time.perf_counter() - t0
    block = quantized_output_error(fp, data, "int8-blockwise", per_layer=False,
                                   max_batches=len(data))
    print(f"[int8] {len(PROMPTS)} prompts, {real.numel()} tokens; KL(p_fp32 ‖ p_int8) per token:")
    print(f"[int8]   real load_model(quant='int8')         : {real.mean():.4f} nats "
          f"(median {real.median():.4f})")
    print(f"[int8]   quantized_output_error('int8')       : {pred.kl:.4f} nats "
          f"= {pred.kl / real.mean():.3f}× real ({secs:.1f} s)")
    print(f"[int8]   LLM.int8() weights alone (fp32 inputs): {weights_only.mean():.4f} nats "
          f"= {weights_only.mean() / real.mean():.3f}× real")
    print(f"[int8]   quantized_output_error('int8-blockwise'): {block.kl:.4f} nats "
          f"= {block.kl / real.mean():.3f}× real")
    bench_grid(fp, data)


def bench_grid(fp, data) -> None:
    from lora_lab.hf.quant.output import quantized_output_error
    from lora_lab.hf.quant.scan import scan_quantization

    scan = scan_quantization(fp, schemes=("nf4", "fp4"), progress=False)
    t = scan.table.pivot(index="name", columns="scheme", values="rel_error")
    print(f"[grid] median distinct values per 32 weights: {scan.table.levels_per_32.median():.0f}"
          f" -> flagged as already 4-bit: {scan.prequantized}")
    print(f"[grid] NF4 weight error below FP4's on {(t.nf4 < t.fp4).sum()}/{len(t)} layers "
          f"(mean {t.nf4.mean():.4f} vs {t.fp4.mean():.4f})")
    for s in ("nf4", "fp4"):
        out = quantized_output_error(fp, data, s, per_layer=False, max_batches=len(data))
        print(f"[grid] {s}: logit KL {out.kl:.3f} nats, top-1 kept {out.top1_agreement:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--schemes", default="nf4,fp4,int8")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help="comma list of memory,speed,lowrank to skip")
    ap.add_argument("--model", default="", help="a full-precision model folder for phase 4")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for every phase (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="2 tensors of 1024×1024, nf4 only")
    args = ap.parse_args()
    if args.quick:
        args.size, args.n, args.schemes = 1024, 2, "nf4"
    schemes = args.schemes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], args.child[1], schemes)
    import _report  # not at the top: the --child processes do not need it

    skip = set(filter(None, args.skip.split(",")))
    ratios: dict = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.n} tensors {args.size}×{args.size} fp16, schemes {schemes}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp), args.n, args.size)
        print(f"checkpoint: {path.stat().st_size / MB:.0f} MB")
        if "memory" not in skip:
            ratios.update(bench_memory(path, args.size, schemes))
        if "speed" not in skip:
            ratios.update(bench_throughput(path, schemes))
    if "lowrank" not in skip:
        ratios.update(bench_lowrank(args.size))
    if args.model:
        bench_real_model(args.model)
    # the targets hold for real tensor sizes; at --quick's 1024² fixed costs (imports, file opening)
    # dominate both ratios, so a quick run only shows that every phase runs
    targets = {} if args.quick else {k: t for k, t in (("stream_increase/largest_fp32", "< 3"),
                                                       ("scan_throughput/bare_loop", ">= 0.8"))
                                     if k in ratios}
    _report.report("quant_scan", ratios, targets, quick=args.quick,
                   extra={"size": args.size, "n": args.n, "schemes": schemes, "skip": sorted(skip),
                          "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
