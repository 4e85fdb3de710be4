"""Fuzzing the parsers that read untrusted bytes: the safetensors header and the restricted unpickler.

Whatever the bytes, the only exceptions allowed out are :class:`ckconv.errors.CkconvError` subclasses (which the
CLI prints as one line), no hang and no crash. ``CKCONV_FUZZ_EXAMPLES`` sets the examples per test (``make fuzz``
runs 20000; the default keeps CI well under a minute).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ckconv.errors import CkconvError
from ckconv.formats import safetensors_file as sf
from ckconv.formats.safetensors_format import SafetensorsFormat
from ckconv.formats.torch_file import read_legacy, read_zip
from ckconv.model import Storage
from ckconv.pickling.unpickler import StorageType, unpickle

EXAMPLES = int(os.environ.get("CKCONV_FUZZ_EXAMPLES", 60))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def only_ckconv_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CkconvError:
        return None


def mutate(data: bytes, edits) -> bytes:
    """Apply (kind, position, byte) edits: flip, insert, delete, truncate, duplicate a span."""
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            out.append(value)
            continue
        pos %= len(out)
        if kind == 0:
            out[pos] ^= value or 1
        elif kind == 1:
            out.insert(pos, value)
        elif kind == 2:
            del out[pos]
        elif kind == 3:
            del out[pos:]
        else:
            out[pos:pos] = out[pos:pos + value % 16]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)


# --- safetensors ------------------------------------------------------------------------------------------------

def _valid_safetensors() -> bytes:
    buf = io.BytesIO()
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    buf.write(save({"a": torch.randn(3, 2, generator=g), "b": torch.arange(4, dtype=torch.int64),
                    "c": torch.zeros(0)}, metadata={"format": "pt"}))
    return buf.getvalue()


VALID_ST = _valid_safetensors()

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                         st.text(max_size=8))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
ENTRY = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(sf.dtypes.SAFETENSORS_TO_DTYPE)), JSON_SCALARS),
    "shape": st.one_of(st.lists(st.integers(-2, 1 << 65), max_size=4), JSON_VALUES),
    "data_offsets": st.one_of(st.lists(st.integers(-1, 64), min_size=2, max_size=2), JSON_VALUES),
}, optional={"extra": JSON_VALUES})
HEADERS = st.dictionaries(st.text(max_size=12), st.one_of(ENTRY, JSON_VALUES), max_size=5) | st.builds(
    lambda h, m: {**h, "__metadata__": m}, st.dictionaries(st.text(max_size=8), ENTRY, max_size=3), JSON_VALUES)


def _check_safetensors(path):
    only_ckconv_errors(sf.parse_header, path)
    only_ckconv_errors(SafetensorsFormat().read, path)


@FUZZ
@given(header=HEADERS, data_len=st.integers(0, 96), declared=st.one_of(st.none(), st.integers(0, 1 << 64 - 1)))
def test_fuzz_safetensors_structured_headers(scratch, header, data_len, declared):
    raw = json.dumps(header).encode()
    path = scratch / "s.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + b"\0" * data_len)
    _check_safetensors(path)


@FUZZ
@given(raw=st.binary(max_size=300), declared=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
@example(raw=b"{" + b"[" * 5000, declared=None)
def test_fuzz_safetensors_random_headers(scratch, raw, declared):
    path = scratch / "r.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw)
    _check_safetensors(path)


@FUZZ
@given(edits=EDITS)
def test_fuzz_safetensors_mutated_files(scratch, edits):
    path = scratch / "m.safetensors"
    path.write_bytes(mutate(VALID_ST, edits))
    _check_safetensors(path)


@FUZZ
@given(structure=JSON_VALUES)
def test_fuzz_ckconv_structure_metadata(scratch, structure):
    meta = {"ckconv.structure": json.dumps({"x": structure, "w": {"$tensor": "w"}})}
    raw = json.dumps({"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = scratch / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    _check_safetensors(path)


# --- pickles --------------------------------------------------------------------------------------------------

def _zip_checkpoint() -> bytes:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(1, 3, generator=g)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": lin.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "view": torch.arange(12.0).reshape(3, 4)[:, 1:], "cfg": OrderedDict(a=(1, 2.5, "x"), b={3})}, buf)
    return buf.getvalue()


VALID_ZIP = _zip_checkpoint()
ZIP_RECORDS = [(i.filename, zipfile.ZipFile(io.BytesIO(VALID_ZIP)).read(i.filename))
               for i in zipfile.ZipFile(io.BytesIO(VALID_ZIP)).infolist()]
DATA_PKL = next(d for n, d in ZIP_RECORDS if n.endswith("data.pkl"))
PLAIN = [pickle.dumps(obj, protocol=p) for p in (2, 4, 5) for obj in (
    {"a": [1, 2.0, None, True], "b": (b"x", "y"), "c": {1, 2}, "d": frozenset({3})},
    OrderedDict(k=bytearray(b"z"), n=complex(1, 2)), [[[]], ((),)])]


def loader(pid):
    """A permissive storage loader: any well-formed persistent id gets a zero-filled in-memory storage."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[1], StorageType)
            and type(pid[4]) is int and 0 <= pid[4] < 4096):
        from ckconv.errors import CorruptCheckpoint

        raise CorruptCheckpoint("bad persistent id")
    size = pid[4] * sf.dtypes.itemsize(pid[1].dtype)
    return Storage(str(pid[2])[:20], pid[1].dtype, size, buffer=bytearray(size))


@FUZZ
@given(body=st.binary(max_size=400), proto=st.integers(0, 6))
def test_fuzz_unpickler_random_bytes(body, proto):
    only_ckconv_errors(unpickle, bytes([0x80, proto]) + body, where="fuzz")
    only_ckconv_errors(unpickle, body, storage_loader=loader, where="fuzz")


@FUZZ
@given(which=st.integers(0, len(PLAIN)), edits=EDITS)
def test_fuzz_unpickler_mutated_pickles(which, edits):
    data = DATA_PKL if which == len(PLAIN) else PLAIN[which]
    only_ckconv_errors(unpickle, mutate(data, edits), storage_loader=loader, where="fuzz")


OPCODES = [b"N", b"\x88", b"\x89", b"K\x01", b"J\xff\xff\xff\x7f", b"\x8a\x09" + b"\xff" * 9, b"G" + b"\0" * 8,
           b"X\x01\x00\x00\x00a", b"\x8c\x03abc", b"C\x02hi", b"]", b"}", b")", b"\x8f", b"(", b"t", b"l", b"d",
           b"\x85", b"\x86", b"\x87", b"a", b"e", b"s", b"u", b"\x90", b"\x91", b"R", b"b", b"\x81", b"\x92", b"o",
           b"0", b"1", b"2", b"\x94", b"q\x00", b"q\x01", b"h\x00", b"h\x01", b"r\xff\xff\x00\x00", b"Q",
           b"\x93", b"\x97", b"\x98", b"\x95" + struct.pack("<Q", 4),
           b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n",
           b"cbuiltins\nset\n", b"cbuiltins\nfrozenset\n", b"cbuiltins\ntuple\n", b"cbuiltins\ndict\n",
           b"cbuiltins\nstr\n", b"ctorch\nSize\n", b"ctorch._utils\n_rebuild_parameter\n",
           b"ccopyreg\n_reconstructor\n", b"cargparse\nNamespace\n", b"cos\nsystem\n", b"c__builtin__\nobject\n",
           b"ctorch._tensor\n_rebuild_from_type_v2\n", b"ctorch.nn.parameter\nParameter\n"]


@FUZZ
@given(ops=st.lists(st.sampled_from(OPCODES), max_size=60), proto=st.sampled_from([2, 4, 5]))
@example(ops=[b"(", b"o"], proto=2)  # OBJ on an empty mark once crashed the scan
def test_fuzz_unpickler_opcode_sequences(ops, proto):
    data = bytes([0x80, proto]) + b"".join(ops) + b"."
    only_ckconv_errors(unpickle, data, storage_loader=loader, where="fuzz")
    only_ckconv_errors(unpickle, data, where="fuzz", allow_dangerous=True)


@FUZZ
@given(edits=EDITS, target=st.integers(0, len(ZIP_RECORDS) - 1), whole=st.booleans())
def test_fuzz_zip_reader(scratch, edits, target, whole):
    """Mutations of one record (rebuilt into a valid zip) or of the archive bytes themselves."""
    if whole:
        data = mutate(VALID_ZIP, edits)
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i, (name, payload) in enumerate(ZIP_RECORDS):
                zf.writestr(name, mutate(payload, edits) if i == target else payload)
        data = buf.getvalue()
    path = scratch / "z.pth"
    path.write_bytes(data)
    ckpt = only_ckconv_errors(read_zip, path)
    if ckpt is not None:  # readable: streaming every tensor checks CRCs and bounds, again only ckconv errors
        from ckconv import tree

        for _, ref in tree.tensors(ckpt.root):
            only_ckconv_errors(lambda r=ref: [len(c) for c in r.chunks()])


@FUZZ
@given(edits=EDITS)
def test_fuzz_legacy_reader(scratch, edits):
    path = scratch / "legacy.pth"
    path.write_bytes(mutate(LEGACY, edits))
    only_ckconv_errors(read_legacy, path)


def _legacy() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


LEGACY = _legacy()
