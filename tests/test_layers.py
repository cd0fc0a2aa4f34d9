"""The architecture, checked from the imports (DESIGN.md, docs/architecture.md).

Layers, bottom to top: core → hf → export → train → viz → ui → cli.  A file may import its own
layer and the layers below it, and the root files ``errors``, ``specs``, ``control`` and
``_version``; those root files import only each other.  Only hf/ touches transformers, peft,
bitsandbytes, datasets and safetensors, and inside it the features import downwards too; ui/ and
viz/ import no torch; no subpackage imports the package root; no import circle exists (module-level
and function-level imports alike); no module imports another's private (underscore) names; no file
is over 400 lines.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lora_lab"
ORDER = ["core", "hf", "export", "train", "viz", "ui", "cli"]   # may import only to its left
ROOT_FILES = {"errors", "specs", "control", "_version"}           # importable from every layer
HF_ONLY = {"transformers", "peft", "bitsandbytes", "datasets", "safetensors"}
NO_TORCH = {"ui", "viz"}
HF_ORDER = ["_peft", "data", "model", "quant", "adapters", "spectra", "generate", "training"]
MAX_LINES = 400
FILES = sorted(PKG.rglob("*.py"))


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p) for p in FILES}


def imports(path: Path):
    """(absolute module, line) for every import in ``path``, at any depth; ``from X import m``
    where X.m is a module counts as importing X.m."""
    tree = ast.parse(path.read_text())
    package = module_of(path).split(".") if path.name == "__init__.py" else \
        module_of(path).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            if subs and len(subs) == len(node.names):
                for s in subs:
                    yield s, node.lineno
            else:
                yield target, node.lineno


def layer_of(module: str) -> str | None:
    """The layer of a lora_lab module; None for the root files and the package itself."""
    parts = module.split(".")
    if parts[0] != "lora_lab" or len(parts) < 2:
        return None
    if parts[1] == "cli":
        return "cli"
    return parts[1] if parts[1] in ORDER else None


def rel(path: Path) -> str:
    return str(path.relative_to(PKG))


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_every_file_has_a_layer_and_imports_point_down(path):
    me = module_of(path)
    layer = layer_of(me)
    root_file = me.split(".")[-1] in ROOT_FILES and me.count(".") == 1
    assert layer or root_file or me == "lora_lab", f"{rel(path)} belongs to no layer"
    for target, line in imports(path):
        top = target.split(".")[0]
        if top in HF_ONLY:
            assert layer == "hf", f"{rel(path)}:{line} imports {target}: only lora_lab/hf/ may"
        if top == "torch":
            assert layer not in NO_TORCH, f"{rel(path)}:{line} imports torch: {layer}/ takes records"
        if top != "lora_lab":
            continue
        assert target != "lora_lab" or me == "lora_lab", \
            f"{rel(path)}:{line} imports the package root (import what you need from its module)"
        if target.split(".")[1] in ROOT_FILES:
            continue
        assert not root_file and me != "lora_lab", \
            f"{rel(path)}:{line}: a root file may import only {sorted(ROOT_FILES)}, not {target}"
        theirs = layer_of(target)
        assert theirs is not None, f"{rel(path)}:{line} imports {target}, which has no layer"
        assert ORDER.index(theirs) <= ORDER.index(layer), \
            f"{rel(path)}:{line} ({layer}) imports {target} ({theirs}), a layer above it"


@pytest.mark.parametrize("path", sorted((PKG / "hf").rglob("*.py")), ids=rel)
def test_hf_features_import_downwards(path):
    """Inside hf/ the features are ordered too: peft's names, data, the model, quantization,
    adapters, then what reads adapters (spectra, generation) and the Trainer bridge."""
    parts = path.relative_to(PKG / "hf").with_suffix("").parts
    if len(parts) < 2 and parts[0] != "_peft":
        return                                                       # hf/__init__.py
    mine = HF_ORDER.index(parts[0])
    for target, line in imports(path):
        t = target.split(".")
        if t[:2] == ["lora_lab", "hf"] and len(t) > 2 and t[2] in HF_ORDER:
            assert HF_ORDER.index(t[2]) <= mine, \
                f"hf/{rel(path)}:{line} imports {target}, a feature above hf/{parts[0]}"


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for path in FILES:
        me = module_of(path)
        for target, _ in imports(path):
            while target and target not in MODULES:      # `from pkg.mod import name`
                target = target.rpartition(".")[0]
            if target and target != me and target.startswith("lora_lab"):
                graph[me].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a list of modules) if any, by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    circle = _cycle(_graph())
    assert circle is None, "import circle: " + " → ".join(circle)


def test_the_circle_finder_finds_circles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_layer_check_sees_relative_and_lazy_imports(tmp_path):
    """The import reader resolves ``from ..x import y`` and imports inside functions."""
    path = PKG / "hf" / "adapters" / "attach.py"
    found = {t for t, _ in imports(path)}
    assert "lora_lab.errors" in found and "lora_lab.hf.model.inspect" in found
    assert "peft" in found          # imported inside attach()


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_no_file_over_the_size_budget(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{rel(path)} has {n} lines (budget {MAX_LINES}): split it by topic"


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_no_module_imports_another_modules_private_names(path):
    """A name starting with ``_`` is private to its module: importing it from another module means
    the file border is in the wrong place (make it public, or move the code)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lora_lab")):
            private = [a.name for a in node.names if a.name.startswith("_")
                       and not a.name.startswith("__")]
            assert not private, f"{rel(path)}:{node.lineno} imports private {private} from {node.module}"
