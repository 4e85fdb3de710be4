"""Whole pickled modules (``torch.save(model)``): their state_dict derived without importing a class (issue 12).

Every file here is written by torch itself; the checks compare against ``model.state_dict()`` of the live model:
names, order, dtypes, values, ``_metadata``. Wrappers that need a process group or dynamo are built in a
subprocess so this process stays clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import ckconv
from ckconv.contents import modules
from ckconv import tree
from ckconv.cli import cli
from ckconv.errors import LimitExceeded, UnsafeCheckpoint
from ckconv.formats.base import guarded
from ckconv.formats.torch_file import read_zip
from ckconv.model import foreign_class
from ckconv.contents.unwrap import unwrap

from helpers import assert_deep_equal, run_cli

BUILDERS = {"resnet18": torchvision.models.resnet18, "squeezenet1_1": torchvision.models.squeezenet1_1,
            "vgg11": torchvision.models.vgg11}


def seeded(name, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name](weights=None).eval()


def derived(path, section=None):
    """The state_dict ckconv finds in ``path``, as torch tensors (OrderedDict, ``_metadata`` kept)."""
    flat, _, _ = unwrap(ckconv.read(path).root, section)
    return tree.materialize(flat)


def assert_same_state_dict(got, model_or_sd):
    expected = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    assert_deep_equal(got, expected)  # keys, order, dtypes, bytes, requires_grad and the _metadata attribute
    assert got._metadata == expected._metadata
    assert all(type(t) is torch.Tensor for t in got.values())  # detached tensors, as state_dict() gives


def same_outputs(a, b, size=64):
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A seeded torchvision resnet18, saved whole: (live model, path)."""
    model = seeded("resnet18")
    path = tmp_path_factory.mktemp("whole") / "resnet18.pth"
    torch.save(model, path)
    return model, path


def python(code, tmp_path, **env):
    """Run ``code`` in a fresh interpreter in ``tmp_path``; fails the test with its stderr if it fails."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "vgg11"])
def test_whole_torchvision_module_gives_its_state_dict(tmp_path, name):
    model = seeded(name)
    torch.save(model, tmp_path / "whole.pth")
    assert_same_state_dict(derived(tmp_path / "whole.pth"), model)
    if name != "vgg11":  # 0.5 GB: the derivation above is the part that differs between models
        result = ckconv.convert(tmp_path / "whole.pth", tmp_path / "sd.pth", model_only=True)
        assert result.tensors == len(model.state_dict())
        assert_same_state_dict(torch.load(tmp_path / "sd.pth", weights_only=True), model)


def test_convert_arch_loads_strict_and_reproduces_outputs(tmp_path, resnet_file):
    model, path = resnet_file
    result = invoke("convert", path, tmp_path / "out.safetensors", "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(load_file(tmp_path / "out.safetensors"), strict=True)
    same_outputs(model, fresh)
    target = torchvision.models.resnet18(weights=None)
    report = ckconv.load_into(target, path, strict=True)
    assert report.complete and report.section == "<root>"
    same_outputs(model, target)


def test_match_and_inspect_show_the_pickled_module(resnet_file):
    _, path = resnet_file
    report = ckconv.match(path, "resnet18")
    assert report.complete and report.coverage == 1.0 and not report.unexpected
    shown = invoke("match", path, "--arch", "resnet18", "--strict")
    assert shown.exit_code == 0 and "coverage: 100.0% of 122 target keys" in shown.stdout
    text = invoke("inspect", path).stdout
    assert "sections: model (pickled module torchvision.models.resnet.ResNet)" in text
    (line,) = [t for t in text.splitlines() if t.startswith("foreign object:")]  # submodules counted, not listed
    assert line.startswith("foreign object: <root> is a torchvision.models.resnet.ResNet") and "more records" in line
    info = ckconv.inspect(path)
    assert info.sections == {"model": ["<root>"]}
    assert info.modules == [{"path": "<root>", "class": "torchvision.models.resnet.ResNet", "tensors": 122,
                             "error": None}]


def test_the_module_survives_safetensors_and_is_still_found(tmp_path, resnet_file):
    """Plain convert keeps the record (lossless); the model is found the same way in every format."""
    model, path = resnet_file
    ckconv.convert(path, tmp_path / "whole.safetensors")
    ckconv.convert(tmp_path / "whole.safetensors", tmp_path / "back.pth")
    assert_same_state_dict(derived(tmp_path / "whole.safetensors"), model)
    assert ckconv.inspect(tmp_path / "whole.safetensors").modules[0]["class"] == "torchvision.models.resnet.ResNet"
    back = torch.load(tmp_path / "back.pth", weights_only=False)  # our own output: a real ResNet again
    assert type(back) is torchvision.models.ResNet
    same_outputs(model, back)


def test_module_nested_in_a_bundle(tmp_path):
    model = seeded("resnet18").train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(4, 3, 64, 64)).mean().backward()
    opt.step()
    model.eval()
    torch.save({"model": model, "optimizer": opt.state_dict(), "epoch": 3}, tmp_path / "bundle.pth")
    assert_same_state_dict(derived(tmp_path / "bundle.pth"), model)
    info = ckconv.inspect(tmp_path / "bundle.pth")
    assert info.sections["model"] == ["model"] and info.modules[0]["path"] == "model"
    assert info.bundle["optimizers"][0]["names"]["0"] == "conv1.weight"  # slots named through the derived keys
    text = invoke("inspect", tmp_path / "bundle.pth").stdout
    assert "model (model: pickled module torchvision.models.resnet.ResNet)" in text

    ckconv.convert(tmp_path / "bundle.pth", tmp_path / "sd.safetensors", model_only=True)
    assert_same_state_dict(ckconv.load(tmp_path / "sd.safetensors"), model)
    ckconv.convert(tmp_path / "bundle.pth", tmp_path / "out.pth", arch="resnet18")
    out = torch.load(tmp_path / "out.pth", weights_only=True)  # the module became its state_dict
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(out["model"], strict=True)
    same_outputs(model, fresh)
    new_opt = torch.optim.SGD(fresh.parameters(), lr=1e-3, momentum=0.9)
    new_opt.load_state_dict(out["optimizer"])  # optimizer slots follow the model's names
    assert torch.equal(new_opt.state[fresh.fc.weight]["momentum_buffer"], opt.state[model.fc.weight]["momentum_buffer"])


USER_MODULE = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.register_buffer("count", torch.tensor([7], dtype=torch.int32))
        self.register_parameter("unused", None)
        self.register_buffer("empty", None)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.missing = None
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight  # tied
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 2).to(torch.float64))
"""


def test_user_class_is_never_imported(tmp_path):
    """The class's module is importable when saving, then booby-trapped: reading must not import it."""
    (tmp_path / "usermodels_x.py").write_text(USER_MODULE)
    python("""
        import torch, usermodels_x
        torch.manual_seed(0)
        net = usermodels_x.Net()
        torch.save(net, "whole.pth")
        torch.save(net.state_dict(), "expected.pth")
        """, tmp_path, PYTHONPATH=str(tmp_path))
    (tmp_path / "usermodels_x.py").write_text("open('IMPORTED', 'w').close()\nraise SystemExit('imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = run_cli("convert", "whole.pth", "sd.pth", "--model-only", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    done = python("""
        import sys, ckconv
        from ckconv.contents.unwrap import unwrap
        flat, where, _ = unwrap(ckconv.read("whole.pth").root)
        print(ckconv.inspect("whole.pth").modules[0]["class"], "usermodels_x" in sys.modules)
        """, tmp_path, PYTHONPATH=str(tmp_path))
    assert done.stdout.split() == ["usermodels_x.Net", "False"]
    assert not (tmp_path / "IMPORTED").exists()
    expected = torch.load(tmp_path / "expected.pth", weights_only=True)
    got = torch.load(tmp_path / "sd.pth", weights_only=True)
    assert "block.scratch" not in got and "block.unused" not in got and "block.count" in got
    assert_same_state_dict(got, expected)
    assert got["dec.weight"].data_ptr() == got["enc.weight"].data_ptr()  # still tied
    assert_same_state_dict(derived(tmp_path / "whole.pth"), expected)


def test_class_from_main(tmp_path):
    python("""
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))

        torch.manual_seed(0)
        m = Tiny()
        torch.save(m, "whole.pth")
        torch.save(m.state_dict(), "expected.pth")
        """, tmp_path)
    assert ckconv.inspect(tmp_path / "whole.pth").modules[0]["class"] == "__main__.Tiny"
    assert_same_state_dict(derived(tmp_path / "whole.pth"), torch.load(tmp_path / "expected.pth"))


def test_data_parallel_keys_get_the_module_prefix(tmp_path):
    model = seeded("resnet18")
    wrapped = nn.DataParallel(model)
    torch.save(wrapped, tmp_path / "dp.pth")
    got = derived(tmp_path / "dp.pth")
    assert next(iter(got)) == "module.conv1.weight"
    assert_same_state_dict(got, wrapped)
    assert ckconv.inspect(tmp_path / "dp.pth").modules[0]["class"] == "torch.nn.parallel.data_parallel.DataParallel"
    ckconv.convert(tmp_path / "dp.pth", tmp_path / "out.pth", arch="resnet18", model_only=True)
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
    same_outputs(model, fresh)


def test_distributed_data_parallel(tmp_path):
    python(f"""
        import torch, torch.distributed as dist
        from torch import nn
        dist.init_process_group("gloo", init_method="file://{tmp_path}/pg", rank=0, world_size=1)
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)))
        torch.save(ddp, "ddp.pth")
        torch.save(ddp.state_dict(), "expected.pth")
        dist.destroy_process_group()
        """, tmp_path)
    expected = torch.load(tmp_path / "expected.pth")
    assert list(expected)[0] == "module.0.weight"
    assert_same_state_dict(derived(tmp_path / "ddp.pth"), expected)


def test_torch_compile_optimized_module(tmp_path):
    """torch.compile's wrapper pickles as OptimizedModule(orig_mod, dynamo_ctx): keys get ``_orig_mod.``.

    The dynamo records around the model are *unknown* (torch would run its dynamo machinery loading them, and a
    getattr on one of them): the tensors come out (--model-only, --plain, safetensors); a .pth copy of the whole
    wrapper needs --allow-global.
    """
    python("""
        import torch
        from torch import nn
        torch.manual_seed(0)
        c = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))  # compiles nothing until called
        assert type(c).__name__ == "OptimizedModule"
        torch.save(c, "compiled.pth")
        torch.save(c.state_dict(), "expected.pth")
        """, tmp_path)
    expected = torch.load(tmp_path / "expected.pth")
    assert list(expected)[0] == "_orig_mod.0.weight"
    root = guarded(read_zip, tmp_path / "compiled.pth", allow_dangerous=True).root
    assert modules.is_module(root)
    assert_same_state_dict(tree.materialize(modules.state_dict(root)), expected)
    info = ckconv.inspect(tmp_path / "compiled.pth")
    assert info.modules[0]["class"] == "torch._dynamo.eval_frame.OptimizedModule"
    assert info.sections == {"model": ["<root>"]}
    assert info.verdict == "unknown" and "torch._dynamo.eval_frame.OptimizeContext" in info.globals["unknown"]
    ckconv.convert(tmp_path / "compiled.pth", tmp_path / "model.pth", model_only=True)
    assert_same_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), expected)
    ckconv.convert(tmp_path / "compiled.pth", tmp_path / "plain.pth", plain=True)
    assert_same_state_dict(torch.load(tmp_path / "plain.pth", weights_only=True), expected)
    ckconv.convert(tmp_path / "compiled.pth", tmp_path / "c.safetensors")
    assert ckconv.inspect(tmp_path / "c.safetensors").verdict == "unknown"
    with pytest.raises(UnsafeCheckpoint, match="OptimizedModule"):
        ckconv.convert(tmp_path / "compiled.pth", tmp_path / "whole.pth")
    assert not (tmp_path / "whole.pth").exists()


def test_spectral_norm_metadata(tmp_path):
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 4)), nn.ReLU())
    torch.save(model, tmp_path / "sn.pth")
    got = derived(tmp_path / "sn.pth")
    assert got._metadata["0"]["spectral_norm"] == {"weight.version": 1}
    assert_same_state_dict(got, model)


def test_code_defined_state_is_refused_by_name(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), torch.ao.quantization.FakeQuantize())
    torch.save(model, tmp_path / "qat.pth")
    result = run_cli("convert", tmp_path / "qat.pth", tmp_path / "out.pth", "--model-only")
    assert result.returncode == 1 and not (tmp_path / "out.pth").exists()
    (line,) = result.stderr.strip().splitlines()
    assert "submodule 1 (torch.ao.quantization.fake_quantize.FakeQuantize)" in line and "_save_to_state_dict" in line
    info = ckconv.inspect(tmp_path / "qat.pth")
    assert info.modules[0]["tensors"] is None and "FakeQuantize" in info.modules[0]["error"]
    assert invoke("convert", tmp_path / "qat.pth", tmp_path / "whole.safetensors").exit_code == 0  # lossless copy


def test_get_extra_state_and_state_dict_hooks_are_refused_by_name(tmp_path):
    package = tmp_path / "transformer_engine" / "pytorch" / "module"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "linear.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Linear(nn.Linear):  # stands in for TE's modules: fp8_meta in __dict__, extra state on the class
            def __init__(self):
                super().__init__(2, 2)
                self.fp8_meta = {"recipe": None}

            def get_extra_state(self):
                return torch.tensor([1])

        def hook(module, state_dict, prefix, local_metadata):
            state_dict[prefix + "added"] = torch.zeros(1)
        """))
    python("""
        import torch
        from torch import nn
        from transformer_engine.pytorch.module.linear import Linear, hook
        torch.save(nn.Sequential(nn.ReLU(), Linear()), "te.pth")
        m = nn.Sequential(nn.Linear(2, 2))
        m[0]._register_state_dict_hook(hook)
        torch.save(m, "hooked.pth")
        """, tmp_path, PYTHONPATH=str(tmp_path))
    with pytest.raises(modules.ModuleStateError, match=r"submodule 1 \(transformer_engine.pytorch.module.linear"
                                                       r".Linear\) keeps state through get_extra_state"):
        derived(tmp_path / "te.pth")
    with pytest.raises(modules.ModuleStateError, match=r"submodule 0 \(torch.nn.modules.linear.Linear\) has "
                                                       r"state_dict hooks \(transformer_engine.pytorch.module"
                                                       r".linear.hook\)"):
        derived(tmp_path / "hooked.pth")


def test_records_that_contain_themselves_or_explode_are_refused(monkeypatch):
    cls = foreign_class("x", "Net")

    def record(children):
        m = cls()
        m.__setstate__({"_parameters": {}, "_buffers": {}, "_modules": children})
        return m

    loop = record({})
    loop.state["_modules"]["again"] = loop
    with pytest.raises(LimitExceeded, match="contains itself at again"):
        modules.state_dict(loop)
    leaf = cls()
    leaf.__setstate__({"_parameters": {"w": tree.from_torch(torch.zeros(1))}, "_buffers": {}, "_modules": {}})
    node = leaf
    for _ in range(40):  # 2**40 keys if walked naively
        node = record({"a": node, "b": node})
    monkeypatch.setattr(tree, "MAX_NODES", 10_000)
    with pytest.raises(LimitExceeded, match="more than 10000 submodules and tensors"):
        modules.state_dict(node)
    empty = record({})
    for _ in range(40):  # no tensors at all: the walk itself is what explodes
        empty = record({"a": empty, "b": empty})
    with pytest.raises(LimitExceeded, match="more than 10000 submodules"):
        modules.state_dict(empty)


def test_version_and_custom_state_tables_match_installed_torch():
    """modules.VERSIONS / CUSTOM_STATE were taken from torch's classes; this keeps them true when torch moves."""
    import importlib
    import pkgutil
    import warnings

    warnings.filterwarnings("ignore")
    packages = [torch.nn, torch.ao.nn, torch.ao.quantization, torch.ao.pruning, torchvision.models, torchvision.ops]
    for pkg in packages:
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if "test" not in info.name:
                try:
                    importlib.import_module(info.name)
                except Exception:  # noqa: BLE001 - optional back-ends (video, some quantization engines)
                    pass
    importlib.import_module("torch.distributed.nn.api.remote_module")
    base, found, stack = nn.Module, set(), [nn.Module]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    versions, custom = {}, set()
    for c in found:
        name = f"{c.__module__}.{c.__qualname__}"
        if not name.startswith(("torch.", "torchvision.")) or "<locals>" in name:
            continue
        if c._version != 1:
            versions[name] = c._version
        if any(getattr(c, m) is not getattr(base, m) for m in ("_save_to_state_dict", "state_dict",
                                                               "get_extra_state")):
            custom.add(name)
    assert versions == modules.VERSIONS
    assert custom == modules.CUSTOM_STATE


def test_json_inspect_lists_modules(tmp_path):
    torch.save({"generator": nn.Linear(2, 2), "epoch": 1}, tmp_path / "gan.pth")
    result = invoke("inspect", tmp_path / "gan.pth", "--json")
    data = json.loads(result.stdout)
    assert data["sections"]["model"] == ["generator"]
    assert data["modules"] == [{"path": "generator", "class": "torch.nn.modules.linear.Linear", "tensors": 2,
                                "error": None}]


def test_model_only_and_match_take_the_same_state_dict(tmp_path):
    """One rule (issue 15): for {'net': small, 'params': large} --model-only used to take net, --arch params."""
    small, large = nn.Linear(2, 2), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    torch.save({"net": small.state_dict(), "params": large.state_dict(), "epoch": 1}, tmp_path / "two.pth")
    ckconv.convert(tmp_path / "two.pth", tmp_path / "model.pth", model_only=True)
    assert_same_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), large)
    assert ckconv.match(tmp_path / "two.pth", large).section == "params"
