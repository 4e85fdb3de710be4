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
