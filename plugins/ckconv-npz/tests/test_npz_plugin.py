"""ckconv-npz: lossless round trips, numpy interoperability, refusal of unsafe or damaged archives."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckconv
from ckconv import plugins
from ckconv.cli import cli
from ckconv.errors import CorruptCheckpoint, UnsafeCheckpoint, UnsupportedContent, UsageError

import ckconv_npz

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


@pytest.fixture(autouse=True)
def fresh_host(monkeypatch):
    monkeypatch.delenv("CKCONV_LOAD_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a, b, path="<root>"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), path
        assert raw(a) == raw(b), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def every_dtype():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, generator=g)
    out = {}
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
               torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.complex64, torch.complex128):
        out[str(dt).removeprefix("torch.")] = base.to(dt)
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
               torch.uint64):
        out[str(dt).removeprefix("torch.")] = torch.arange(6).reshape(2, 3).to(dt)
    out["bool"] = torch.tensor([[True, False, True]])
    out["float8_e8m0fnu"] = torch.ones(4).to(torch.float8_e8m0fnu)
    out["complex32"] = torch.zeros(3, dtype=torch.complex32)
    return out


def training_bundle():
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(4, 4, generator=g)
    model = OrderedDict(
        [("fc.weight", shared), ("tied.weight", shared), ("fc.bias", torch.randn(4, generator=g)),
         ("transposed", torch.randn(3, 5, generator=g).t()), ("scalar", torch.tensor(2.5)),
         ("empty", torch.empty(0, 7)), ("bn.num_batches_tracked", torch.tensor(12))])
    model._metadata = {"": {"version": 1}}
    return {
        "model": model,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 4, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "nesterov": False}]},
        "dtypes": every_dtype(),
        "param": torch.nn.Parameter(torch.randn(2, generator=g)),
        "epoch": 7, "best": float("inf"), "name": "run-1", "tags": ("a", None), "blob": b"\x00\x01",
    }


def test_bundle_round_trips_bit_exact_through_the_cli(tmp_path):
    src, mid, back = tmp_path / "a.pth", tmp_path / "a.npz", tmp_path / "back.pth"
    bundle = training_bundle()
    torch.save(bundle, src)
    runner = CliRunner()
    for a, b in ((src, mid), (mid, back)):
        result = runner.invoke(cli, ["convert", str(a), str(b)])
        assert result.exit_code == 0, result.output
    assert "(npz)" in runner.invoke(cli, ["convert", str(src), str(tmp_path / "x.npz")]).output
    loaded = torch.load(back, weights_only=True)
    assert_same(loaded, torch.load(src, weights_only=True))
    assert loaded["model"]["fc.weight"].untyped_storage().data_ptr() == \
        loaded["model"]["tied.weight"].untyped_storage().data_ptr()
    assert runner.invoke(cli, ["diff", str(src), str(mid)]).exit_code == 0


def test_plain_state_dict_is_what_np_savez_writes(tmp_path):
    sd = {"conv.weight": torch.randn(2, 3, 3, 3), "conv.bias": torch.randn(2), "steps": torch.arange(4)}
    ckconv.save(sd, tmp_path / "sd.npz")
    assert zipfile.ZipFile(tmp_path / "sd.npz").namelist() == ["conv.weight.npy", "conv.bias.npy", "steps.npy"]
    with np.load(tmp_path / "sd.npz", allow_pickle=False) as arrays:
        assert list(arrays) == list(sd)
        for k, t in sd.items():
            assert np.array_equal(arrays[k], t.numpy()) and arrays[k].dtype == t.numpy().dtype
    assert_same(ckconv.load(tmp_path / "sd.npz"), sd)


def test_dtypes_numpy_lacks_are_uint_views_with_the_dtype_recorded(tmp_path):
    sd = {"w": torch.randn(3, 2).bfloat16(), "q": torch.randn(5).to(torch.float8_e5m2),
          "c": torch.zeros(2, dtype=torch.complex32)}
    ckconv.save(sd, tmp_path / "x.npz")
    with np.load(tmp_path / "x.npz", allow_pickle=False) as arrays:
        assert (arrays["w"].dtype, arrays["w"].shape) == (np.uint16, (3, 2))
        assert (arrays["q"].dtype, arrays["c"].dtype) == (np.uint8, np.uint32)
        assert arrays["w"].tobytes() == raw(sd["w"])
        assert b'"bfloat16"' in arrays[ckconv_npz.STRUCTURE_MEMBER]
    assert_same(ckconv.load(tmp_path / "x.npz"), sd)


def test_reads_what_numpy_writes_stored_compressed_and_fortran(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    c = np.array(True)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, a=a, b=b, c=c)
        out = ckconv.load(path)
        assert list(out) == ["a", "b", "c"]
        for k, v in (("a", a), ("b", b), ("c", c)):
            assert np.array_equal(out[k].numpy(), v) and out[k].numpy().dtype == v.dtype
        info = ckconv.inspect(path)
        assert info.format == "npz" and info.tensor_count == 3


def test_sniffs_by_magic_never_by_extension(tmp_path):
    sd = {"w": torch.randn(2, 2)}
    ckconv.save(sd, tmp_path / "looks_like.pth", format="npz")
    assert ckconv.detect_format(tmp_path / "looks_like.pth") == "npz"
    torch.save(sd, tmp_path / "looks_like.npz")
    assert ckconv.detect_format(tmp_path / "looks_like.npz") == "torch"
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.writestr("w.npy", "not numpy")
    fmt = ckconv_npz.NpzFormat()
    with open(tmp_path / "other.zip", "rb") as f:
        assert not fmt.sniff(tmp_path / "other.zip", f.read(64))
    assert not fmt.sniff(tmp_path, b"")


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, ok=np.zeros(2), evil=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UnsafeCheckpoint, match="pickled object array"):
        ckconv.read(path)
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "out.pth")])
    assert result.exit_code == 1 and "pickled object array" in result.output
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("array, error", [
    (np.zeros(2, dtype=">f4"), "big-endian"),
    (np.zeros(2, dtype=[("x", "<f4")]), "structured"),
    (np.array(["a"]), "no tensor type"),
])
def test_arrays_torch_cannot_hold_are_refused(tmp_path, array, error):
    np.savez(tmp_path / "x.npz", x=array)
    with pytest.raises(UnsupportedContent, match=error):
        ckconv.read(tmp_path / "x.npz")


def test_damaged_archives_are_refused(tmp_path):
    path = tmp_path / "x.npz"
    ckconv.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    at = data.index(np.arange(64, dtype=np.float32).tobytes())
    data[at + 10] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(data)
    with pytest.raises(CorruptCheckpoint, match="CRC"):
        ckconv.load(tmp_path / "flipped.npz")

    np.savez_compressed(tmp_path / "packed.npz", w=np.arange(4096, dtype=np.float32))
    data = bytearray((tmp_path / "packed.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "packed.npz").write_bytes(data)
    with pytest.raises(CorruptCheckpoint, match="damaged"):
        ckconv.load(tmp_path / "packed.npz")

    np.savez(tmp_path / "lies.npz", w=np.zeros(4, dtype=np.float32))
    with zipfile.ZipFile(tmp_path / "lies.npz") as zf:
        member = zf.read("w.npy")
    with zipfile.ZipFile(tmp_path / "lies.npz", "w") as zf:  # header says 4 floats, data holds 3
        zf.writestr("w.npy", member[:-4])
    with pytest.raises(CorruptCheckpoint, match="declares"):
        ckconv.read(tmp_path / "lies.npz")

    ckconv.save({"w": torch.zeros(2).bfloat16(), "n": {"x": 1}}, tmp_path / "s.npz")
    with zipfile.ZipFile(tmp_path / "s.npz") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(tmp_path / "s.npz", "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b.replace(b"bfloat16", b"float16!") if n.endswith(".json") else b)
    with pytest.raises(CorruptCheckpoint):
        ckconv.read(tmp_path / "s.npz")


def test_sharding_is_refused_with_a_hint(tmp_path):
    with pytest.raises(UsageError, match="not sharded"):
        ckconv.save({"w": torch.zeros(2)}, tmp_path / "x.npz", format="npz", max_shard_size="1MB")


def test_installed_plugin_is_listed_with_its_version():
    out = subprocess.run([str(Path(sys.executable).with_name("ckconv")), "plugins", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    listed = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert listed["npz"]["formats"] == ["npz"] and listed["npz"]["version"] == "0.1.0"
    assert not listed["npz"]["builtin"]


def test_names_zip_cannot_hold_are_refused_other_strings_survive(tmp_path):
    with pytest.raises(UnsupportedContent, match="NUL character"):
        ckconv.save({"a\x00b": torch.zeros(1)}, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    # a lone surrogate in a key gets an escaped member name; the structure maps it back
    odd = {"\ud800": "\udfff x", "é/../..": [torch.zeros(0, 0).bfloat16(), "\x00"], "t\udc80": torch.ones(2)}
    ckconv.save(odd, tmp_path / "odd.npz")
    assert_same(ckconv.load(tmp_path / "odd.npz"), odd)


# --- property test: random nested structures of random dtypes survive .pth -> .npz -> .pth ----------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int64, torch.int16, torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint32]


def random_tensor(dtype, shape, seed):
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(st.characters(), max_size=6), st.binary(max_size=6))
tensors = st.builds(lambda d, shape, seed: random_tensor(d, tuple(shape), seed),
                    st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=3), st.integers(0, 10**6))
trees = st.recursive(st.one_of(scalars, tensors),
                     lambda kids: st.one_of(st.lists(kids, max_size=3), st.tuples(kids, kids),
                                            st.dictionaries(st.one_of(names, st.integers(0, 9)), kids, max_size=3)),
                     max_leaves=10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(obj=st.dictionaries(names, trees, min_size=1, max_size=4))
def test_property_random_structures_round_trip_through_npz(tmp_path_factory, obj):
    tmp = tmp_path_factory.mktemp("npz")
    torch.save(obj, tmp / "a.pth")
    ckconv.convert(tmp / "a.pth", tmp / "a.npz")
    ckconv.convert(tmp / "a.npz", tmp / "b.pth")
    assert_same(torch.load(tmp / "b.pth", weights_only=True), obj)
