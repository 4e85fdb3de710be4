"""Fourth red-team pass: the fast paths of issue 24 (scale in count) against the readings they replace.

Each fast path must read a file exactly as the slow reading beside it does and as the oracle does (torch's C
unpickler and ``torch.load``; the safetensors library's Rust parser for headers), or refuse it as broken in one
line. Every case here was found by mutating what the fast path matches; each states the oracle's reading.
"""

from __future__ import annotations

import io
import re
import zipfile

import torch
from click.testing import CliRunner

from ckconv.cli import cli
from ckconv.errors import CkconvError
from ckconv.pickling import records
from ckconv.pickling.scan import _table
from ckconv.pickling.shadow import Scanner


def _data_pkl(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def _with_data_pkl(obj, path, data_pkl: bytes):
    """``torch.save(obj)`` at ``path`` with its data.pkl replaced (the other records as torch wrote them)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else zin.read(info.filename))
    return path


def _scan(data, fast, max_depth=200, max_nodes=5_000_000):
    """What the scan decides, with or without the fast path: (end, roles, the stack's measures) or the refusal."""
    s = Scanner(data, "x", max_depth, max_nodes)
    s.fast = fast
    s.table = _table(s)
    try:
        end = s.run(0)
    except records.Restart:
        return _scan(data, False, max_depth, max_nodes)
    except CkconvError as exc:
        return type(exc).__name__, str(exc)
    return end, dict(s.roles), [(v.depth, v.weight, v.hcost, v.mutable, v.collidable, v.fn) for v in s.stack]


# -- the scan's runs of entries (pickling/records.py: entries) -----------------------------------------------------

def test_a_tensor_put_twice_before_the_next_record_is_scanned_as_the_handlers_scan_it(tmp_path):
    """A list of tensors (records back to back, no keys) where one tensor is memoized twice (``LONG_BINPUT n`` again
    right after the record's own): torch loads it; the run of entries read the second PUT as a key's PUT, took the
    following record for an entry keyed by a BINGET it did not have, and failed on it (a TypeError reported as a
    malformed pickle: the file was called broken where the handlers call it safe)."""
    tensors = [torch.full((1,), float(i)) for i in range(60)]
    data = _data_pkl(tensors)
    # the last records use LONG_BINPUT (the memo is past 255): repeat one record's final PUT
    put = list(re.finditer(rb"R(r....)(?:h\x01|j\x01\x00\x00\x00)\(\(", data, re.DOTALL))[-5]
    twice = data[:put.end(1)] + put.group(1) + data[put.end(1):]
    path = _with_data_pkl(tensors, tmp_path / "twice.pth", twice)
    back = torch.load(path, weights_only=True)  # the oracle reads every tensor
    assert len(back) == 60 and all(torch.equal(a, b) for a, b in zip(tensors, back))
    assert _scan(twice, True) == _scan(twice, False)
    assert _scan(twice, False)[0] == len(twice)  # read to its STOP
    result = CliRunner().invoke(cli, ["scan", str(path)])
    assert result.exit_code == 0 and "SAFE" in result.output, result.output


# -- safetensors headers: the safetensors library (serde_json) is the oracle ---------------------------------------

_T = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
HEADERS = {
    "usual": b'{"a":' + _T + b'}',
    "metadata": b'{"__metadata__":{"k":"v"},"a":' + _T + b'}',
    "negative zero offset": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}',
    "negative zero dimension": b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]},"b":{"dtype":"F32",'
                               b'"shape":[1],"data_offsets":[0,4]}}',
    "negative zero in a name": b'{"layer-0":' + _T + b'}',
    "lone high surrogate in a name": b'{"a\\ud800":' + _T + b'}',
    "lone low surrogate in a name": b'{"\\udc80":' + _T + b'}',
    "lone surrogate in a metadata value": b'{"__metadata__":{"k":"\\ud800"},"a":' + _T + b'}',
    "lone surrogate in a metadata key": b'{"__metadata__":{"k\\udfff":"v"},"a":' + _T + b'}',
    "reversed pair in a name": b'{"\\ude00\\ud83d":' + _T + b'}',
    "surrogate pair in a name": b'{"a\\ud83d\\ude00":' + _T + b'}',
    "surrogate pair in metadata": b'{"__metadata__":{"\\ud83d\\ude00":"\\uD83D\\uDE00"},"a":' + _T + b'}',
    "escaped backslash before u": b'{"a\\\\ud800":' + _T + b'}',
    "NUL escape in a name": b'{"a\\u0000":' + _T + b'}',
    "float dimension": b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    "exponent offset": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4e0]}}',
    "offset 2**64": b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[18446744073709551616,18446744073709551616]},'
                    b'"b":' + _T + b'}',
}


def _st_file(path, header: bytes, data_len=4):
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\1" * data_len)
    return path


def _library_reads(path):
    """(names, shapes and dtypes, metadata) as the safetensors library reads the file, or None when it refuses."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return sorted((k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()), f.metadata()
    except Exception:  # noqa: BLE001 - any refusal of the library's
        return None


def test_every_header_ckconv_reads_the_safetensors_library_reads_the_same(tmp_path, monkeypatch):
    """Python's json reads ``-0`` as the integer 0 and a ``\\ud800`` escape that is not half of a pair as a lone
    surrogate; serde_json refuses both (a float -0.0 where an unsigned integer belongs; an unpaired surrogate).
    ckconv read such headers (both readings: the one-pass one and parse_header) and converted them with exit 0, and a
    lone surrogate in the metadata then failed the writer with an internal error. Now: what ckconv reads, the
    library reads the same, and the rest is refused in one line."""
    from ckconv.formats import safetensors_file as sf

    code = {"float32": "F32"}
    for case, header in HEADERS.items():
        path = _st_file(tmp_path / "h.safetensors", header)
        oracle = _library_reads(path)
        for one_pass in (True, False):
            with monkeypatch.context() as m:
                if not one_pass:
                    m.setattr(sf, "_read_usual", lambda *args: None)
                try:
                    tensors, metadata = sf.read_file(path)
                except CkconvError as exc:
                    assert "\n" not in str(exc)
                    continue
            assert oracle is not None, f"{case}: ckconv reads what the safetensors library refuses"
            mine = sorted((k, list(r.shape), code[r.dtype]) for k, r in tensors.items())
            assert (mine, metadata or None) == oracle, case
    # positive controls: the library reads these, and so does ckconv
    for case in ("usual", "metadata", "negative zero in a name", "surrogate pair in a name", "surrogate pair in metadata",
                 "escaped backslash before u", "NUL escape in a name"):
        path = _st_file(tmp_path / "h.safetensors", HEADERS[case])
        assert _library_reads(path) is not None and sf.read_file(path), case


def test_a_lone_surrogate_in_safetensors_metadata_is_refused_before_anything_is_written(tmp_path):
    src = _st_file(tmp_path / "m.safetensors", HEADERS["lone surrogate in a metadata key"])
    for out in ("o.pth", "o.safetensors"):
        result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / out)])
        assert result.exit_code == 1 and "surrogate" in result.output and "internal error" not in result.output
        assert not (tmp_path / out).exists()
    result = CliRunner().invoke(cli, ["scan", str(src)])
    assert result.exit_code == 1 and "BROKEN" in result.output


def test_a_lone_surrogate_in_the_pth_metadata_record_is_refused_before_anything_is_written(tmp_path):
    """ckconv keeps a source's metadata in ``.data/ckconv_metadata.json`` of the .pth it writes. One holding a
    ``\\udc80`` escape (never written by ckconv, whose writer encodes UTF-8) was read, then failed every writer with
    an internal error; it is refused on reading, in one line."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    src = tmp_path / "meta.pth"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(src, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        top = zin.namelist()[0].split("/")[0]
        zout.writestr(f"{top}/.data/ckconv_metadata.json", b'{"note\\udc80": "x", "v": "\\ud800"}')
    assert torch.equal(torch.load(src, weights_only=True)["w"], torch.ones(3))  # torch ignores the record
    for out in ("o.pth", "o.safetensors"):
        result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / out)])
        assert result.exit_code == 1 and "surrogate" in result.output and "internal error" not in result.output
        assert result.output.count("\n") == 1 and not (tmp_path / out).exists()


def test_a_lone_surrogate_in_a_sharded_folders_index_is_refused_before_anything_is_written(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"b": torch.ones(3)}, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        '{"metadata": {"total_size": 20, "note\\udc80": "x"}, "weight_map": {"a": "model-00001-of-00002.safetensors", '
        '"b": "model-00002-of-00002.safetensors"}}')
    for out in ("o.pth", "o.safetensors"):
        result = CliRunner().invoke(cli, ["convert", str(folder), str(tmp_path / out)])
        assert result.exit_code == 1 and "surrogate" in result.output and "internal error" not in result.output
        assert result.output.count("\n") == 1 and not (tmp_path / out).exists()


# -- the scan's runs of entries under insertions, deletions and repeats ----------------------------------------------

_SNIPPETS = [b"0", b"2", b"N", b"(", b"1", b"\x85", b"t", b")", b"}", b"]", b"e", b"s", b"u", b"a", b"b", b"R", b"Q",
             b"\x88", b"K\x01", b"X\x01\x00\x00\x00a", b"X\x01\x00\x00\x007", b"\x8c\x01a", b"\x94", b"(X\x01\x00\x00\x00k",
             b"(h\x01", b"c__builtin__\neval\n", b"cos\nsystem\n"]


def test_runs_of_entries_with_opcodes_inserted_deleted_or_repeated_decide_as_the_handlers():
    """The existing differential mutates a run's bytes in place; the bug above came from an insertion (a second PUT).
    Seeded mutants of many-tensor pickles (a state_dict, views of one storage, a list, an optimizer's state, nested
    dicts; memos past 255 entries, so the runs' LONG_BINPUT records are read): opcodes inserted (PUTs and GETs of
    any memo index, a dict's MARK and key, globals), slices deleted or repeated, bytes replaced. The scan with the
    fast path decides (end, roles, measures, or the refusal word for word) what it decides without it."""
    import random

    rng = random.Random(24)
    base = torch.arange(100.0)
    bases = [_data_pkl(obj) for obj in (
        {f"layer{i}.w": torch.zeros(2, 3) for i in range(50)},
        {f"v{i}": base[i:i + 3] for i in range(45)},
        [torch.ones(1) * i for i in range(45)],
        {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2)} for i in range(30)},
         "param_groups": [{"lr": 0.1, "params": list(range(30))}]},
        {"a": {f"x{i}": torch.zeros(1) for i in range(40)}, "b": {f"y{i}": torch.ones(2) for i in range(40)}},
    )]
    differ = []
    for i in range(200):
        m = bytearray(rng.choice(bases))
        for _ in range(rng.choice([1, 1, 2, 3])):
            pos = rng.randrange(len(m) // 3, len(m) - 1)
            kind = rng.random()
            if kind < 0.4:
                op = rng.choice(b"rjqh")
                index = rng.randrange(700)
                m[pos:pos] = (bytes([op]) + (index.to_bytes(4, "little") if op in b"rj" else bytes([index % 256]))
                              if rng.random() < 0.5 else rng.choice(_SNIPPETS))
            elif kind < 0.6:
                del m[pos:pos + rng.randrange(1, 6)]
            elif kind < 0.8:
                n = rng.randrange(1, 80)
                m[pos:pos] = m[pos - n:pos]
            else:
                m[pos] = rng.randrange(256)
        if _scan(bytes(m), True) != _scan(bytes(m), False):
            differ.append(i)
    for data in bases:  # after each record of a run: its last PUT again, or one of the next index
        for end in [e.end() for e in re.finditer(rb"Rr(....)", data, re.DOTALL)][::3]:
            index = int.from_bytes(data[end - 4:end], "little") + rng.choice([0, 1])
            m = data[:end] + b"r" + index.to_bytes(4, "little") + data[end:]
            if _scan(m, True) != _scan(m, False):
                differ.append(end)
    assert not differ
