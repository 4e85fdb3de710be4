"""The plugin host: every hook, allow-listing, and broken plugins reported by name without taking ckconv down.

Third-party plugins are faked at the entry-point level (``importlib.metadata.entry_points`` as ckconv.plugins sees
it), so these tests do not depend on what happens to be installed.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv import hookimpl, plugins
from ckconv.architectures import ArchitectureSource
from ckconv.cli import cli
from ckconv.formats import Format
from ckconv.model import Checkpoint, Storage, TensorRef
from ckconv.rules import KeyRule


class FakeEntryPoint:
    def __init__(self, name, target, version="1.2.3"):
        self.name, self.value = name, f"fake_{name}"
        self.dist = types.SimpleNamespace(version=version)
        self.loads = 0
        self._target = target

    def load(self):
        self.loads += 1
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def plugin(**hooks):
    """A plugin module whose hook implementations are the given functions."""
    module = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        fn.__name__ = name
        setattr(module, name, hookimpl(fn))
    return module


@pytest.fixture
def installed(monkeypatch):
    """Install fake entry points: ``installed(ep, ...)``; returns them."""

    def install(*eps):
        monkeypatch.setattr(plugins.metadata, "entry_points",
                            lambda group=None: [ep for ep in eps] if group == "ckconv" else [])
        plugins.reset()
        return eps

    monkeypatch.delenv("CKCONV_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("CKCONV_TRACE_PLUGINS", raising=False)
    return install


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


class DotFormat(Format):
    """A toy format: a file starting with ``DOT1`` holds one float32 vector."""

    name = "dot"
    extensions = (".dot",)

    def sniff(self, path, head):
        return head.startswith(b"DOT1")

    def read(self, path):
        n = path.stat().st_size - 4
        ref = TensorRef(Storage("v", "float32", n, path=str(path), offset=4), "float32", (n // 4,))
        return Checkpoint(root={"v": ref})

    def write(self, checkpoint, path, options):
        ref = checkpoint.root["v"]
        with open(path, "wb") as f:
            f.write(b"DOT1")
            for chunk in ref.chunks():
                f.write(chunk)


class ToySource(ArchitectureSource):
    name = "toy"

    def list(self):
        return ["tiny"]

    def build(self, model, **options):
        return torch.nn.Linear(2, options.get("out", 3))


# --- one test per hook ------------------------------------------------------------------------------------

def test_ckconv_register_formats_adds_a_format_ckconv_reads_and_writes(installed, tmp_path):
    installed(FakeEntryPoint("dot", plugin(ckconv_register_formats=lambda register: register(DotFormat()))))
    assert plugins.host().formats["dot"].name == "dot"
    ckconv.save({"v": torch.arange(4, dtype=torch.float32)}, tmp_path / "x.dot")
    assert (tmp_path / "x.dot").read_bytes()[:4] == b"DOT1"
    assert ckconv.detect_format(tmp_path / "x.dot") == "dot"
    assert torch.equal(ckconv.load(tmp_path / "x.dot")["v"], torch.arange(4, dtype=torch.float32))
    assert invoke("convert", str(tmp_path / "x.dot"), str(tmp_path / "x.safetensors")).exit_code == 0


def test_ckconv_register_architectures_adds_a_namespace(installed):
    installed(FakeEntryPoint("toy", plugin(ckconv_register_architectures=lambda register: register(ToySource()))))
    source = plugins.host().architectures["toy"]
    assert source.list() == ["tiny"] and source.build("tiny", out=5).out_features == 5
    assert "torchvision" in plugins.host().architectures
    listed = {p["name"]: p for p in json.loads(invoke("plugins", "--json").stdout)["plugins"]}
    assert listed["toy"]["architectures"] == ["toy"] and listed["toy"]["version"] == "1.2.3"


def test_ckconv_register_key_rules_adds_rules(installed):
    def rules(register):
        register(KeyRule("toy.backbone", r"^backbone\.", "features.", arch="toy:*"))
        register(KeyRule("toy.head", r"^head\.fc\.", "classifier."))

    installed(FakeEntryPoint("toyrules", plugin(ckconv_register_key_rules=rules)))
    h = plugins.host()
    mine = [r for r in h.key_rules if r.name.startswith("toy.")]
    assert [r.name for r in mine] == ["toy.backbone", "toy.head"]
    assert mine[0].apply("backbone.0.weight") == "features.0.weight"
    assert h.owners[("key_rules", "toy.head")] == "toyrules"
    assert h.plugins["toyrules"].registers["key_rules"] == ["toy.backbone", "toy.head"]


# --- broken plugins are reported by name, the rest keeps working ------------------------------------------

def boom(register):
    register(DotFormat())
    raise RuntimeError("kaput")


def test_a_plugin_that_raises_is_reported_and_registers_nothing(installed, tmp_path):
    installed(FakeEntryPoint("boom", plugin(ckconv_register_formats=boom)),
              FakeEntryPoint("toy", plugin(ckconv_register_architectures=lambda register: register(ToySource()))))
    h = plugins.host()
    assert "dot" not in h.formats and {"torch", "safetensors"} <= set(h.formats)
    assert "toy" in h.architectures
    assert [(n, m) for n, m in h.problems if n == "boom"] == [
        ("boom", "ckconv_register_formats raised RuntimeError: kaput; registered none of its formats")]
    result = invoke("plugins")
    assert result.exit_code == 0 and "toy" in result.stdout
    assert "problem: boom: ckconv_register_formats raised RuntimeError: kaput" in result.stderr
    data = json.loads(invoke("plugins", "--json").stdout)
    assert {"plugin": "boom", "problem": h.problems[0][1]} in data["problems"]
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pth")  # ckconv keeps working
    assert invoke("convert", str(tmp_path / "a.pth"), str(tmp_path / "a.safetensors")).exit_code == 0


def test_a_duplicate_name_names_both_plugins_and_keeps_the_first(installed):
    class Impostor(DotFormat):
        name = "safetensors"

    installed(FakeEntryPoint("dupe", plugin(ckconv_register_formats=lambda register: register(Impostor()))),
              FakeEntryPoint("dot1", plugin(ckconv_register_formats=lambda register: register(DotFormat()))),
              FakeEntryPoint("dot2", plugin(ckconv_register_formats=lambda register: register(DotFormat()))))
    h = plugins.host()
    assert type(h.formats["safetensors"]).__name__ == "SafetensorsFormat"
    assert h.owners[("formats", "dot")] == "dot1"
    messages = dict(h.problems)
    assert "ckconv.formats.safetensors_format and dupe" in messages["dupe"]
    assert "'dot' is registered by both dot1 and dot2" in messages["dot2"]
    data = json.loads(invoke("plugins", "--json").stdout)
    assert {p["plugin"] for p in data["problems"]} == {"dupe", "dot2"}
    assert {p["name"]: p["formats"] for p in data["plugins"]}["dot2"] == []


def test_a_plugin_that_fails_to_import_is_reported_and_skipped(installed, tmp_path):
    installed(FakeEntryPoint("broken", ModuleNotFoundError("No module named 'missing_dependency'")),
              FakeEntryPoint("dot", plugin(ckconv_register_formats=lambda register: register(DotFormat()))))
    h = plugins.host()
    assert "broken" not in h.plugins and "dot" in h.formats
    ((name, message),) = h.problems
    assert name == "broken" and "failed to load" in message and "missing_dependency" in message
    result = invoke("plugins")
    assert result.exit_code == 0 and "problem: broken: failed to load" in result.stderr
    assert json.loads(invoke("plugins", "--json").stdout)["problems"][0]["plugin"] == "broken"
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pth")
    assert invoke("inspect", str(tmp_path / "a.pth")).exit_code == 0


def test_a_hook_with_a_wrong_signature_or_an_unknown_hook_is_reported(installed):
    def bad(reg):  # pluggy validates argument names against the spec
        reg(DotFormat())

    typo = plugin(ckconv_register_format=lambda register: register(DotFormat()))
    installed(FakeEntryPoint("bad", plugin(ckconv_register_formats=bad)), FakeEntryPoint("typo", typo))
    messages = dict(plugins.host().problems)
    assert "failed to load" in messages["bad"] and "reg" in messages["bad"]
    assert "unknown hook(s) ckconv_register_format" in messages["typo"]


def test_registering_a_nameless_item_is_reported(installed):
    installed(FakeEntryPoint("anon", plugin(ckconv_register_formats=lambda register: register(object()))))
    assert "without a name" in dict(plugins.host().problems)["anon"]


# --- which plugins load --------------------------------------------------------------------------------------

BUILTINS = set(plugins.BUILTIN_PLUGINS)


def test_empty_allow_list_loads_no_third_party_plugins(installed, monkeypatch):
    (ep,) = installed(FakeEntryPoint("dot", plugin(ckconv_register_formats=lambda register: register(DotFormat()))))
    monkeypatch.setenv("CKCONV_LOAD_PLUGINS", "")
    h = plugins.host()
    assert set(h.plugins) == BUILTINS and ep.loads == 0 and not h.problems
    assert {"torch", "safetensors"} <= set(h.formats) and "torchvision" in h.architectures


def test_allow_list_loads_only_the_named_plugins(installed, monkeypatch):
    eps = installed(FakeEntryPoint("dot", plugin(ckconv_register_formats=lambda register: register(DotFormat()))),
                    FakeEntryPoint("toy", plugin(ckconv_register_architectures=lambda register: register(ToySource()))))
    monkeypatch.setenv("CKCONV_LOAD_PLUGINS", " toy , missing")
    h = plugins.host()
    assert set(h.plugins) == BUILTINS | {"toy"} and [ep.loads for ep in eps] == [0, 1]
    assert "not installed" in dict(h.problems)["missing"]


def test_builtins_always_load(installed, monkeypatch):
    installed(FakeEntryPoint("boom", RuntimeError("broken at import")))
    for value in ("", "boom", "nothing-like-that"):
        monkeypatch.setenv("CKCONV_LOAD_PLUGINS", value)
        plugins.reset()
        h = plugins.host()
        assert BUILTINS <= set(h.plugins) and all(h.plugins[b].builtin for b in BUILTINS)
        assert {"torch", "safetensors"} <= set(h.formats)


def test_trace_switch_explains_what_loads(installed, monkeypatch, capsys):
    installed(FakeEntryPoint("boom", plugin(ckconv_register_formats=boom)),
              FakeEntryPoint("skipped", plugin()))
    monkeypatch.setenv("CKCONV_LOAD_PLUGINS", "boom")
    monkeypatch.setenv("CKCONV_TRACE_PLUGINS", "1")
    plugins.host()
    err = capsys.readouterr().err
    assert "ckconv plugins: loaded boom 1.2.3" in err
    assert "skipping skipped (not in CKCONV_LOAD_PLUGINS)" in err
    assert "boom.ckconv_register_formats raised" in err and "Traceback" in err and "kaput" in err
    monkeypatch.delenv("CKCONV_TRACE_PLUGINS")
    plugins.reset()
    plugins.host()
    assert capsys.readouterr().err == ""


def test_plugin_manager_is_fresh_and_knows_every_hook():
    a, b = plugins.get_plugin_manager(), plugins.get_plugin_manager()
    assert a is not b
    assert set(plugins.HOOKS) == {n for n in dir(a.hook) if n.startswith("ckconv_")}


def test_a_format_that_only_duck_types_the_contract_is_refused_and_a_minimal_subclass_gets_every_default(
        installed, tmp_path):
    """Every optional capability is declared on Format (issue 22): a subclass with only sniff/read/write converts,
    writes under a torchrun plan and into an existing folder through the defaults; a look-alike is refused."""

    class LookAlike:
        name, description, extensions = "lookalike", "", (".la",)

        def sniff(self, path, head):
            return False

    installed(FakeEntryPoint("la", plugin(ckconv_register_formats=lambda register: register(LookAlike()))),
              FakeEntryPoint("dot", plugin(ckconv_register_formats=lambda register: register(DotFormat()))))
    h = plugins.host()
    assert "lookalike" not in h.formats and "not a ckconv.formats.Format: subclass it" in dict(h.problems)["la"]
    dot = h.formats["dot"]
    assert dot.shards_for is None and dot.read_dangerous(tmp_path) is None
    assert dot.folder_layout(ckconv.formats.WriteOptions()) == ckconv.formats.FolderLayout()
    plan = dot.plan_ranks(ckconv.io.as_checkpoint({"v": torch.ones(3)}), ckconv.formats.WriteOptions(), 2)
    plan.write(tmp_path / "rank1.dot", 1)  # the default plan: rank 0 writes everything, the others nothing
    assert not (tmp_path / "rank1.dot").exists()
    plan.run_alone(tmp_path / "alone.dot")
    assert torch.equal(ckconv.load(tmp_path / "alone.dot")["v"], torch.ones(3))
