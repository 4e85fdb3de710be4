"""The layout is a stack of layers, and every import of ckconv's own code points down it (docs/architecture.md).

Read from the source, not from ``sys.modules``: every ``import`` and ``from ... import`` counts, those inside
functions and under ``if TYPE_CHECKING`` too. An import may go to a lower layer, or sideways inside one layer as
long as no circle forms. Built-in plugins are reached only through the plugin host, as third-party ones are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Bottom to top. A name is a module, or a package standing for every module under it.
LAYERS = [
    ("foundation", ["ckconv.errors", "ckconv.hookspecs", "ckconv.dtypes"]),
    ("storage", ["ckconv.storage"]),
    ("values", ["ckconv.model", "ckconv.numpy_values", "ckconv.tree"]),
    ("pickling", ["ckconv.pickling"]),
    ("contents", ["ckconv.contents"]),
    ("contracts", ["ckconv.formats", "ckconv.architectures", "ckconv.rules"]),  # formats/: contract and toolkit
    ("built-in plugins", ["ckconv.formats.torchscript", "ckconv.formats.torch_pickle", "ckconv.formats.torch_sharded",
                          "ckconv.formats.safetensors_format", "ckconv.formats.dcp", "ckconv.formats.torch_export",
                          "ckconv.formats.deepspeed",
                          "ckconv.architectures_torchvision"]),
    ("host", ["ckconv.plugins"]),
    ("io", ["ckconv.io", "ckconv.torchrun"]),
    ("stages", ["ckconv.matching", "ckconv.bundles", "ckconv.reports"]),
    ("orchestration", ["ckconv.conversion"]),
    ("face", ["ckconv.api", "ckconv"]),
    ("cli", ["ckconv.cli", "ckconv.__main__"]),
]
HOST = "ckconv.plugins"
MAX_LINES = 500


def modules() -> dict:
    """{module name: path} for every module under src/ckconv."""
    out = {}
    for path in sorted((SRC / "ckconv").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def owner(name: str, table) -> tuple:
    """The (index, entry) of the longest table entry that is ``name`` or a package above it."""
    best = None
    for i, (_, entries) in enumerate(table):
        for entry in entries:
            inside = name.startswith(entry + ".") and entry != "ckconv"  # the face is the root module alone
            if (name == entry or inside) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best


def layer(name: str):
    found = owner(name, LAYERS)
    return None if found is None else found[0]


def plugin_of(name: str):
    """The built-in plugin module a module belongs to (itself or its package), or None."""
    found = owner(name, LAYERS)
    if found is None or LAYERS[found[0]][0] != "built-in plugins":
        return None
    return found[1]


def imports(name: str, path: Path) -> list:
    """[(line, imported ckconv module)] of every import statement in the module, wherever it stands."""
    known = modules()
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ckconv"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ckconv":
                continue
            for alias in node.names:  # `from . import tree` imports the module ckconv.tree
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in known else target))
    return sorted(set(out))


def only_a_docstring(path: Path) -> bool:
    """A package's ``__init__`` that only says what the package holds (it needs no line of its own)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def graph() -> dict:
    return {name: imports(name, path) for name, path in modules().items()}


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() if layer(name) is None]
    assert not unplaced, f"place these modules in LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_point_down():
    wrong = []
    for name, found in graph().items():
        here = layer(name)
        for line, target in found:
            there = layer(target)
            if here is not None and there is not None and there > here:
                wrong.append(f"{modules()[name].relative_to(ROOT)}:{line} {name} ({LAYERS[here][0]}) imports "
                             f"{target} ({LAYERS[there][0]})")
    assert not wrong, "imports that climb the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = {name: {t for _, t in found if t != name and not name.startswith(t + ".")}
             for name, found in graph().items()}  # a module runs its package's __init__ first: not an edge
    state: dict = {}
    cycles = []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_built_in_plugins_are_reached_only_through_the_host():
    wrong = []
    for name, found in graph().items():
        for line, target in found:
            plugin = plugin_of(target)
            if plugin is None or name == HOST or plugin_of(name) == plugin:
                continue
            wrong.append(f"{modules()[name].relative_to(ROOT)}:{line} {name} imports the built-in plugin {target}")
    assert not wrong, ("only ckconv.plugins names built-in plugin modules; reach formats and architectures "
                       "through the host (ckconv.plugins.host()), and move shared code down into the "
                       "format toolkit:\n" + "\n".join(wrong))


def test_the_host_lists_exactly_the_built_in_plugins():
    from ckconv.plugins import BUILTIN_PLUGINS

    declared = {e for name, entries in LAYERS if name == "built-in plugins" for e in entries}
    assert set(BUILTIN_PLUGINS) == declared


def test_only_the_host_imports_by_name():
    """``importlib.import_module`` would hide an edge from these checks: only the host and the lazy face use it."""
    users = [name for name, path in modules().items() if "import_module(" in path.read_text(encoding="utf-8")]
    assert set(users) <= {HOST, "ckconv"}, users


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_too_long(name):
    lines = modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it along its seams (at most {MAX_LINES})"


def test_the_layers_are_documented():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, entries in LAYERS:
        assert f"**{name}**" in text, f"docs/architecture.md does not describe the {name} layer"
    undocumented = [m for m, path in modules().items() if m != "ckconv" and not only_a_docstring(path)
                    and f"`{m.removeprefix('ckconv.')}`" not in text]
    assert not undocumented, f"docs/architecture.md has no line for: {undocumented}"


MAX_FUNCTION_LINES = 80


def test_no_function_over_80_lines():
    """A function that passes a screenful is asking to be cut along its seams (a dispatch table, named steps)."""
    long = []
    for path in sorted([*SRC.rglob("*.py"), *ROOT.glob("plugins/*/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines")
    assert not long, "\n".join(long)
