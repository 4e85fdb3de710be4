"""The safetensors header's one-pass reading (``safetensors_file._read_usual``, issue 24) against ``parse_header``.

The usual header (as safetensors and ckconv write it) is read straight into the tensor records; everything else goes
to ``parse_header``. The one-pass reading must accept only what ``parse_header`` accepts and give the same tensors,
in the same order, and the same metadata; what it declines, ``read_file`` reads or refuses exactly as before.
Each case here is read both ways, with and without the one-pass reading, and the outcomes compared: the same
records, or the same refusal word for word.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckconv.errors import CkconvError
from ckconv.formats import safetensors_file as sf


def _outcome(path):
    """What read_file makes of ``path``: its records and metadata, or the refusal (class and message)."""
    try:
        tensors, metadata = sf.read_file(path)
    except CkconvError as exc:
        return type(exc).__name__, str(exc)
    return [(name, r.dtype, r.shape, r.stride, r.offset, r.storage.key, r.storage.label, r.storage.dtype,
             r.storage.nbytes, r.storage.offset, r.storage.path) for name, r in tensors.items()], metadata


def _both(path, monkeypatch):
    """(outcome with the one-pass reading, outcome with parse_header alone, whether the one-pass reading took it)."""
    taken = []
    usual = sf._read_usual

    def spy(*args):
        found = usual(*args)
        taken.append(found is not None)
        return found

    with monkeypatch.context() as m:
        m.setattr(sf, "_read_usual", spy)
        fast = _outcome(path)
    with monkeypatch.context() as m:
        m.setattr(sf, "_read_usual", lambda *args: None)
        slow = _outcome(path)
    return fast, slow, any(taken)


def _file(path, header, data_len):
    raw = header if isinstance(header, bytes) else json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + b"\1" * (data_len % 256))
    return path


USUAL = {"__metadata__": {"format": "pt", "ckconv.note": "ünïcode \"quoted\"\n"},
         "a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "a.bias": {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]},
         "scalar": {"dtype": "I64", "shape": [], "data_offsets": [30, 38]},
         "empty": {"dtype": "F16", "shape": [0, 4], "data_offsets": [38, 38]},
         "böse.名前": {"dtype": "BOOL", "shape": [1, 1, 2], "data_offsets": [38, 40]}}
USUAL_DATA = 40


def test_headers_safetensors_and_ckconv_write_take_the_one_pass_reading(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(0), "s": torch.tensor(7, dtype=torch.int64),
               "h": torch.ones(5, dtype=torch.float16), "名": torch.ones(2, 2, dtype=torch.bool)}
    save_file(tensors, tmp_path / "hub.safetensors", metadata={"format": "pt", "k": "v"})
    save_file(tensors, tmp_path / "bare.safetensors")
    for name in ("hub.safetensors", "bare.safetensors"):
        fast, slow, taken = _both(tmp_path / name, monkeypatch)
        assert taken and fast == slow and len(fast[0]) == 5
    for header in (USUAL, {k: v for k, v in USUAL.items() if k != "__metadata__"}, {"__metadata__": {}}):
        fast, slow, taken = _both(_file(tmp_path / "u.safetensors", header, USUAL_DATA if len(header) > 1 else 0),
                                  monkeypatch)
        assert taken and fast == slow
    spaced = json.dumps(USUAL, ensure_ascii=False, indent=2).encode() + b" \n\t\r"  # JSON whitespace anywhere between tokens
    fast, slow, taken = _both(_file(tmp_path / "s.safetensors", spaced, USUAL_DATA), monkeypatch)
    assert taken and fast == slow


def _with(**changes):
    header = dict(USUAL)
    for name, value in changes.items():
        header[name.replace("__", ".")] = value
    return header


UNUSUAL = {
    "escaped name": json.dumps(USUAL, ensure_ascii=True).encode(),
    "metadata last": json.dumps({**{k: v for k, v in USUAL.items() if k != "__metadata__"},
                                 "__metadata__": USUAL["__metadata__"]}).encode(),
    "keys in another order": json.dumps(_with(a__bias={"shape": [3], "dtype": "BF16", "data_offsets": [24, 30]})).encode(),
    "offsets out of order": json.dumps(dict(reversed(list(USUAL.items())))).encode(),
    "duplicate name": json.dumps(USUAL).encode()[:-1] + b',"a.bias":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]}}',
    "nested metadata": json.dumps({**USUAL, "__metadata__": {"format": {"x": "y"}}}).encode(),
    "metadata with a number": json.dumps({**USUAL, "__metadata__": {"format": 1}}).encode(),
    "metadata null": json.dumps({**USUAL, "__metadata__": None}).encode(),
    "metadata duplicate key": json.dumps(USUAL).replace('"ckconv.note"', '"format"').encode(),
    "metadata as a tensor": json.dumps({"__metadata__": USUAL["a.weight"]}).encode(),
    "leading zero": json.dumps(USUAL).replace("[24, 30]", "[024, 30]").encode(),
    "float offset": json.dumps(USUAL).replace("[24, 30]", "[24.0, 30]").encode(),
    "negative dimension": json.dumps(USUAL).replace("[2, 3]", "[-2, 3]").encode(),
    "trailing comma in a shape": json.dumps(USUAL).replace("[2, 3]", "[2, 3,]").encode(),
    "unknown dtype": json.dumps(_with(a__bias={"dtype": "F33", "shape": [3], "data_offsets": [24, 30]})).encode(),
    "size mismatch": json.dumps(_with(a__bias={"dtype": "F32", "shape": [3], "data_offsets": [24, 30]})).encode(),
    "gap": json.dumps(_with(a__bias={"dtype": "BF16", "shape": [3], "data_offsets": [25, 31]})).encode(),
    "dimension over 64 bits": json.dumps(_with(empty={"dtype": "F16", "shape": [0, 1 << 64], "data_offsets": [38, 38]})).encode(),
    "extra field": json.dumps(_with(empty={"dtype": "F16", "shape": [0], "data_offsets": [38, 38], "x": 1})).encode(),
    "control character in a name": json.dumps(USUAL).encode().replace(b"a.weight", b"a\x01weight"),
    "invalid utf-8 in a name": json.dumps(USUAL, ensure_ascii=False).encode().replace(b"a.weight", b"a\xffweight"),
    "trailing garbage": json.dumps(USUAL).encode() + b" x",
    "trailing data": json.dumps(_with(empty={"dtype": "F16", "shape": [0, 4], "data_offsets": [38, 38]})).encode(),
    "empty object": b"{}",
    "an array": b"[]",
    "leading whitespace": b" \n" + json.dumps(USUAL).encode(),
}


@pytest.mark.parametrize("case", sorted(UNUSUAL))
def test_unusual_headers_are_read_or_refused_exactly_as_parse_header_does(tmp_path, monkeypatch, case):
    data_len = USUAL_DATA + (4 if case == "trailing data" else 0)
    fast, slow, _ = _both(_file(tmp_path / "x.safetensors", UNUSUAL[case], data_len), monkeypatch)
    assert fast == slow


def test_the_one_pass_reading_declines_what_it_does_not_know(tmp_path, monkeypatch):
    declined = [case for case in ("escaped name", "metadata last", "keys in another order", "offsets out of order",
                                  "duplicate name", "nested metadata", "leading zero", "control character in a name")
                if not _both(_file(tmp_path / "x.safetensors", UNUSUAL[case], USUAL_DATA), monkeypatch)[2]]
    assert len(declined) == 8  # each left to parse_header, which reads or refuses it as it always did


def test_every_single_byte_change_of_a_usual_header_reads_as_parse_header_reads_it(tmp_path, monkeypatch):
    small = {"__metadata__": {"f": "p\\t"}, "a": USUAL["a.weight"], "名": USUAL["a.bias"]}
    raw = json.dumps(small, ensure_ascii=False, separators=(",", ":")).encode()
    path = tmp_path / "m.safetensors"
    taken = differ = 0
    for pos in range(len(raw)):
        for byte in b' "\\0,}9\xff[':
            if raw[pos] == byte:
                continue
            fast, slow, took = _both(_file(path, raw[:pos] + bytes([byte]) + raw[pos + 1:], 30), monkeypatch)
            differ += fast != slow
            taken += took
    assert differ == 0 and taken > 30  # the one-pass reading took many of them, and agreed on every one


HEADER_FUZZ = settings(max_examples=150, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAME = st.text(st.characters(codec="utf-8", exclude_characters='"'), max_size=6)
SHAPE = st.lists(st.integers(0, 3), max_size=3)


@HEADER_FUZZ
@given(names=st.lists(NAME, min_size=1, max_size=5), shapes=st.lists(SHAPE, min_size=5, max_size=5),
       codes=st.lists(st.sampled_from(["F32", "U8", "BF16", "F64", "BOOL"]), min_size=5, max_size=5),
       meta=st.one_of(st.none(), st.dictionaries(NAME, NAME, max_size=3)), indent=st.sampled_from([None, 0, 2]),
       shift=st.integers(-1, 1))
def test_generated_headers_read_the_same_both_ways(tmp_path, monkeypatch, names, shapes, codes, meta, indent, shift):
    header, pos = ({} if meta is None else {"__metadata__": meta}), 0
    for name, shape, code in zip(names, shapes, codes):
        size = sf.dtypes.itemsize(sf.dtypes.SAFETENSORS_TO_DTYPE[code])
        for s in shape:
            size *= s
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, ensure_ascii=False, indent=indent).encode()
    fast, slow, _ = _both(_file(tmp_path / "g.safetensors", raw, max(pos + shift, 0)), monkeypatch)
    assert fast == slow
