"""Exact allowlists by role, and verdicts that follow the role a pickle gives a name (issue 21 items 3-4).

The allowlist is generated from each module's own classes and checked here against the installed packages; a
re-export (``torch.nn.modules.activation.Tensor`` is ``torch.Tensor``) is on no list. Each hostile case has a
positive control: ``torch.load(weights_only=False)`` in a subprocess does the harmful thing; and ckconv either
refuses to write it (nothing at the destination) or judges it unknown/dangerous, never safe.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import ckconv
from ckconv.cli import cli
from ckconv.pickling import allowlist, policy
from ckconv.pickling.allowlist import Role
from ckconv.pickling.verdicts import Verdict

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "fixtures" / "hostile"


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _module("make_hostile_allowlist", HOSTILE / "make_hostile.py")
P, G, S, I, T = GEN.P, GEN.G, GEN.S, GEN.I, GEN.T


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def torch_load(path, code="", cwd=None) -> str:
    """``torch.load(path, weights_only=False)`` in a subprocess, then ``code`` with the result as ``x``."""
    proc = subprocess.run([sys.executable, "-c", f"import torch, sys\nx = torch.load({str(path)!r}, weights_only=False)"
                           f"\n{code}"], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def pth(path, body: bytes) -> Path:
    path.write_bytes(GEN.torch_zip(P(body)))
    return path


# --- the list itself -------------------------------------------------------------------------------------------

GENERATOR = _module("gen_allowlist", ROOT / "tools" / "gen_allowlist.py")


def test_generated_list_matches_the_installed_packages():
    gen = GENERATOR
    on_disk = (ROOT / "src" / "ckconv" / "pickling" / "allowlist_data.py").read_text()
    assert gen.text() == on_disk, "allowlist_data.py is stale: run python tools/gen_allowlist.py"


def test_declared_names_are_defined_where_they_are_named():
    assert GENERATOR.check_names() == []
    # the checker does catch a re-export
    problems = GENERATOR.check_names(["torch.nn.modules.activation.Tensor", "omegaconf.nodes.Path"])
    assert len(problems) == 2 and all("re-exported" in p for p in problems), problems


@pytest.mark.parametrize("name", ["torch.nn.modules.activation.Tensor", "omegaconf.nodes.Path",
                                  "torchvision.models._api.ModuleType", "torch.nn.modules.module.torch"])
def test_re_exports_are_on_no_list(name):
    module, _, qualname = name.rpartition(".")
    assert allowlist.roles_of(name) == Role(0)
    assert not any(policy.may_write(module, qualname, role) for role in Role)
    assert policy.verdict(module, qualname) is Verdict.UNKNOWN


def test_names_carry_their_roles():
    conv = allowlist.roles_of("torch.nn.modules.conv.Conv2d")
    assert Role.INSTANTIATED in conv and Role.CALLED not in conv and Role.REBUILD not in conv
    assert Role.CALLED in allowlist.roles_of("collections.OrderedDict")
    assert policy.may_write("torch.nn.modules.conv", "Conv2d", Role.INSTANTIATED)
    assert not policy.may_write("torch.nn.modules.conv", "Conv2d", Role.CALLED)
    assert not policy.may_write("argparse", "Namespace", Role.REBUILD)
    assert policy.may_write("pathlib", "PosixPath", Role.CALLED) and not policy.is_dangerous("pathlib", "PosixPath")
    assert policy.is_dangerous("pathlib", "Path.write_text")


def test_plugins_declare_exact_names_with_roles():
    with pytest.raises(ValueError, match="exact dotted name"):
        allowlist.declare({"mylib.*": "i"}, "a plugin")
    allowlist.declare({"mylib.records.LossScaler": "i"}, "a plugin")
    assert policy.may_write("mylib.records", "LossScaler", Role.INSTANTIATED)
    assert not policy.may_write("mylib.records", "LossScaler", Role.CALLED)
    assert policy.verdict("mylib.records", "LossScaler", roles=Role.CALLED) is Verdict.UNKNOWN
    assert "mylib.records.LossScaler" in allowlist.declared()


# --- the writer launders nothing: the gadget -------------------------------------------------------------

def _structure_source(path, record):
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", "ckconv.structure": json.dumps(
        {"w": {"$tensor": "w"}, "x": record})})
    return path


TENSOR_GADGET = {"$object": "torch.nn.modules.activation:Tensor", "new": True, "args": [65536],
                 "state": {"$tuple": [False, None, None]}}


def test_reexported_tensor_gadget_is_refused_and_its_armed_twin_hands_out_memory(tmp_path):
    src = _structure_source(tmp_path / "gadget.safetensors", TENSOR_GADGET)
    dst = tmp_path / "out" / "x.pth"
    dst.parent.mkdir()
    result = invoke("convert", src, dst)
    assert result.exit_code == 1 and "torch.nn.modules.activation.Tensor" in result.stderr
    assert list(dst.parent.iterdir()) == []
    assert invoke("scan", src).exit_code == 1
    # positive control: what a writer that trusted the pattern wrote (the user's allowance forces it here)
    armed = tmp_path / "armed.pth"
    assert invoke("convert", src, armed, "--allow-global", "torch.nn.modules.activation.Tensor").exit_code == 0
    out = torch_load(armed, "t = x['x']; print(type(t).__name__, t.numel())")
    assert out.split() == ["Tensor", "65536"]  # 256 KiB of memory the file never wrote


# --- verdicts by role -----------------------------------------------------------------------------------------------

LINEAR = G("torch.nn.modules.linear", "Linear")
ROLE_CASES = {
    # an allowed class *called* with chosen arguments: torch builds a 2000x2000 layer from ~80 bytes
    "called_class": (b"}(" + S("m") + LINEAR + T(I(2000), I(2000)) + b"Ru", Verdict.UNKNOWN,
                     "print(x['m'].weight.numel())", "4000000"),
    # the same class handed to _rebuild_from_type_v2 as the function to call
    "rebuild_class": (b"}(" + S("m") + G("torch._tensor", "_rebuild_from_type_v2") + T(
        LINEAR, LINEAR, T(I(2000), I(2000)), b"}") + b"Ru", Verdict.UNKNOWN, "print(x['m'].weight.numel())",
        "4000000"),
    # a lowercase torch function ckconv does not reproduce: torch allocates what the file asks
    "torch_zeros": (b"}(" + S("z") + G("torch", "zeros") + T(I(3000), I(1000)) + b"Ru", Verdict.UNKNOWN,
                    "print(x['z'].numel())", "3000000"),
    # ... or changes the loading process's global state
    "torch_state": (b"}(" + S("d") + G("torch", "set_default_dtype") + T(G("torch", "float64")) + b"Ru",
                    Verdict.DANGEROUS, "print(torch.get_default_dtype())", "torch.float64"),
}


@pytest.mark.parametrize("name", sorted(ROLE_CASES))
def test_verdict_follows_the_role_and_torch_does_the_harm(name, tmp_path):
    body, expected, probe, shows = ROLE_CASES[name]
    src = pth(tmp_path / f"{name}.pth", body)
    assert torch_load(src, probe).strip() == shows  # positive control
    scanned = json.loads(invoke("scan", "--json", src).stdout)["results"][0]
    assert scanned["verdict"] == expected, scanned
    out = tmp_path / "out.pth"
    result = invoke("convert", src, out)
    assert result.exit_code == 1 and not out.exists(), result.output


def test_instantiating_an_allowed_class_stays_safe(tmp_path):
    """torch.save(model) pickles modules by NEWOBJ + BUILD: the role the allowlist gives them."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pth")
    scanned = json.loads(invoke("scan", "--json", tmp_path / "m.pth").stdout)["results"][0]
    assert scanned["verdict"] == "safe", scanned
    ckpt = ckconv.read(tmp_path / "m.pth")
    roles = {f"{m}.{q}": r for m, q, r in ckpt.globals}
    assert roles["torch.nn.modules.linear.Linear"] == Role.REFERENCED | Role.INSTANTIATED
    assert Role.CALLED in roles["torch._utils._rebuild_parameter"]


def test_pathlib_paths_are_data(tmp_path):
    src = tmp_path / "paths.pth"
    torch.save({"w": torch.ones(1), "out": pathlib.PurePosixPath("runs/a"), "root": pathlib.Path("/tmp/x")}, src)
    assert invoke("scan", src).exit_code == 0
    inspected = invoke("inspect", src)
    assert inspected.exit_code == 0 and "verdict: safe" in inspected.stdout, inspected.output
    st, back = tmp_path / "p.safetensors", tmp_path / "back.pth"
    assert invoke("convert", src, st).exit_code == 0 and invoke("convert", st, back).exit_code == 0
    out = torch_load(back, "print(repr(x['out']), repr(x['root']))")
    assert out.strip() == "PurePosixPath('runs/a') PosixPath('/tmp/x')"
