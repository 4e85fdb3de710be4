"""The plugin API is declared in code (``__all__``), documented in docs/plugins.md, and all the example plugins use.

The table under "The plugin API" in docs/plugins.md lists, per module, exactly the names of its ``__all__``; the
plugins in plugins/ import ckconv only from those modules and only those names.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"


def documented() -> dict:
    """{module: {names}} from the table of the docs section "The plugin API"."""
    text = DOCS.read_text(encoding="utf-8")
    section = re.search(r"^## The plugin API$(.*?)^## ", text, re.M | re.S)
    assert section, "docs/plugins.md needs a section '## The plugin API'"
    table = {}
    for module, names in re.findall(r"^\| `([\w.]+)` \| (.*) \|$", section.group(1), re.M):
        table[module] = set(re.findall(r"`(\w+)`", names.split("(")[0]))
    return table


def test_the_table_lists_the_modules_plugins_build_on():
    assert {"ckconv", "ckconv.formats", "ckconv.model", "ckconv.errors", "ckconv.architectures",
            "ckconv.rules"} <= set(documented())


@pytest.mark.parametrize("module", sorted(set(documented()) - {"ckconv"}))
def test_all_is_what_the_docs_list(module):
    declared = set(importlib.import_module(module).__all__)
    assert declared == documented()[module], (f"{module}.__all__ and docs/plugins.md differ: only in code "
                                              f"{sorted(declared - documented()[module])}, only in the docs "
                                              f"{sorted(documented()[module] - declared)}")


@pytest.mark.parametrize("module", sorted(documented()))
def test_every_api_name_exists(module):
    mod = importlib.import_module(module)
    missing = [n for n in documented()[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


PLUGIN_SOURCES = sorted(p for p in (ROOT / "plugins").glob("*/*.py") if p.name.startswith("ckconv_"))


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: p.name)
def test_example_plugins_use_only_the_api(path):
    api = documented()
    wrong = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ckconv":
            allowed = api.get(node.module, set())
            wrong += [f"{node.module}.{a.name}" for a in node.names  # a name of the module, or an API module itself
                      if a.name not in allowed and f"{node.module}.{a.name}" not in api]
        elif isinstance(node, ast.Import):
            wrong += [a.name for a in node.names if a.name.startswith("ckconv.") and a.name not in api]
    assert not wrong, f"{path.name} imports beyond the plugin API (docs/plugins.md): {wrong}"


def _format_capabilities() -> list:
    from ckconv.formats import Format

    return sorted(n for n in vars(Format) if not n.startswith("_"))


def test_every_format_capability_is_declared_documented_and_never_probed():
    """The Format contract is whole in formats/base.py (issue 22): each attribute and method is in its docstring and
    in docs/plugins.md, and no code asks a format whether it has one (``getattr(fmt, "plan_ranks", None)``)."""
    from ckconv.formats import Format

    names = _format_capabilities()
    assert {"name", "extensions", "shardable", "shards_for", "writes_pickles", "sniff", "read", "write",
            "writes_directory", "folder_layout", "plan_ranks", "read_dangerous"} <= set(names)
    docs = DOCS.read_text(encoding="utf-8")
    assert [n for n in names if f"``{n}" not in Format.__doc__] == []
    assert [n for n in names if f"`{n}" not in docs] == []
    probes = []
    for path in sorted((ROOT / "src" / "ckconv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in names and node.args[1].value != "name"):
                probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.args[1].value}")
    assert probes == []


def test_sniff_gets_the_bytes_the_contract_says(tmp_path, monkeypatch):
    from ckconv import io, plugins
    from ckconv.formats import base

    seen = []
    fmt = plugins.host().formats["torch"]
    monkeypatch.setattr(type(fmt), "sniff", lambda self, path, head: seen.append(len(head)) or False)
    (tmp_path / "x.bin").write_bytes(b"\x00" * 4096)
    with pytest.raises(Exception):
        io.detect_format(tmp_path / "x.bin")
    assert seen == [base.SNIFF_BYTES] == [512]
