"""The writing policy (issue 14) and what it lets through losslessly (issue 12): whole pickled modules, numpy
values, class references, ``getattr`` references; and what it refuses: unknown or dangerous globals, names that
are not names. Outputs are loaded by torch in a subprocess, as a user would."""

from __future__ import annotations

import argparse
import collections
import json
import pickle
import pickletools
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file

import ckconv
from ckconv.pickling import policy
from ckconv.cli import cli
from ckconv.errors import UnsafeCheckpoint


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_python(code, cwd):
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def pickle_globals(path) -> set:
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.fixture(scope="module")
def whole_resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("whole") / "whole.pth"
    torch.save(model, path)
    return path


def test_whole_module_roundtrips_through_safetensors_and_back(whole_resnet, tmp_path):
    st, back, direct = tmp_path / "w.safetensors", tmp_path / "back.pth", tmp_path / "direct.pth"
    assert invoke("convert", whole_resnet, st).exit_code == 0
    assert invoke("convert", st, back).exit_code == 0
    assert invoke("convert", whole_resnet, direct).exit_code == 0
    for out in (back, direct):
        assert all(g.split(" ")[0].startswith(("torch", "torchvision", "collections", "builtins", "copyreg"))
                   for g in pickle_globals(out)), pickle_globals(out)
    out = run_python(f"""
import torch
a = torch.load({str(whole_resnet)!r}, weights_only=False).eval()
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
for p in ({str(back)!r}, {str(direct)!r}):
    b = torch.load(p, weights_only=False).eval()
    assert type(b) is type(a) and b._norm_layer is torch.nn.BatchNorm2d
    assert list(a.state_dict()) == list(b.state_dict())
    assert torch.equal(a(x), b(x))
print("ok")
""", tmp_path)
    assert out.strip() == "ok"


def test_numpy_and_rng_state_roundtrip_bit_exact_with_their_types(tmp_path):
    g = np.random.default_rng(0)
    value = {
        "arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), g.integers(0, 9, (2, 2, 2)).astype(np.int16),
                   np.asfortranarray(g.random((3, 4))), np.array([True, False]), np.array(b"xy"), np.zeros((0, 3))],
        "scalars": [np.float64(1.5), np.int64(-7), np.float16(0.25), np.bool_(True)],
        "np_rng": np.random.get_state(), "py_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
        "dtype": np.dtype(">i4"), "cls": np.ndarray, "ns": argparse.Namespace(lr=0.1, name="run"),
        "dd": collections.defaultdict(list, {"a": [1]}), "weight": torch.randn(3),
    }
    src = tmp_path / "np.pth"
    torch.save(value, src)
    st, back = tmp_path / "np.safetensors", tmp_path / "np_back.pth"
    assert invoke("convert", src, st).exit_code == 0
    assert invoke("convert", st, back).exit_code == 0
    loaded = ckconv.load(src)  # real numpy objects, built from bytes without unpickling
    assert isinstance(loaded["arrays"][0], np.ndarray) and np.array_equal(loaded["arrays"][0], value["arrays"][0])
    assert loaded["arrays"][2].flags.f_contiguous and np.array_equal(loaded["arrays"][2], value["arrays"][2])
    assert type(loaded["scalars"][0]) is np.float64 and loaded["scalars"][1] == -7
    assert loaded["dtype"] == np.dtype(">i4")
    out = run_python(f"""
import numpy as np, torch, random, pickle
a = torch.load({str(src)!r}, weights_only=False)
b = torch.load({str(back)!r}, weights_only=False)
def same(x, y):
    if isinstance(x, np.ndarray):
        return type(y) is np.ndarray and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() \\
            and x.flags.f_contiguous == y.flags.f_contiguous
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
    if isinstance(x, dict):
        return type(x) is type(y) and list(x) == list(y) and all(same(x[k], y[k]) for k in x)
    return type(x) is type(y) and (x == y or pickle.dumps(x) == pickle.dumps(y))
bad = [k for k in a if not same(a[k], b[k])]
assert not bad, bad
np.random.set_state(b["np_rng"]); random.setstate(b["py_rng"]); torch.set_rng_state(b["torch_rng"])
print("ok")
""", tmp_path)
    assert out.strip() == "ok"


def _unknown_source(tmp_path):
    """A safetensors file whose structure names a global on no list (inert here, a call once in a pickle)."""
    path = tmp_path / "unknown.safetensors"
    record = {"$object": "mylib.records:Payload", "args": ["touch CANARY"]}
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", "ckconv.structure": json.dumps(
        {"w": {"$tensor": "w"}, "x": record})})
    return path


def test_unknown_global_is_refused_for_pickles_with_both_ways_out(tmp_path):
    src = _unknown_source(tmp_path)
    dst = tmp_path / "out" / "x.pth"
    dst.parent.mkdir()
    result = invoke("convert", src, dst)
    assert result.exit_code == 1
    line, = result.stderr.splitlines()
    assert "mylib.records.Payload" in line and "--allow-global" in line
    assert list(dst.parent.iterdir()) == []
    with pytest.raises(UnsafeCheckpoint):
        ckconv.convert(src, dst)
    # safetensors output stays inert and is allowed; inspect says unknown (a warning, exit 0); scan fails
    assert invoke("convert", src, tmp_path / "copy.safetensors").exit_code == 0
    inspected = invoke("inspect", src)
    assert inspected.exit_code == 0 and "unknown" in inspected.stdout and "warning:" in inspected.stderr
    assert invoke("scan", src).exit_code == 1
    assert invoke("scan", "--allow-global", "mylib.*", src).exit_code == 0
    # the user's explicit allowance, as a whole dotted path or a prefix pattern
    for allowed in ("mylib.records.Payload", "mylib.*"):
        target = tmp_path / f"allowed-{allowed}.pth"
        assert invoke("convert", src, target, "--allow-global", allowed).exit_code == 0
        assert "mylib.records Payload" in pickle_globals(target)
    ckconv.convert(src, tmp_path / "api.pth", allow_globals=["mylib.records.*"])
    # a pattern cannot reach past the prefix it names
    assert invoke("convert", src, tmp_path / "no.pth", "--allow-global", "mylib.rec*").exit_code == 2  # usage


@pytest.mark.parametrize("pattern", ["os.system\nx", "", "my lib.*", "a..b", "*"])
def test_invalid_allow_global_is_a_usage_error(tmp_path, pattern):
    result = invoke("convert", _unknown_source(tmp_path), tmp_path / "x.pth", "--allow-global", pattern)
    assert result.exit_code == 2 and "invalid --allow-global" in result.stderr
    assert not (tmp_path / "x.pth").exists()


def test_allow_global_cannot_allow_what_is_dangerous():
    assert not policy.may_write("os", "system", "call", ("os.*",))
    assert not policy.may_write("builtins", "eval", "call", ("builtins.*",))
    assert not policy.may_write("argparse", "_os.system", "class", ("argparse.*",))
    assert not policy.may_write("collections", "OrderedDict\nos", "call", ())


@pytest.mark.parametrize("module, qualname, expected", [
    ("os", "system", "dangerous"), ("posix", "system", "dangerous"), ("builtins", "eval", "dangerous"),
    ("argparse", "_os.system", "dangerous"), ("numpy", "testing._private.utils.runstring", "dangerous"),
    ("pydoc", "pipepager", "dangerous"), ("torch.fx.graph_module", "reduce_graph_module", "dangerous"),
    ("torch.utils.collect_env", "run", "dangerous"), ("_osx_support", "_read_output", "dangerous"),
    ("imaplib", "IMAP4_stream", "dangerous"), ("logging.config", "dictConfig", "dangerous"),
    ("numpy", "savetxt", "dangerous"), ("codecs", "open", "dangerous"), ("collections", "OrderedDict\nx", "dangerous"),
    ("a b", "c", "dangerous"), ("logging", "FileHandler", "unknown"), ("mylib", "Thing", "unknown"),
    ("collections", "OrderedDict", "safe"), ("numpy._core.multiarray", "_reconstruct", "safe"),
    ("torch.nn.modules.conv", "Conv2d", "safe"), ("argparse", "Namespace", "safe"), ("torch", "FloatStorage", "safe"),
    ("mmengine.logging.history_buffer", "HistoryBuffer.min", "safe"),
])
def test_verdicts(module, qualname, expected):
    assert policy.verdict(module, qualname) == expected


def _history_buffer_pickle() -> bytes:
    """mmengine's HistoryBuffer as protocol 2 pickles its statistics methods: ``getattr(HistoryBuffer, 'min')``
    (copied from what mmengine 0.10's runner checkpoints hold under message_hub's runtime info)."""
    cls = b"cmmengine.logging.history_buffer\nHistoryBuffer\nq\x00"
    return (b"\x80\x02}q\x01X\x07\x00\x00\x00methodsq\x02]q\x03(c__builtin__\ngetattr\nq\x04" + cls
            + b"X\x03\x00\x00\x00minq\x05\x86q\x06Rq\x07h\x04h\x00X\x04\x00\x00\x00meanq\x08\x86Rq\tes"
            + b"X\x06\x00\x00\x00bufferq\nh\x00)\x81q\x0b}q\x0cX\x04\x00\x00\x00_maxq\rK\nsbs.")


def test_getattr_on_a_class_record_is_a_reference(tmp_path):
    src = tmp_path / "mm.pkl"
    src.write_bytes(_history_buffer_pickle())
    ckpt = ckconv.read(src)
    refs = ckpt.root["methods"]
    assert [r.qualname for r in refs] == ["HistoryBuffer.min", "HistoryBuffer.mean"]
    assert invoke("inspect", src).exit_code == 0
    out = tmp_path / "mm.pth"
    assert invoke("convert", src, out).exit_code == 0
    assert "__builtin__ getattr" in pickle_globals(out) or "builtins getattr" in pickle_globals(out)
    back = ckconv.read(out).root
    assert [r.qualname for r in back["methods"]] == ["HistoryBuffer.min", "HistoryBuffer.mean"]
    assert back["buffer"].state == {"_max": 10} and back["buffer"].newobj
    st = tmp_path / "mm.safetensors"
    assert invoke("convert", src, st).exit_code == 0
    assert invoke("diff", out, st).exit_code == 0


@pytest.mark.parametrize("payload", [
    b"\x80\x02c__builtin__\ngetattr\ncbuiltins\n__import__\nX\x02\x00\x00\x00os\x85RX\x06\x00\x00\x00system\x86R.",
    b"\x80\x02c__builtin__\ngetattr\ncmmengine.x\nY\nX\x08\x00\x00\x00__init__\x86R.",
])
def test_getattr_that_reaches_code_is_refused(tmp_path, payload):
    src = tmp_path / "g.pkl"
    src.write_bytes(payload)
    result = invoke("convert", src, tmp_path / "o.safetensors")
    assert result.exit_code == 1 and "refusing to load" in result.stderr
    inspected = invoke("inspect", src)
    assert inspected.exit_code == 1 and "getattr" in inspected.stdout


def test_stack_global_with_newlines_never_reaches_an_output(tmp_path):
    def short(s):
        return b"\x8c" + bytes([len(s)]) + s
    body = (short(b"collections\nOrderedDict\ncposix\nsystem") + short(b"x") + b"\x93" + b")R.")
    src = tmp_path / "nl.pkl"
    src.write_bytes(b"\x80\x04" + body)
    result = invoke("convert", src, tmp_path / "o.pth")
    assert result.exit_code == 1 and "\n" not in result.stderr.strip() and not (tmp_path / "o.pth").exists()
    inspected = invoke("inspect", src)
    assert inspected.exit_code == 1 and "posix\nsystem" not in inspected.stdout


def test_written_pickles_name_only_valid_globals(tmp_path):
    from ckconv.model import foreign_class
    from ckconv.pickling.writer import PickleWriter

    bad = foreign_class("collections", "OrderedDict\ncposix\nsystem")
    for value in (bad(), bad, {"k": [bad.__new__(bad)]}):
        with pytest.raises(UnsafeCheckpoint, match="refusing to write"):
            PickleWriter(lambda st: "0", allow=("collections.*",)).dumps(value)


def test_scan_a_folder_mixing_clean_broken_dangerous_and_unknown(tmp_path, whole_resnet):
    import os

    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, root / "clean.pth")
    save_file({"w": torch.ones(3)}, root / "sub" / "clean.safetensors")
    data = bytearray((root / "clean.pth").read_bytes())
    torch.save({"w": torch.arange(1000.0)}, root / "crc.pth")
    raw = bytearray((root / "crc.pth").read_bytes())
    pos = raw.find(np.arange(1000.0, dtype=np.float32)[500:502].tobytes())
    raw[pos] ^= 1
    (root / "crc.pth").write_bytes(bytes(raw))
    (root / "sub" / "payload.pkl").write_bytes(pickle.dumps({"x": _Reduce(os.system, "true")}, protocol=2))
    _unknown_source(root / "sub")
    (root / "config.json").write_text("{}")
    (root / "notes.pth").write_bytes(b"\x89PNG....")
    os.mkfifo(root / "pipe")
    result = invoke("scan", "--json", root)
    assert result.exit_code == 1
    by_name = {Path(r["path"]).name: r["verdict"] for r in json.loads(result.stdout)["results"]}
    assert by_name == {"clean.pth": "safe", "clean.safetensors": "safe", "crc.pth": "broken",
                       "payload.pkl": "dangerous", "unknown.safetensors": "unknown", "notes.pth": "broken",
                       "config.json": "skipped", "pipe": "skipped"}, by_name
    text = invoke("scan", root)
    lines = [line for line in text.stdout.splitlines() if line]
    assert len(lines) == 6 and any(line.startswith("BROKEN") and "CRC" in line for line in lines)
    assert invoke("scan", root / "clean.pth", root / "sub" / "clean.safetensors").exit_code == 0
    assert invoke("scan", tmp_path / "missing").exit_code == 2


def test_scan_a_huggingface_cache_tree_follows_snapshot_links_once(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, repo / "blobs" / "deadbeef")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    result = invoke("scan", "--json", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    scanned = [r for r in json.loads(result.stdout)["results"] if r["verdict"] != "skipped"]
    assert len(scanned) == 1 and scanned[0]["verdict"] == "safe"


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_omegaconf_and_lightning_configs_roundtrip_with_their_back_references(tmp_path):
    from lightning.fabric.utilities.data import AttributeDict
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"depth": 3, "act": "relu", "ref": "${model.act}"}, "lrs": [0.1, 0.01]})
    src = tmp_path / "cfg.pth"
    torch.save({"cfg": cfg, "hparams": AttributeDict(width=8), "w": torch.ones(2)}, src)
    inspected = invoke("inspect", src)
    assert inspected.exit_code == 0 and "verdict: safe" in inspected.stdout, inspected.output
    st, back, direct = tmp_path / "cfg.safetensors", tmp_path / "back.pth", tmp_path / "direct.pth"
    for a, b in ((src, st), (st, back), (src, direct)):
        result = invoke("convert", a, b)
        assert result.exit_code == 0, result.output
    out = run_python(f"""
import torch
a = torch.load({str(src)!r}, weights_only=False)
for p in ({str(back)!r}, {str(direct)!r}):
    b = torch.load(p, weights_only=False)
    assert b["cfg"] == a["cfg"] and b["cfg"].model.ref == "relu"  # interpolation walks the parent links
    assert b["cfg"].model._get_parent() is b["cfg"]
    assert type(b["hparams"]).__name__ == "AttributeDict" and b["hparams"] == a["hparams"]
print("ok")
""", tmp_path)
    assert out.strip() == "ok"


@pytest.mark.parametrize("structure", [
    {"x": {"$ref": 0}}, {"x": {"$object": "argparse:Namespace", "id": 0, "args": [], "state": {"me": {"$ref": 1}}}},
    {"x": [{"$object": "argparse:Namespace", "id": 0, "args": []}, {"$object": "argparse:Namespace", "id": 0}]},
])
def test_structure_references_must_point_back(tmp_path, structure):
    path = tmp_path / "ref.safetensors"
    save_file({"w": torch.ones(1)}, path, metadata={"format": "pt", "ckconv.structure": json.dumps(
        {"w": {"$tensor": "w"}, **structure})})
    result = invoke("convert", path, tmp_path / "o.pth")
    assert result.exit_code == 1 and "ckconv.structure" in result.stderr and not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("record", [
    {"$object": "numpy:ndarray", "new": True, "args": [{"$tuple": [1 << 40]}]},
    {"$object": "collections:deque", "args": [{"$object": "argparse:Namespace", "new": True, "args": []}]},
    {"$object": "numpy._core.multiarray:_reconstruct", "args": [{"$class": "numpy:ndarray"},
                                                                  {"$tuple": [1 << 30, 1 << 30]}, {"$bytes": "Yg=="}]},
])
def test_allowed_names_with_expanding_arguments_are_not_written(tmp_path, record):
    path = tmp_path / "bomb.safetensors"
    save_file({"w": torch.ones(1)}, path, metadata={"format": "pt", "ckconv.structure": json.dumps(
        {"w": {"$tensor": "w"}, "x": record})})
    result = invoke("convert", path, tmp_path / "o.pth")
    assert result.exit_code == 1 and "refusing to write" in result.stderr and not (tmp_path / "o.pth").exists()


def test_scan_an_accelerate_output_folder_reads_every_file_once(tmp_path):
    """accelerate's save_state: model.safetensors beside optimizer.bin and random_states_0.pkl (numpy and Python
    RNG states): the folder reads as a safetensors checkpoint, and the files beside it are scanned too."""
    from accelerate import Accelerator

    out = tmp_path / "acc"
    run_python(f"""
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=True)
m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
m, opt = acc.prepare(m, opt)
acc.save_state({str(out)!r})
""", tmp_path)
    del Accelerator
    result = invoke("scan", "--json", out)
    assert result.exit_code == 0, result.output
    found = {Path(r["path"]).name: r["verdict"] for r in json.loads(result.stdout)["results"]}
    assert found == {"acc": "safe", "optimizer.bin": "safe", "random_states_0.pkl": "safe"}, found
    states = out / "random_states_0.pkl"
    st, back = tmp_path / "rs.safetensors", tmp_path / "rs.pth"
    assert invoke("convert", states, st).exit_code == 0 and invoke("convert", st, back).exit_code == 0
    assert invoke("convert", states, tmp_path / "plain.pth", "--plain").exit_code == 0
    run_python(f"""
import torch, numpy as np, random
a = torch.load({str(states)!r}, weights_only=False)
b = torch.load({str(back)!r}, weights_only=False)
assert a.keys() == b.keys() and a["random_state"] == b["random_state"]
assert a["numpy_random_seed"][0] == b["numpy_random_seed"][0]
assert np.array_equal(a["numpy_random_seed"][1], b["numpy_random_seed"][1])
assert torch.equal(a["torch_manual_seed"], b["torch_manual_seed"])
p = torch.load({str(tmp_path / 'plain.pth')!r}, weights_only=True)
np.random.set_state((p["numpy_random_seed"][0], p["numpy_random_seed"][1].numpy(), *p["numpy_random_seed"][2:]))
assert np.array_equal(np.random.get_state()[1], a["numpy_random_seed"][1])
print("ok")
""", tmp_path)


def test_inspect_shows_numpy_values_and_references_at_a_glance(tmp_path):
    torch.save({"w": torch.ones(1), "arr": np.zeros((2, 3), np.float32), "lr": np.float64(0.5),
                "norm": torch.nn.BatchNorm2d}, tmp_path / "x.pth")
    result = invoke("inspect", tmp_path / "x.pth")
    assert result.exit_code == 0
    assert "numpy: arr is a numpy float32 array [2, 3]" in result.stdout
    assert "numpy: lr is a numpy float64 scalar 0.5" in result.stdout
    assert "reference: norm is a reference to torch.nn.modules.batchnorm.BatchNorm2d" in result.stdout
    values = json.loads(invoke("inspect", "--json", tmp_path / "x.pth").stdout)["values"]
    assert [v["path"] for v in values] == ["arr", "lr", "norm"]


def test_sharding_matches_huggingface_hub_with_an_oversized_tensor(tmp_path):
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(100, generator=g), "big": torch.randn(3000, generator=g),
          "c": torch.randn(200, generator=g), "d": torch.randn(600, generator=g)}
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(sd, tmp_path / "hub", max_shard_size=4000)
    save_file(sd, tmp_path / "sd.safetensors")
    result = invoke("convert", tmp_path / "sd.safetensors", tmp_path / "ours", "--max-shard-size", "4000")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "exceeds --max-shard-size" in result.stderr
    ours = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    hub = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == hub["weight_map"]
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "hub").iterdir())
    assert ckconv.diff(tmp_path / "ours", tmp_path / "hub").equal


def _lstm_record(num_layers, all_weights):
    import copyreg

    class Fake:
        def __reduce_ex__(self, protocol):
            return (copyreg._reconstructor, (torch.nn.modules.rnn.LSTM, object, None),
                    dict(training=False, _parameters={}, _buffers={}, _modules={}, num_layers=num_layers,
                         bidirectional=False, bias=True, proj_size=0, _all_weights=all_weights, mode="LSTM",
                         input_size=1, hidden_size=1))
    return Fake()


@pytest.mark.parametrize("source", [
    "rnn_loop",  # RNNBase.__setstate__ loops num_layers times when _all_weights are not names
    "newobj_args",  # a re-exported class made with tensor arguments (PackedSequence's __new__ allocates)
    "bytes_len",  # bytes.__new__(bytes, 2**32)
])
def test_records_that_make_torch_work_beyond_their_size_are_not_written(tmp_path, source):
    src = tmp_path / "src.pkl"
    if source == "rnn_loop":
        src.write_bytes(pickle.dumps({"lstm": _lstm_record(10**9, [[0]])}, protocol=2))
    else:
        record = ({"$object": "torch.nn.modules.rnn:PackedSequence", "new": True,
                   "args": [{"$tensor": "w"}, {"$tensor": "w"}]} if source == "newobj_args" else
                  {"$object": "builtins:bytes", "new": True, "args": [1 << 32]})
        src = tmp_path / "src.safetensors"
        save_file({"w": torch.ones(1)}, src, metadata={"format": "pt", "ckconv.structure": json.dumps(
            {"w": {"$tensor": "w"}, "x": record})})
    result = invoke("convert", src, tmp_path / "o.pth")
    assert result.exit_code == 1 and "refusing to write" in result.stderr, result.output
    assert "--allow-global 'passes" not in result.stderr and not (tmp_path / "o.pth").exists()
    inspected = invoke("inspect", src)
    assert "verdict: unknown" in inspected.stdout, inspected.output
    assert invoke("scan", src).exit_code == 1


def test_real_rnn_modules_still_roundtrip(tmp_path):
    torch.manual_seed(0)
    torch.save({"lstm": torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)}, tmp_path / "rnn.pth")
    assert "verdict: safe" in invoke("inspect", tmp_path / "rnn.pth").stdout
    assert invoke("convert", tmp_path / "rnn.pth", tmp_path / "back.pth").exit_code == 0
    assert invoke("convert", tmp_path / "rnn.pth", tmp_path / "rnn.safetensors").exit_code == 0
    assert invoke("convert", tmp_path / "rnn.safetensors", tmp_path / "back2.pth").exit_code == 0
    run_python(f"""
import torch
a = torch.load({str(tmp_path / 'rnn.pth')!r}, weights_only=False)["lstm"]
x = torch.randn(5, 1, 3, generator=torch.Generator().manual_seed(1))
for p in ({str(tmp_path / 'back.pth')!r}, {str(tmp_path / 'back2.pth')!r}):
    b = torch.load(p, weights_only=False)["lstm"]
    assert torch.equal(a(x)[0], b(x)[0])
print("ok")
""", tmp_path)


def test_one_ordered_verdict_type_reads_as_its_string():
    from ckconv.pickling.verdicts import Verdict, worst

    assert Verdict.SKIPPED < Verdict.SAFE < Verdict.UNKNOWN < Verdict.BROKEN < Verdict.DANGEROUS
    assert worst(["safe", "dangerous", "unknown"]) is Verdict.DANGEROUS and worst([]) is Verdict.SAFE
    assert json.dumps({"v": Verdict.UNKNOWN}) == '{"v": "unknown"}' and f"{Verdict.BROKEN}".upper() == "BROKEN"
    assert policy.verdict("os", "system") is Verdict.DANGEROUS
