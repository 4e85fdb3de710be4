"""The layout is a stack of layers, and every import of ckconv's own code points down it (docs/architecture.md).

Read from the source, not from ``sys.modules``: every ``import`` and ``from ... import`` counts, those inside
functions and under ``if TYPE_CHECKING`` too. An import may go to a lower layer, or sideways inside one layer as
long as no circle forms. Built-in plugins are reached only through the plugin host, as third-party ones are.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Bottom to top. A name is a module, or a package standing for every module under it.
LAYERS = [
    ("foundation", ["ckconv.errors", "ckconv.hookspecs", "ckconv.dtypes"]),
    ("storage", ["ckconv.storage"]),
    ("values", ["ckconv.model", "ckconv.numpy_values", "ckconv.tensor_kinds", "ckconv.tree", "ckconv.tree_keys"]),
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


def imported(node, name: str, is_package: bool, known) -> list:
    """The ckconv modules an ``import`` or ``from ... import`` statement in module ``name`` imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "ckconv"]
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "ckconv":
        return []
    subs = [f"{target}.{alias.name}" for alias in node.names]  # `from . import tree` imports ckconv.tree
    return [sub if sub in known else target for sub in subs]


def imports(name: str, path: Path) -> list:
    """[(line, imported ckconv module)] of every import statement in the module, wherever it stands."""
    known = modules()
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out += [(node.lineno, target) for target in imported(node, name, is_package, known)]
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


MAX_DEFERRED_IMPORTS = 10
NOT_A_REASON = re.compile(r"^#\s*(noqa|type:|pragma|fmt:|isort:)|^#\s*$")


def deferred_imports(name: str, source: str, is_package: bool = False, known=()) -> list:
    """[(line, imported ckconv module, reason)] for each import of ckconv's own code inside a function; the reason
    is the comment on the import's line or on a comment line just above it, '' when there is none."""
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not NOT_A_REASON.match(tok.string):
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = []

    def visit(node, in_function):
        if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
            above = node.lineno - 1
            alone = above >= 1 and lines[above - 1].lstrip().startswith("#")
            reason = next((comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments),
                          comments.get(above, "") if alone else "")
            targets = dict.fromkeys(imported(node, name, is_package, known))  # `from .io import read, write`: one
            out.extend((node.lineno, target, reason) for target in targets)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    return out


def test_few_deferred_imports_below_the_face_each_with_its_reason():
    """An import inside a function hides an edge of the layering from the reader and costs a lookup per call: below
    the face (the lazy ``ckconv`` package and the CLI may defer whole commands) it is for keeping torch or a
    plugin off a fast path, and a comment beside it says which."""
    face = next(i for i, (name, _) in enumerate(LAYERS) if name == "face")
    found = []
    for name, path in modules().items():
        if layer(name) is not None and layer(name) < face:
            source = path.read_text(encoding="utf-8")
            found += [(f"{path.relative_to(ROOT)}:{line} {target}", reason) for line, target, reason in
                      deferred_imports(name, source, path.name == "__init__.py", modules())]
    bare = [where for where, reason in found if not reason]
    assert not bare, ("deferred imports without a comment saying why (import at the top, or say what the "
                      "deferral keeps off which path):\n" + "\n".join(bare))
    assert len(found) <= MAX_DEFERRED_IMPORTS, (f"{len(found)} deferred imports below the face (at most "
                                                f"{MAX_DEFERRED_IMPORTS}):\n" + "\n".join(w for w, _ in found))


def test_the_deferred_import_check_finds_and_reads_them():
    """The check above on a module made to fail it: each kind of deferred import, each place a reason can stand."""
    source = (
        "import os\n"
        "from . import tree  # at the top: not deferred\n"
        "def bare():\n"
        "    from .model import Checkpoint\n"
        "def reason_above():\n"
        "    x = 1  # a comment on the code above is not the import's\n"
        "    # keeps torch off the scan path\n"
        "    from . import tree\n"
        "def reason_beside():\n"
        "    def inner():\n"
        "        import ckconv.io  # plugin loaded only when asked\n"
        "def not_a_reason():\n"
        "    x = 1  # about x\n"
        "    from .errors import CkconvError  # noqa: F401\n"
        "    import json\n"
        "class C:\n"
        "    from .dtypes import DTYPES\n"
        "    def method(self):\n"
        "        from .io import (read,  # reads the file\n"
        "                         write)\n"
    )
    known = {"ckconv.tree", "ckconv.model", "ckconv.io", "ckconv.errors", "ckconv.dtypes"}
    assert deferred_imports("ckconv.example", source, known=known) == [
        (4, "ckconv.model", ""),
        (8, "ckconv.tree", "keeps torch off the scan path"),
        (11, "ckconv.io", "plugin loaded only when asked"),
        (14, "ckconv.errors", ""),
        (19, "ckconv.io", "reads the file"),
    ]
