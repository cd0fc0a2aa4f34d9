"""Can vLLM or SGLang serve this saved adapter?  Read from its files; no model is loaded.

A serving engine does not run peft: it reads ``adapter_config.json`` and the ``lora_A``/``lora_B``
tensors itself and computes y = W·x + s·B·(A·x) with its own batched kernels (S-LoRA, Punica), where
A is (r × in), B is (out × r) and s = α/r (α/√r for rsLoRA).  Everything peft can put in an adapter
beyond that (DoRA's magnitude vector, trained biases, full copies of ``modules_to_save``, per-module
ranks) is either refused by the engine or, worse, silently dropped, so the served model differs from
the one you trained.  :func:`check_serving` lists each such finding with its reason and the place in
the engine's documentation or source that sets the limit (checked in 2026-12; engines move, so
each :class:`Finding` names its source):

* vLLM: ``vllm/config/lora.py`` (``MaxLoRARanks``), ``vllm/lora/peft_helper.py``
  (``PEFTHelper._validate_features``, ``validate_legal``) and https://docs.vllm.ai/en/latest/features/lora/;
* SGLang: ``python/sglang/srt/lora/lora_manager.py`` (``validate_new_adapter``),
  ``lora_config.py``, ``lora.py``, ``utils.py`` and https://docs.sglang.io/advanced_features/lora.html.

The reading is cheap: the JSON config and the safetensors header (8-byte length + JSON of names and
shapes), never the tensors, so a 7B adapter is checked in milliseconds.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import AdapterError

__all__ = ["ENGINES", "VLLM_MAX_LORA_RANKS", "Finding", "SavedAdapter", "ServingCheck",
           "check_serving", "read_saved_adapter", "vllm_max_lora_rank"]

ENGINES = ("vllm", "sglang")
# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] (default 16).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The projections both engines adapt in a Llama-style decoder; q/k/v and gate/up are served fused
# (qkv_proj, gate_up_proj): vLLM packed_modules_mapping, SGLang lora/utils.get_normalized_target_modules.
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj")
VOCAB_TARGETS = ("embed_tokens", "lm_head")
# Architectures whose vLLM and SGLang model classes take LoRA (vLLM: SupportsLoRA).
KNOWN_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                       "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
                       "Phi3ForCausalLM")

SRC = {
    "v_ranks": "vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]",
    "v_legal": "vllm/lora/peft_helper.py: PEFTHelper.validate_legal "
               "('LoRA rank {r} is greater than max_lora_rank', 'Adapter bias is not supported.')",
    "v_feat": "vllm/lora/peft_helper.py: PEFTHelper._validate_features",
    "v_scale": "vllm/lora/peft_helper.py: vllm_lora_scaling_factor = lora_alpha / math.sqrt(r) "
               "when use_rslora",
    "v_fields": "vllm/lora/peft_helper.py: required fields r, lora_alpha, target_modules",
    "v_mods": "vllm/lora/models.py: LoRAModel.from_local_checkpoint "
              "('expected target modules in ... but received ...')",
    "v_vocab": "vllm/config/lora.py: lora_extra_vocab_size deprecated ('Additional vocabulary "
               "support for LoRA adapters is being phased out')",
    "v_pattern": "vllm/lora/peft_helper.py: PEFTHelper.get_rank_and_scaling (recent vLLM only)",
    "v_arch": "https://docs.vllm.ai/en/latest/features/lora/ (models implementing SupportsLoRA)",
    "s_val": "python/sglang/srt/lora/lora_manager.py: LoRAManager.validate_new_adapter "
             "('LoRA serving currently doesn't support DoRA adapters')",
    "s_rank": "docs.sglang.io/advanced_features/lora.html: max_lora_rank (any integer, inferred "
              "from --lora-paths when not given)",
    "s_cfg": "python/sglang/srt/lora/lora_config.py: LoRAConfig reads target_modules, r, "
             "lora_alpha, rank_pattern, alpha_pattern, use_dora only",
    "s_scale": "python/sglang/srt/lora/lora.py: LoRAAdapter.scaling = lora_alpha / r",
    "s_type": "python/sglang/srt/lora/lora.py: assert hf_config['peft_type'].lower() == 'lora'",
    "s_pattern": "python/sglang/srt/lora/lora_config.py: rank_overrides / alpha_overrides, refused "
                 "at load (TestLoRAPatternValidation)",
    "s_mods": "python/sglang/srt/server_args.py: --lora-target-modules choices="
              "SUPPORTED_LORA_TARGET_MODULES + ['all']",
    "s_vocab": "python/sglang/srt/lora/utils.py: get_hidden_dim handles embed_tokens / lm_head "
               "(recent SGLang only)",
    "peft_init": "peft LoraConfig.init_lora_weights: pissa/olora/corda/loftq change the base W",
}


@dataclass(frozen=True)
class Finding:
    """One thing an engine does with one adapter option.

    ``level``: ``"error"`` (the engine refuses the adapter, or serves a model that differs from
    peft's), ``"warning"`` (depends on the engine's version or on your base model), ``"ok"``.
    ``source``: where the limit is written (file and function, or documentation page)."""

    engine: str
    level: str
    topic: str
    message: str
    source: str = ""


@dataclass(frozen=True, eq=False)
class SavedAdapter:
    """A saved peft adapter as files: its config and its tensors' names and shapes."""

    path: str
    config: dict
    tensors: dict = field(repr=False)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def rank(self) -> int | None:
        """The largest rank of any module: max(r, rank_pattern values); None if not LoRA."""
        r = self.config.get("r")
        if self.peft_type != "LORA" or not isinstance(r, int):
            return None
        return max([r, *(self.config.get("rank_pattern") or {}).values()])

    @property
    def modules(self) -> tuple[str, ...]:
        """The adapted module types (the names' last part: ``q_proj``), from the tensors."""
        names = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in self.tensors if ".lora_" in k}
        return tuple(sorted(names))

    @property
    def extra_tensors(self) -> tuple[str, ...]:
        """Tensors that are not LoRA factors (DoRA magnitudes, biases, modules_to_save copies)."""
        plain = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")
        return tuple(k for k in self.tensors if not any(p in k for p in plain))

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def architecture(self, base: str | None = None) -> str | None:
        """The base model's class from its ``config.json`` when ``base`` is a local folder."""
        cfg = Path(base or self.base or "") / "config.json"
        try:
            archs = json.loads(cfg.read_text()).get("architectures") or [None]
        except (OSError, ValueError):
            return None
        return archs[0]


def read_saved_adapter(path) -> SavedAdapter:
    """Read ``adapter_config.json`` and the header of ``adapter_model.safetensors`` in ``path``."""
    path = Path(path)
    fix = "pass the folder written by lora_lab.save_adapter or peft's save_pretrained"
    if not path.is_dir():
        raise AdapterError(f"{path} is not a folder (a saved adapter is a folder).", fix)
    cfg_file, st_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists():
        raise AdapterError(f"{path} is not a saved adapter (no adapter_config.json).", fix)
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise AdapterError(f"{cfg_file} is not valid JSON ({exc}).", "save the adapter again") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{cfg_file} has no peft_type: it is not a peft adapter config.", fix)
    r = config.get("r")
    if str(config["peft_type"]).upper() == "LORA" and not (isinstance(r, int) and r >= 1):
        raise AdapterError(f"{cfg_file} is a LoRA config without a valid rank r (r={r!r}).",
                           "save the adapter again with peft or lora_lab")
    if not st_file.exists():
        bins = " (only a pickled .bin file)" if list(path.glob("*.bin")) else ""
        raise AdapterError(f"{path} has no adapter_model.safetensors{bins}.",
                           "re-save it as safetensors: save_pretrained(..., safe_serialization=True); "
                           "vLLM and SGLang read safetensors")
    return SavedAdapter(str(path), config, _header(st_file))


def _header(file: Path) -> dict:
    """``{name: shape}`` from a safetensors header: u64 little-endian n, then n bytes of JSON."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            head = json.loads(f.read(n)) if n < 100_000_000 else None
    except (OSError, struct.error, ValueError):
        head = None
    if not isinstance(head, dict):
        raise AdapterError(f"{file} is not a readable safetensors file.", "save the adapter again")
    return {k: tuple(v.get("shape", ())) for k, v in head.items() if k != "__metadata__"}


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest value vLLM accepts for ``--max-lora-rank`` that holds ``rank`` (None above 512).
    vLLM sizes every adapter slot for this rank, so an r=24 adapter costs an r=32 slot."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


@dataclass(frozen=True)
class ServingCheck:
    """Findings for one adapter and one engine; ``ok`` when nothing stops serving it as trained."""

    engine: str
    path: str
    findings: tuple[Finding, ...]
    rank: int | None
    modules: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "error")

    def __str__(self) -> str:
        verdict = "can be served" if self.ok else f"CANNOT be served as trained ({len(self.errors)} error(s))"
        lines = [f"{self.engine}: {self.path}: {verdict}"]
        for f in self.findings:
            lines.append(f"  [{f.level:<7}] {f.topic}: {f.message}")
            if f.source:
                lines.append(f"            source: {f.source}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        colour = {"error": "#b00020", "warning": "#a66300", "ok": "#1b7f3b"}
        rows = "".join(
            f"<tr><td style='color:{colour.get(f.level, '')}'><b>{f.level}</b></td>"
            f"<td>{escape(f.topic)}</td><td>{escape(f.message)}</td>"
            f"<td><small>{escape(f.source)}</small></td></tr>" for f in self.findings)
        head = "can be served" if self.ok else "cannot be served as trained"
        return (f"<p><b>{escape(self.engine)}</b>: <code>{escape(self.path)}</code>: {head}</p>"
                f"<table><tr><th>level</th><th>topic</th><th>why</th><th>source</th></tr>{rows}</table>")


def check_serving(adapter, engine: str = "vllm", base: str | None = None) -> ServingCheck:
    """Check the adapter saved in folder ``adapter`` (or a :class:`SavedAdapter`) against ``engine``
    (``"vllm"`` or ``"sglang"``).  ``base`` names the base model (a local folder lets the check read
    its architecture); default: the adapter's ``base_model_name_or_path``."""
    if engine not in ENGINES:
        raise AdapterError(f"engine {engine!r} is not known.", f"pass one of {ENGINES}")
    a = adapter if isinstance(adapter, SavedAdapter) else read_saved_adapter(adapter)
    arch = a.architecture(base)
    found = _method(a, engine)
    if a.peft_type == "LORA":
        found += ((_vllm if engine == "vllm" else _sglang)(a) + _common(a, engine)
                  + _targets(a, engine, arch))
    found += _architecture(a, engine, base, arch)
    return ServingCheck(engine, a.path, tuple(found), a.rank, a.modules)


def _f(engine, level, topic, message, src=""):
    return Finding(engine, level, topic, message, SRC.get(src, src))


def _method(a: SavedAdapter, e: str) -> list[Finding]:
    if a.peft_type == "LORA":
        return [_f(e, "ok", "method", "LoRA (the only method either engine serves)",
                   "v_fields" if e == "vllm" else "s_type")]
    why = ("vLLM serves LoRA adapters only (PEFTHelper needs r, lora_alpha, target_modules)" if e == "vllm"
           else "SGLang serves LoRA adapters only")
    fix = ("merge it into the base weights (peft's merge_and_unload) and serve the merged model, "
           "or train a LoRA adapter" if a.peft_type == "IA3" else
           "train a LoRA adapter (virtual tokens cannot be merged into weights)"
           if "TUNING" in a.peft_type else "train a LoRA adapter")
    return [_f(e, "error", "method", f"{a.peft_type} adapter: {why}. Fix: {fix}",
               "v_fields" if e == "vllm" else "s_type")]


def _vllm(a: SavedAdapter) -> list[Finding]:
    e, c, r = "vllm", a.config, a.rank
    out = []
    cap = vllm_max_lora_rank(r)
    if cap is None:
        out.append(_f(e, "error", "rank", f"rank {r} > 512, the largest --max-lora-rank vLLM allows. "
                      "Fix: cut the adapter to rank <= 512 (lora_lab.compress_adapter)", "v_ranks"))
    else:
        extra = "" if cap == r else (f"; {r} is not an allowed value, so every adapter slot is "
                                     f"sized for rank {cap}")
        out.append(_f(e, "ok", "rank", f"rank {r}: serve with --max-lora-rank {cap} (allowed: "
                      f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}; default 16){extra}", "v_ranks"))
    if c.get("use_rslora"):
        out.append(_f(e, "ok", "rslora", f"rsLoRA: vLLM scales by α/√r = {_scale(c):.4g}, as peft does "
                      "(early versions of PEFTHelper refused rsLoRA)", "v_scale"))
    if c.get("modules_to_save"):
        out.append(_f(e, "error", "modules_to_save", f"modules_to_save={c['modules_to_save']}: vLLM "
                      "only supports modules_to_save being None (or classifier/score heads). Fix: "
                      "serve a merged model (lora_lab.export_merged)", "v_feat"))
    if c.get("bias", "none") != "none":
        out.append(_f(e, "error", "bias", f"bias={c['bias']!r}: trained base biases are not loaded "
                      "('Adapter bias is not supported.'). Fix: retrain with bias='none' or merge",
                      "v_legal"))
    if _patterned(c):
        out.append(_f(e, "warning", "patterns", f"per-module rank/alpha ({_patterns(c)}): recent vLLM "
                      "applies them; older versions use r and lora_alpha everywhere and serve a "
                      "different model. Fix: check your vLLM has PEFTHelper.get_rank_and_scaling",
                      "v_pattern"))
    return out


def _sglang(a: SavedAdapter) -> list[Finding]:
    e, c, r = "sglang", a.config, a.rank
    out = [_f(e, "ok", "rank", f"rank {r}: serve with --max-lora-rank {r} (SGLang takes any "
              "integer and sizes its memory pool for it)", "s_rank")]
    if c.get("use_rslora"):
        fixed = float(c.get("lora_alpha", 0)) * math.sqrt(c.get("r", 1))
        out.append(_f(e, "error", "rslora", f"rsLoRA: SGLang ignores use_rslora and scales by α/r "
                      f"instead of α/√r, so the update is {math.sqrt(c.get('r', 1)):.3g}× too small. "
                      f"Fix: in a copy of the folder set use_rslora=false and lora_alpha={fixed:.6g} "
                      "(α·√r: the same scale)", "s_scale"))
    if c.get("modules_to_save"):
        out.append(_f(e, "error", "modules_to_save", f"modules_to_save={c['modules_to_save']}: "
                      "SGLang's LoRAConfig does not read it, so the trained copies of these modules "
                      "are not served. Fix: serve a merged model (lora_lab.export_merged)", "s_cfg"))
    if c.get("bias", "none") != "none":
        out.append(_f(e, "error", "bias", f"bias={c['bias']!r}: SGLang's LoRAConfig does not read "
                      "it; the trained biases are not served. Fix: retrain with bias='none' or merge",
                      "s_cfg"))
    if _patterned(c):
        out.append(_f(e, "error", "patterns", f"per-module rank/alpha ({_patterns(c)}): SGLang refuses "
                      "adapters whose rank_pattern/alpha_pattern change a module's rank or alpha. "
                      "Fix: save with one r and lora_alpha for all modules", "s_pattern"))
    if isinstance(c.get("target_modules"), str):
        out.append(_f(e, "ok", "target_modules", f"target_modules={c['target_modules']!r} is a "
                      "pattern SGLang cannot always resolve; the recipe names the modules with "
                      "--lora-target-modules", "s_cfg"))
    return out


def _common(a: SavedAdapter, e: str) -> list[Finding]:
    c, out = a.config, []
    cfg_src = "v_feat" if e == "vllm" else "s_cfg"
    if c.get("use_dora"):
        out.append(_f(e, "error", "dora", "DoRA: the engine has no magnitude vector m in "
                      "W' = m ⊙ (W + s·BA)/‖W + s·BA‖_row, so it does not serve DoRA adapters. "
                      "Fix: serve a merged model (lora_lab.export_merged), or retrain without DoRA",
                      "v_feat" if e == "vllm" else "s_val"))
    if c.get("lora_bias"):
        out.append(_f(e, "error", "lora_bias", "lora_bias=True: the bias of lora_B is not served. "
                      "Fix: retrain with lora_bias=False, or merge with peft's merge_and_unload",
                      cfg_src))
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in ("pissa", "olora", "corda", "loftq"):
        out.append(_f(e, "error", "init", f"init_lora_weights={init!r}: this init changed the base "
                      "weights W while training; served on the original base the output is wrong. "
                      "Fix: convert it with peft's path_initial_model_for_weight_conversion "
                      "(save_pretrained) into a plain LoRA adapter", "peft_init"))
    for opt in ("layer_replication", "use_qalora", "alora_invocation_tokens", "use_bdlora",
                "trainable_token_indices"):
        if c.get(opt):
            out.append(_f(e, "error", opt, f"{opt}={c[opt]!r}: a peft option the engine does not "
                          "implement. Fix: merge with peft's merge_and_unload and serve the merged model",
                          cfg_src))
    if c.get("layers_to_transform") is not None or c.get("layers_pattern"):
        out.append(_f(e, "ok", "layers", f"layers_to_transform={c.get('layers_to_transform')}: only "
                      "those layers have tensors in the file; the engine loads the modules it finds, "
                      "the other layers run the base", "v_mods" if e == "vllm" else "s_cfg"))
    return out


def _targets(a: SavedAdapter, e: str, arch: str | None) -> list[Finding]:
    """Module names against the Llama-style projections both engines adapt.  On a known Llama-style
    architecture another name is an error; on another architecture its own names may be fine."""
    src, vocab_src = ("v_mods", "v_vocab") if e == "vllm" else ("s_mods", "s_vocab")
    mods = a.modules
    bad = [m for m in mods if m not in LINEAR_TARGETS + VOCAB_TARGETS]
    out = [_f(e, "ok", "target_modules", f"adapted modules: {', '.join(mods) or 'none'}", src)]
    if bad and arch in KNOWN_ARCHITECTURES:
        out.append(_f(e, "error", "target_modules", f"modules {bad} are not among those the engine "
                      f"adapts in {arch} ({', '.join(LINEAR_TARGETS)}). Fix: retrain targeting "
                      "the attention and MLP projections", src))
    elif bad:
        out.append(_f(e, "warning", "target_modules", f"modules {bad} are not Llama-style names: "
                      f"check that the engine adapts them in {arch or 'this base model'}", src))
    vocab = [m for m in mods if m in VOCAB_TARGETS]
    if vocab:
        out.append(_f(e, "warning", "target_modules", f"LoRA on {vocab}: supported only by some "
                      "engine versions and models. Fix: retrain without them, or merge", vocab_src))
    if not mods:
        out.append(_f(e, "error", "target_modules", "the file holds no lora_A/lora_B tensors",
                      src))
    return out


def _architecture(a: SavedAdapter, e: str, base: str | None, arch: str | None) -> list[Finding]:
    if arch is None:
        return [_f(e, "warning", "architecture", f"base {base or a.base!r} is not a local folder, so "
                   "its architecture was not checked: it must be one the engine serves LoRA on",
                   "v_arch" if e == "vllm" else "s_cfg")]
    level = "ok" if arch in KNOWN_ARCHITECTURES else "warning"
    note = "takes LoRA in vLLM and SGLang" if level == "ok" else "not in lora_lab's list of " \
        "architectures known to take LoRA: check the engine's supported-models page"
    return [_f(e, level, "architecture", f"base model class {arch}: {note}", "v_arch")]


def _scale(c: dict) -> float:
    r = c.get("r") or 1
    return float(c.get("lora_alpha", r)) / (math.sqrt(r) if c.get("use_rslora") else r)


def _patterned(c: dict) -> bool:
    r, alpha = c.get("r"), c.get("lora_alpha")
    return (any(v != r for v in (c.get("rank_pattern") or {}).values())
            or any(v != alpha for v in (c.get("alpha_pattern") or {}).values()))


def _patterns(c: dict) -> str:
    return f"rank_pattern={c.get('rank_pattern') or {}}, alpha_pattern={c.get('alpha_pattern') or {}}"
