"""The package's layout holds: files stay small, lower layers import nothing above them,
and only the runtime (and the top layers: compat, cli, testing) touch torch.distributed
(docs/DESIGN.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import hamilton_attn

PACKAGE = Path(hamilton_attn.__file__).resolve().parent
MAX_LINES = 600

#: Layer of each top-level module or folder: a module may import from its own layer and
#: the layers below it.
LAYER = {
    "config": 0, "tables": 0,
    "masks": 1,
    "merge": 2, "placement": 2, "topology": 2, "variants": 2,
    "kernels": 3, "schedule": 3,
    "attention": 4,
    "planner": 5,
    "runtime": 6,
    "api": 7, "testing": 7, "linear": 7,
    "compat": 8, "cli": 8, "__init__": 8, "__main__": 8,
    "integrations": 9,
}  # fmt: skip
#: Imports that cross upward on purpose: the planner reads a group's rank and size (and
#: resolves a DeviceMesh) through runtime.comm, and makes each plan's runtime state.
ALLOWED_UP = {("planner", "runtime.comm"), ("planner", "runtime.state")}
NO_DISTRIBUTED = {name for name, layer in LAYER.items() if layer <= 5}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield path, rel.parts


def _imports(path: Path, parts: tuple[str, ...]):
    """(absolute module inside the package or None, raw module name) of each import."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = list(parts[:-1])  # the package the module is in (a package's own __init__ too)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}".strip(".") for a in node.names]
                for m in names:
                    yield m, None
            elif node.module:
                yield None, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield None, a.name


def test_no_file_over_the_line_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p, _ in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_lower_layers_import_nothing_above_them():
    bad = []
    for path, parts in _modules():
        top = parts[0]
        for inside, _ in _imports(path, parts):
            if not inside:
                continue
            target = inside.split(".")[0]
            if target not in LAYER or target == top:
                continue
            if LAYER[target] > LAYER[top]:
                sub = ".".join(inside.split(".")[:2])
                if (top, sub) not in ALLOWED_UP:
                    bad.append(f"{'/'.join(parts)} imports {inside}")
    assert not bad, bad


def test_only_the_runtime_and_the_top_layers_touch_torch_distributed():
    bad = []
    for path, parts in _modules():
        if parts[0] not in NO_DISTRIBUTED:
            continue
        for _, raw in _imports(path, parts):
            if raw and raw.startswith("torch.distributed"):
                bad.append(f"{'/'.join(parts)} imports {raw}")
    assert not bad, bad
