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
