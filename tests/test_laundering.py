"""Laundering (issue 14): ckconv never writes a payload it read, whatever format the payload came in.

A safetensors file whose ``ckconv.structure`` holds ``{"$object": "os:system", ...}``, a protocol-4 ``STACK_GLOBAL``
whose strings carry newlines (opcode injection once written as a text ``GLOBAL``), dotted paths the C unpickler
resolves (``argparse._os.system``), gadgets that are on no deny-list, and DCP ``.metadata`` whose ``planner_data``
is a payload, calls that call their argument, allowlisted constructors given terabyte sizes. The corpus is
``fixtures/hostile/make_hostile.py``'s ``LAUNDERING`` cases; every payload creates a canary file ``CKCONV_PWNED`` in
the current folder when something runs it, or (the allocation bombs) exhausts a 1 GiB address-space cap.

For every case and every output format: ckconv refuses (exit 1, one ``Error:`` line naming the global, nothing at
the destination) or writes an output that names only benign globals and that ``torch.load(weights_only=False)``, in
a subprocess, loads without creating the canary. Positive controls prove each payload does create it when loaded
the way a laundered output would be.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickletools
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckconv.cli import cli

HOSTILE = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"


def _generator():
    spec = importlib.util.spec_from_file_location("make_hostile_laundering", HOSTILE / "make_hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
CANARY = GEN.CANARY
LAUNDERING = GEN.LAUNDERING
MANIFEST = json.loads((HOSTILE / "expected.json").read_text())
CASES = sorted(LAUNDERING)
DANGEROUS = [n for n in CASES if LAUNDERING[n]["verdict"] == "dangerous"]
UNKNOWN = [n for n in CASES if LAUNDERING[n]["verdict"] == "unknown"]

# What ckconv may name in a pickle it writes for these inputs (tensors, containers, argparse.Namespace, DCP's own
# metadata classes). Anything else in an output is a laundered global.
BENIGN = {
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter", "torch.storage.UntypedStorage",
    "torch.Size", "torch.device", "builtins.set", "builtins.frozenset", "builtins.complex", "builtins.bytearray",
    "_codecs.encode", "copyreg._reconstructor", "builtins.object", "argparse.Namespace",
    *(f"builtins.{t}" for t in ("str", "int", "float", "bool", "list", "dict", "tuple", "bytes", "slice", "range")),
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.serialization._get_layout",
}
BENIGN_PREFIXES = ("torch.distributed.checkpoint.metadata.",)


def is_benign(name: str) -> bool:
    if name in BENIGN or name.startswith(BENIGN_PREFIXES):
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and attr.isidentifier() and (
        attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype))


# --- reading what an output names, without running it ---------------------------------------------------------------

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def globals_in(data: bytes) -> list:
    """Every global a pickle names (GLOBAL, INST, STACK_GLOBAL), found with pickletools.genops: nothing is run."""
    names, pushed, memo = [], [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", ".", 1))
        elif op.name == "STACK_GLOBAL":
            top = pushed[-2:]
            names.append(".".join(top) if len(top) == 2 and all(isinstance(s, str) for s in top)
                         else "<STACK_GLOBAL of computed strings>")
        if op.name in _STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else arg.decode("latin1"))
        elif op.name in _GET_OPS:
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in _PUT_OPS:
            memo[arg] = pushed[-1] if pushed else None
        elif op.name not in ("FRAME", "PROTO"):
            pushed.append(None)
    return names


def _zip_pickles(data: bytes) -> list:
    """The data.pkl records of every zip archive inside ``data`` (a .pth, or a .distcp of many archives)."""
    out, pos = [], data.find(b"PK\x03\x04")
    while pos >= 0:
        if pos + 30 <= len(data):
            csize, _, nlen, xlen = struct.unpack("<IIHH", data[pos + 18:pos + 30])
            name = data[pos + 30:pos + 30 + nlen]
            start = pos + 30 + nlen + xlen
            if name.endswith(b"data.pkl") and csize != 0xFFFFFFFF:
                out.append(data[start:start + csize])
        pos = data.find(b"PK\x03\x04", pos + 4)
    return out


def pickles_of(path: Path) -> list:
    if path.is_dir():
        found = [(path / ".metadata").read_bytes()] if (path / ".metadata").exists() else []
        for part in sorted([*path.glob("*.distcp"), *path.glob("*.bin")]):
            found += _zip_pickles(part.read_bytes())
        return found
    data = path.read_bytes()
    return _zip_pickles(data) if data[:4] == b"PK\x03\x04" else [data]


def foreign_globals(path: Path) -> list:
    """Globals an output names that are not benign (a malformed pickle counts as one)."""
    bad = []
    for data in pickles_of(path):
        try:
            bad += [g for g in globals_in(data) if not is_benign(g)]
        except Exception as exc:  # noqa: BLE001 - an unparseable pickle in an output is itself a finding
            bad.append(f"<malformed pickle: {exc}>")
    return bad


# --- loading with torch, in a subprocess ------------------------------------------------------------------------

LOADER = r"""
import os, resource, sys, warnings
warnings.simplefilter("ignore")
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

# 1 GiB of address space beyond what importing torch took: an output that needs more is a memory bomb (it fails
# here with MemoryError instead of taking the machine down).
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
for index, (cwd, path) in enumerate(zip(sys.argv[1::2], sys.argv[2::2])):
    os.chdir(cwd)
    os.environ["TORCH_HOME"] = os.path.join(cwd, "torch_home")  # torch.hub downloads land here, never in ~
    try:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata")):
            dcp_to_torch_save(path, os.path.join(cwd, "as_torch_save.pt"))
        elif os.path.isdir(path):  # a torch-sharded folder: every shard, as transformers loads them
            for shard in sorted(f for f in os.listdir(path) if f.endswith(".bin")):
                torch.load(os.path.join(path, shard), weights_only=False)
        else:
            torch.load(path, weights_only=False)
        print("RESULT", index, "loaded", flush=True)
    except BaseException as exc:
        kind = type(exc).__name__
        if "MemoryError" in str(exc) or "returned NULL" in str(exc):  # wrapped by DCP's CheckpointException
            kind = "MemoryError"
        print("RESULT", index, kind, path, str(exc)[:200].replace(chr(10), " "), flush=True)
"""
MEMORY_ERRORS = ("MemoryError", "SystemError")  # deque(...) reports exhaustion as "returned NULL" SystemError


def torch_load_each(items):
    """Load every (cwd, path) with torch (DCP folders as torch's dcp_to_torch_save does), each in its own cwd,
    beside the file the hub case's URL names (it runs only if a laundered call downloads and loads it), under an
    address-space cap. -> ([outcome per item: "loaded" or the exception's type name], log)."""
    for cwd, _ in items:
        (Path(cwd) / GEN.REMOTE_PAYLOAD).write_bytes(GEN.remote_payload_bytes())
    args = [str(a) for cwd, path in items for a in (cwd, path)]
    proc = subprocess.run([sys.executable, "-c", LOADER, *args], capture_output=True, text=True, timeout=600)
    outcomes = ["no result"] * len(items)
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "RESULT":
            outcomes[int(parts[1])] = parts[2]
    return outcomes, proc.stdout + proc.stderr


def canaries(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob(CANARY))


# --- running ckconv ---------------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def names_for(name) -> list:
    """Substrings of which one must be in the refusal: the dotted global (or module:qualname, its safetensors
    spelling); for names that carry newlines, the printable part (they must be shown escaped, on one line)."""
    out = []
    for module, qualname in LAUNDERING[name]["globals"]:
        if "\n" in module or "\n" in qualname:
            out.append("OrderedDict")
        else:
            out += [f"{module}.{qualname}", f"{module}:{qualname}"]
    return out


def outcome(result, dst: Path, name: str, what: str, tmp_path: Path, problems: list) -> bool:
    """Record problems with one conversion; True when it wrote ``dst``."""
    if canaries(tmp_path):
        problems.append(f"{what}: a payload ran inside ckconv ({canaries(tmp_path)})")
    if result.exit_code == 0:
        if not dst.exists():
            problems.append(f"{what}: exit 0 but nothing at {dst.name}")
        return dst.exists()
    lines = result.stderr.splitlines()
    if result.exit_code != 1:
        problems.append(f"{what}: exit {result.exit_code}, expected 0 or 1: {result.output[-300:]!r}")
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"{what}: raised {result.exception!r}")
    elif len(lines) != 1 or not lines[0].startswith("Error: "):
        problems.append(f"{what}: stderr is not one Error: line: {result.stderr[-300:]!r}")
    elif not any(n in lines[0] for n in names_for(name)):
        problems.append(f"{what}: the refusal does not name {names_for(name)[0]!r}: {lines[0][:300]!r}")
    elif "internal error" in lines[0] or "Traceback" in result.output:
        problems.append(f"{what}: {lines[0][:300]!r}")
    left = sorted(p.name for p in dst.parent.iterdir())
    if left:
        problems.append(f"{what}: refused, yet left {left} at the destination")
    return False


def convert_into(src: Path, tmp_path: Path, label: str, target: str, *extra):
    folder = tmp_path / label
    folder.mkdir()
    dst = folder / target
    return invoke("convert", src, dst, *extra), dst


TARGETS = [("pth", "out.pth", ()), ("safetensors", "out.safetensors", ()), ("dcp", "out_dcp", ("--to", "dcp")),
           ("torch-sharded", "out_bin", ("--to", "torch-sharded"))]


@pytest.mark.parametrize("name", CASES)
def test_conversions_never_arm_the_payload(name, tmp_path, monkeypatch):
    """convert CASE to .pth, .safetensors, DCP and torch-sharded (then any safetensors output back to the pickle
    formats): each either refuses cleanly naming the global, or writes an output that names only benign globals
    and runs nothing when torch.load(weights_only=False) loads it."""
    monkeypatch.chdir(tmp_path)
    src = HOSTILE / name
    problems: list = []
    written: list = []
    for label, target, extra in TARGETS:
        result, dst = convert_into(src, tmp_path, f"to_{label}", target, *extra)
        if outcome(result, dst, name, f"convert {name} -> {label}", tmp_path, problems):
            written.append((f"{name} -> {label}", dst))
    for what, dst in list(written):
        if dst.suffix != ".safetensors":
            continue
        for label, target, extra in [t for t in TARGETS if t[0] != "safetensors"]:
            result, back = convert_into(dst, tmp_path, f"back_{label}", target, *extra)
            if outcome(result, back, name, f"{what} -> {label}", tmp_path, problems):
                written.append((f"{what} -> {label}", back))
    loads = []
    for what, dst in written:
        if dst.suffix == ".safetensors":
            continue
        bad = foreign_globals(dst)
        if bad:
            problems.append(f"{what}: the output names {sorted(set(bad))[:6]}")
        cwd = tmp_path / "load" / str(len(loads))
        cwd.mkdir(parents=True)
        loads.append((cwd, dst))
    outcomes, log = torch_load_each(loads) if loads else ([], "")
    if canaries(tmp_path):
        problems.append(f"torch.load of ckconv's output ran the payload: {canaries(tmp_path)}\n{log[-1500:]}")
    for (cwd, dst), result in zip(loads, outcomes):
        if result in MEMORY_ERRORS or result == "no result":
            problems.append(f"torch.load of {dst.relative_to(tmp_path)} exhausted 1 GiB of memory ({result})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", CASES)
def test_inspect_names_the_payload(name, tmp_path, monkeypatch):
    """inspect names the global with its verdict; a dangerous file exits 1 (report still printed, text and JSON)."""
    monkeypatch.chdir(tmp_path)
    spec = LAUNDERING[name]
    text = invoke("inspect", HOSTILE / name)
    as_json = invoke("inspect", "--json", HOSTILE / name)
    assert not canaries(tmp_path), "inspect ran the payload"
    for result in (text, as_json):
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output and "internal error" not in result.output, result.output[-500:]
        assert any(n in result.output for n in names_for(name)), (name, result.output[-800:])
        if spec["verdict"] == "dangerous":
            assert result.exit_code == 1, (name, result.exit_code, result.output[-800:])
        else:
            assert result.exit_code in (0, 1), (name, result.exit_code, result.output[-800:])
            # not on the allowlist: reported as unknown (or dangerous), never as safe
            assert "unknown" in result.output.lower() or "dangerous" in result.output.lower(), (
                name, result.output[-800:])
    assert HOSTILE.as_posix() in text.stdout or name in text.stdout, "the report was not printed"
    json.loads(as_json.stdout)
    injected = [line for line in text.output.splitlines()
                if line in ("system", "str") or line.startswith(("(V", "tR0"))]
    assert not injected, f"a name with newlines was printed raw: {injected}"


# --- positive controls: each payload does run when loaded the way a laundered output would be ----------------------

@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    """Load, with torch, every case's armed twin (the payload as a pickle call) and every source that torch itself
    would run; -> {(case, "armed" | "source"): canary created}."""
    root = tmp_path_factory.mktemp("positive-controls")
    items, keys = [], []
    for name in CASES:
        for kind in ("armed", "source"):
            cwd = root / f"{name}-{kind}"
            cwd.mkdir()
            path = GEN.armed(name, cwd) if kind == "armed" else HOSTILE / name
            if kind == "source" and path.suffix == ".safetensors":
                continue
            items.append((cwd, path))
            keys.append((name, kind, cwd))
    outcomes, log = torch_load_each(items)
    ran = {}
    for (name, kind, cwd), result in zip(keys, outcomes):
        memory = LAUNDERING[name]["effect"] == "memory"
        ran[(name, kind)] = result in MEMORY_ERRORS if memory else (cwd / CANARY).exists()
    return ran, log


@pytest.mark.parametrize("name", CASES)
def test_positive_control_the_payload_runs_under_torch(name, torch_runs):
    """The armed twin creates the canary (or exhausts the memory cap, for the allocation bombs)."""
    ran, log = torch_runs
    assert ran[(name, "armed")], f"the armed twin of {name} did not run its payload:\n{log[-2000:]}"
    if (name, "source") in ran:
        # True: torch.load of the source itself runs it; False: only a laundering writer arms it (newline names).
        assert ran[(name, "source")] is LAUNDERING[name]["runs_under_torch"], (name, log[-2000:])


def test_corpus_lists_every_laundering_case():
    for name in CASES:
        assert name in MANIFEST, f"{name} missing from expected.json: run fixtures/hostile/make_hostile.py"
        assert (HOSTILE / name).exists(), f"{name} missing: run fixtures/hostile/make_hostile.py"
        expected = MANIFEST[name]
        assert (expected is None) == (LAUNDERING[name]["verdict"] == "unknown"), name
    kinds = {n.split("_")[0] for n in CASES}
    assert {"st", "p4", "gadget", "unknown", "dcp", "escape", "generator", "deque"} <= kinds
    assert len(DANGEROUS) >= 20 and len(UNKNOWN) >= 2


# --- the allowlist: its two ways out, and what they cannot allow ---------------------------------------------------

def _refused(result, dst, needles):
    assert result.exit_code == 1, (result.exit_code, result.output[-600:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr[-600:]
    assert any(n in lines[0] for n in needles), (needles, lines[0][:400])
    assert not dst.exists() and list(dst.parent.iterdir()) == []


@pytest.mark.parametrize("name, pattern", [("p4_newline_name.pth", "collections.*"),
                                           ("p4_newline_module.pth", "collections.*"),
                                           ("st_object_newline_name.safetensors", "collections.*"),
                                           ("p4_argparse_os_system.pth", "argparse.*"),
                                           ("st_object_argparse_os_system.safetensors", "argparse.*"),
                                           ("p4_numpy_runstring.pth", "numpy.*")])
def test_allow_global_cannot_let_a_non_name_or_a_dangerous_path_through(name, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "out.pth"
    result = invoke("convert", HOSTILE / name, dst, "--allow-global", pattern)
    _refused(result, dst, names_for(name))
    assert not canaries(tmp_path)


@pytest.mark.parametrize("name", ["unknown_logging_filehandler.pth", "st_object_unknown_filehandler.safetensors"])
def test_unknown_global_is_refused_for_pickles_and_allowed_by_the_user(name, tmp_path, monkeypatch):
    """Not on any deny-list: only the writing allowlist stops it. The refusal names it and says how to allow it;
    --allow-global (CLI) and allow_globals= (API) write it, because the user said so (the output is not loaded)."""
    import ckconv
    from ckconv.errors import CkconvError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "out.pth"
    result = invoke("convert", HOSTILE / name, dst)
    _refused(result, dst, ["logging.FileHandler"])
    assert "--allow-global" in result.stderr
    with pytest.raises(CkconvError, match="logging.FileHandler"):
        ckconv.convert(HOSTILE / name, dst)
    assert not dst.exists()

    result = invoke("convert", HOSTILE / name, dst, "--allow-global", "logging.FileHandler")
    assert result.exit_code == 0, result.output[-600:]
    assert "logging.FileHandler" in [g for data in pickles_of(dst) for g in globals_in(data)]
    api_dst = tmp_path / "out" / "api.pth"
    ckconv.convert(HOSTILE / name, api_dst, allow_globals=["logging.*"])
    assert "logging.FileHandler" in [g for data in pickles_of(api_dst) for g in globals_in(data)]
    assert not canaries(tmp_path)


def test_benign_foreign_objects_still_convert_to_pickles(tmp_path, monkeypatch):
    """The allowlist must not refuse what real checkpoints hold: argparse.Namespace, .pth -> .pth and through
    safetensors, loads in torch as a Namespace."""
    monkeypatch.chdir(tmp_path)
    src = HOSTILE / "legit_foreign_objects.pth"
    assert invoke("convert", src, tmp_path / "a.pth").exit_code == 0
    assert invoke("convert", src, tmp_path / "b.safetensors").exit_code == 0
    result = invoke("convert", tmp_path / "b.safetensors", tmp_path / "c.pth")
    assert result.exit_code == 0, result.output[-600:]
    for out in ("a.pth", "c.pth"):
        assert foreign_globals(tmp_path / out) == [], out
        code = ("import torch, sys; o = torch.load(sys.argv[1], weights_only=False); "
                "print(type(o['args']).__module__, type(o['args']).__name__, o['args'].lr, o['args'].arch)")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / out)], capture_output=True, text=True,
                              timeout=300)
        assert proc.stdout.split() == ["argparse", "Namespace", "0.1", "tiny"], proc.stdout + proc.stderr[-600:]


def test_globals_in_sees_injected_opcodes():
    """The checker itself: a text GLOBAL whose name carries newlines shows the os.system it injects."""
    data = io.BytesIO(GEN.armed_bytes(*GEN.NEWLINE_NAME, []))
    import zipfile

    pkl = zipfile.ZipFile(data).read("archive/data.pkl")
    assert "os.system" in globals_in(pkl)
    stacked = GEN.P(GEN.stack_global("argparse", "_os.system") + b"0N", proto=4)
    assert globals_in(stacked) == ["argparse._os.system"]
