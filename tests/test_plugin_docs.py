"""Every hook in ckconv.hookspecs is documented in docs/plugins.md (exact signature, parameters, an example) and has
a test of its own (a test function whose name mentions the hook), as datasette checks for its hooks."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from ckconv import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if callable(fn) and getattr(fn, "ckconv_spec", None) is not None)


def section(name):
    """The text of the docs section whose heading is the hook's signature, up to the next heading of that level."""
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(rf"^### `{re.escape(name)}\(.*?$(.*?)(?=^##)", text, re.M | re.S)
    return found.group(1) if found else ""


def signature(name):
    return f"{name}{inspect.signature(getattr(hookspecs, name))}"


def test_there_are_hooks():
    assert "ckconv_register_formats" in HOOKS and len(HOOKS) >= 3


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_exact_signature(hook):
    text = DOCS.read_text(encoding="utf-8")
    assert f"### `{signature(hook)}`" in text, f"docs/plugins.md needs a heading ### `{signature(hook)}`"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docs_list_every_parameter_and_show_an_example(hook):
    body = section(hook)
    for param in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert re.search(rf"^- `{param}` -- ", body, re.M), f"{hook}: parameter {param} is not listed"
    assert "Example:" in body and f"def {hook}(" in body, f"{hook}: no example implementation"
    assert f"@ckconv.hookimpl\ndef {hook}(" in body


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test_of_its_own(hook):
    """A test named for the hook that also implements it (``hook=...`` or ``def hook(``) and asks the host what the
    implementation registered: a name alone does not count."""
    import ast

    sources = [*(ROOT / "tests").glob("test_*.py"), *(ROOT / "plugins").glob("*/tests/test_*.py")]
    tests = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and hook in node.name:
                body = ast.get_source_segment(text, node)
                if (f"{hook}=" in body or f"def {hook}(" in body) and "host()" in body:
                    tests.append(node.name)
    assert tests, (f"no test named for {hook} implements it and checks what the host registered; add e.g. "
                   f"test_{hook}_... to tests/test_plugin_host.py")


def test_docs_explain_debugging():
    text = DOCS.read_text(encoding="utf-8")
    for needle in ("CKCONV_LOAD_PLUGINS=", "CKCONV_TRACE_PLUGINS=1", "ckconv plugins --json", "[project.entry-points.ckconv]"):
        assert needle in text
