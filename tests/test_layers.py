"""Imports point one way (DESIGN.md): ui -> viz -> train -> hf -> core, and only hf/ touches
transformers, peft, bitsandbytes, datasets and safetensors."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_lab"
ORDER = ["core", "hf", "train", "viz", "ui"]  # a layer may import only layers to its left
HF_ONLY = {"transformers", "peft", "bitsandbytes", "datasets", "safetensors"}


def imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, 0
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def layer_of(path: Path) -> str | None:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 and rel[0] in ORDER else None


def resolve(path: Path, module: str, level: int) -> str:
    if level == 0:
        return module
    base = list(path.relative_to(PKG).parts[:-1])
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(["lora_lab", *base, *([module] if module else [])])


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_layering(path):
    layer = layer_of(path)
    for module, level in imports(path):
        target = resolve(path, module, level)
        top = target.split(".")[0]
        if top in HF_ONLY:
            assert layer == "hf", f"{path.name} imports {target}: only lora_lab/hf/ may"
        parts = target.split(".")
        if layer and parts[0] == "lora_lab" and len(parts) > 1 and parts[1] in ORDER:
            assert ORDER.index(parts[1]) <= ORDER.index(layer), \
                f"{path.relative_to(PKG)} ({layer}) imports {target}, a layer above it"
