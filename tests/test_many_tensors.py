"""Many small tensors (issue 24), the write side: gathered into MiB writes, each source record's CRC still checked,
the same bytes as one copy per tensor; a plain state_dict named without building a structure record."""

from __future__ import annotations

import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckconv
from ckconv.errors import CorruptCheckpoint
from ckconv.formats import safetensors_file
from ckconv.model import Storage, TensorRef
from ckconv.pickling import structure
from helpers import assert_deep_equal


def mixed_state_dict():
    """Tiny tensors around large ones (over the gather size), runs of small ones longer than a MiB, views."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(120):
        sd[f"tiny.{i}"] = torch.randn(3, generator=g)
        if i % 40 == 7:
            sd[f"large.{i}"] = torch.randn(300, 100, generator=g)  # 120 KB: copied file to file
        if i % 30 == 3:
            sd[f"run.{i}"] = torch.randn(15000, generator=g)  # 60 KB: gathered, several MiB flushes in all
    base = torch.randn(4, 6, generator=g)
    sd["view.offset"] = base[2:]  # a contiguous view at an offset inside its (small) storage
    sd["view.strided"] = base[:, ::2]  # not contiguous: gathered by numpy, written on its own
    sd["ints"] = torch.arange(5, dtype=torch.int64)
    sd["empty"] = torch.empty(0, 3)
    return sd


@pytest.mark.parametrize("through", [".pth", ".safetensors"])
def test_small_and_large_tensors_interleaved_come_back_bit_exact(tmp_path, through):
    sd = mixed_state_dict()
    torch.save(sd, tmp_path / "src.pth")
    src = tmp_path / "src.pth"
    if through == ".safetensors":  # a source without CRCs: read through the same window
        ckconv.convert(src, tmp_path / "mid.safetensors")
        src = tmp_path / "mid.safetensors"
    ckconv.convert(src, tmp_path / "out.safetensors")
    assert_deep_equal({k: v.contiguous() for k, v in sd.items()}, load_file(tmp_path / "out.safetensors"),
                      check_tied=False)
    ckconv.convert(tmp_path / "out.safetensors", tmp_path / "back.pth")
    assert_deep_equal(sd, torch.load(tmp_path / "back.pth", weights_only=True), check_tied=False)


def test_a_flipped_byte_in_one_small_record_among_many_is_refused(tmp_path):
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(300)}
    torch.save(sd, tmp_path / "src.pth")
    raw = bytearray((tmp_path / "src.pth").read_bytes())
    with zipfile.ZipFile(tmp_path / "src.pth") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/250"))
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[start + 5] ^= 0x40
    (tmp_path / "bad.pth").write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        ckconv.convert(tmp_path / "bad.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_tensor_named_like_the_header_metadata_is_stored_under_another_name(tmp_path):
    """``__metadata__`` is the header's own key: written as it is, the file lost its metadata and no reader could
    open it. The tensor takes another name and the structure record puts it back."""
    sd = {"__metadata__": torch.ones(2), "a": torch.zeros(3)}
    torch.save(sd, tmp_path / "src.pth")
    ckconv.convert(tmp_path / "src.pth", tmp_path / "out.safetensors")
    with safe_open(tmp_path / "out.safetensors", "pt") as f:  # the reference reader opens it
        assert sorted(f.keys()) == ["__metadata__#2", "a"] and structure.KEY in f.metadata()
    ckconv.convert(tmp_path / "out.safetensors", tmp_path / "back.pth")
    assert_deep_equal(sd, torch.load(tmp_path / "back.pth", weights_only=True))


def _ref(storage=None, dtype="float32", shape=(2,), **kw):
    return TensorRef(storage or Storage("k", dtype, 8, buffer=bytearray(8)), dtype, shape, **kw)


def _roots():
    shared = _ref()
    yield {"a": _ref(), "b.c": _ref(dtype="int64", shape=(1,))}
    yield {"a": shared, "b": shared}  # tied
    yield {"$a": _ref()}  # needs $dict
    yield {"a\udc80": _ref()}  # a lone surrogate: renamed
    yield {"p": _ref(parameter=True)}
    yield {"g": _ref(requires_grad=True)}
    yield {"r": _ref(dtype="complex32", shape=(1,))}  # a raw dtype for safetensors
    yield {"__metadata__": _ref(), "x": _ref()}
    yield {1: _ref()}
    yield {"a": _ref(), "n": 3}
    yield {}


@pytest.mark.parametrize("root", list(_roots()), ids=str)
def test_the_plain_state_dict_shortcut_gives_what_the_full_encoding_gives(root, monkeypatch):
    raw, reserved = frozenset({"complex32"}), frozenset({"__metadata__"})
    fast = structure.encode(root, raw_dtypes=raw, reserved=reserved)
    monkeypatch.setattr(structure, "flat_state_dict", lambda *a: None)
    slow = structure.encode(root, raw_dtypes=raw, reserved=reserved)
    assert fast == slow


def test_the_header_text_is_what_json_dumps_writes():
    import json
    import struct

    named = [("a\u00e9\"\\", _ref()), ("b", _ref(dtype="complex32", shape=(1,))), ("c", _ref(shape=()))]
    meta = {"format": "pt", "k\u00e9": "v\n"}
    header = {"__metadata__": meta, "a\u00e9\"\\": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
              "c": {"dtype": "F32", "shape": [], "data_offsets": [12, 16]}}
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    assert safetensors_file.header_bytes(named, meta) == struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("value", ["parameter_class", "storage_class"])
def test_a_builder_left_as_a_value_is_still_refused_by_the_walk_over_kinds(tmp_path, value):
    """The reader's last walk visits only the kinds it checks (no call per tensor); what it refuses is unchanged."""
    cls = torch.nn.Parameter if value == "parameter_class" else torch.FloatStorage
    torch.save({"w": torch.ones(2), "x": cls}, tmp_path / "src.pth")
    with pytest.raises(CorruptCheckpoint, match="where a value belongs"):
        ckconv.read(tmp_path / "src.pth")
