"""The per-record fast paths (issue 24) decide exactly as the step-by-step checks they stand in front of: a zip
record checked against its local header in :meth:`ZipRecords._check_all`, a tensor record checked by
:meth:`RestrictedUnpickler._rebuild_tensor`. Each is compared with the slow path on the same inputs, mutated."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

import mutants as M
from ckconv.errors import CkconvError
from ckconv.model import Storage
from ckconv.pickling.unpickler import MAX_VIEWS, RestrictedUnpickler
from ckconv.storage import zipio
from ckconv.storage.zipio import ZipRecords, ZipWriter


def _outcome(path, window=None):
    try:
        records = ZipRecords(path, window=window)
    except CkconvError as exc:
        return type(exc).__name__, str(exc)
    return sorted(dict.items(records.records))


def _slow(self, f, entries, base):
    end = 0
    for e in entries:
        end = self._check(f, e, end, base)
    return end


def _layouts():
    state = {"w": torch.arange(6.0), "e": torch.zeros(0), "i": torch.ones(3, dtype=torch.int64)}
    buf = io.BytesIO()
    torch.save(state, buf)
    torch_file = buf.getvalue()
    records = M.records_of(torch_file)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:  # no data descriptors, no padding field
        for name, data in records:
            zf.writestr(name, data)
    mine = io.BytesIO()
    w = ZipWriter(mine)
    for name, data in records:
        w.add(name, [data], len(data))
    w.close()
    return {"torch": torch_file, "zipfile": out.getvalue(), "ckconv": mine.getvalue()}


def _header_bytes(data):
    """Offsets of the bytes of each record's local header (with its name and first extra field's header), of the
    descriptor after it (when it has one), of its first data byte and of its central directory entry."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    for info in infos:
        at = info.header_offset
        name_len, extra_len = int.from_bytes(data[at + 26:at + 28], "little"), int.from_bytes(data[at + 28:at + 30],
                                                                                              "little")
        start = at + 30 + name_len + extra_len
        yield from range(at, at + 30 + name_len + min(extra_len, 4))
        yield from range(start, start + min(info.file_size, 1))
        if info.flag_bits & 8:
            yield from range(start + info.file_size, start + info.file_size + 16)
    at = int.from_bytes(data[-6:-2], "little")  # the central directory: each entry's fixed part and name
    for _ in infos:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        yield from range(at, at + 46 + name_len)
        at += 46 + name_len + int.from_bytes(data[at + 30:at + 32], "little")


@pytest.mark.parametrize("layout", ["torch", "zipfile", "ckconv"])
def test_local_header_fast_path_decides_as_the_step_by_step_check(layout, tmp_path, monkeypatch):
    """Every byte of every local header, of the padding field's header, of each data descriptor, of each central
    directory entry (and the first byte of the data) with bits flipped: the archive is accepted or refused, with
    the same message, both ways."""
    data = _layouts()[layout]
    path = tmp_path / "a.pth"
    path.write_bytes(data)
    assert isinstance(_outcome(path), list) and len(_outcome(path)) >= 5  # the unmutated archive reads
    mutants = bytearray()  # every mutant in one file, each read as a window of it (as DCP items are)
    for pos in _header_bytes(data):
        for flip in (0x01, 0x08, 0x80):
            mutated = bytearray(data)
            mutated[pos] ^= flip
            mutants += mutated
    path.write_bytes(mutants)
    windows = [(at, len(data)) for at in range(0, len(mutants), len(data))]
    fast = [_outcome(path, window) for window in windows]
    monkeypatch.setattr(ZipRecords, "_check_all", _slow)
    slow = [_outcome(path, window) for window in windows]
    assert fast == slow
    accepted = sum(isinstance(o, list) for o in fast)
    assert accepted  # some mutations (a data byte, a time, the padding's length?) are still accepted, alike


def test_torch_records_take_the_fast_path(tmp_path, monkeypatch):
    path = tmp_path / "a.pth"
    path.write_bytes(_layouts()["torch"])
    monkeypatch.setattr(ZipRecords, "_check", lambda *a: pytest.fail("the step-by-step check ran"))
    assert len(ZipRecords(path).records) >= 5
    assert zipio.AHEAD >= 4096


def _tensor_outcome(fn, *args):
    try:
        ref = fn(*args)
    except CkconvError as exc:
        return type(exc).__name__, str(exc)
    return type(ref), ref.storage, ref.dtype, ref.shape, ref.stride, ref.offset, ref.requires_grad


BIG = (1 << 63) - 1
SHAPES = [(), (4,), (2,), (1,), (0,), (2, 0, 3), (2, 3), (3, 2), (1 << 62, 4, 0), (1 << 61, 3), (BIG,), (BIG + 1,), (-1,),
          (2.0,), (True,), ("2",), [2, 3], (2, (3,)), tuple(range(1, 70)), (1,) * 65, (1,) * 8, (1,) * 9]
STRIDES = [(), (1,), (0,), (3, 1), (1, 2), (1, 1, 1), (-1,), (BIG,), (BIG + 1, 1), [3, 1], (1.0,), (3, 1, 0)]


@pytest.mark.parametrize("dtype", ["float32", "int8", "qint8"])
@pytest.mark.parametrize("nbytes", [-1, 0, 23, 24, 25, 1 << 66])
def test_tensor_fast_path_decides_as_the_step_by_step_check(dtype, nbytes):
    """Twice over the same unpickler: the extents it keeps (at most MAX_VIEWS) answer as the first pass did; a
    float or bool shape equal to a kept one (``(2.0,) == (2,)``) is still refused."""
    up = RestrictedUnpickler(b".", where="t.pth")
    storage = Storage("0", dtype, nbytes, path="t.pth")
    for _ in range(2):
        for size in SHAPES:
            for stride in STRIDES + [tuple(1 for _ in size)]:
                for offset in (0, 1, 5, -1, BIG, True, 2.0):
                    for grad in (False, True, 0):
                        args = (storage, offset, size, stride, grad)
                        fast = _tensor_outcome(up._rebuild_tensor, *args)
                        slow = _tensor_outcome(lambda *a: up._checked_tensor(*a, None, False), *args)
                        assert fast == slow, args
    assert 0 < len(up._views) <= MAX_VIEWS
    assert _tensor_outcome(up._rebuild_tensor, "not a storage", 0, (1,), (1,)) == (
        "CorruptCheckpoint", "t.pth: tensor without a storage")


def test_a_builder_is_called_without_a_frame_of_its_own():
    up = RestrictedUnpickler(b".", where="t.pth")
    ordered = up.find_class("collections", "OrderedDict")
    assert ordered() == {} and ordered() is not ordered()  # a new empty dict each time
    assert list(ordered([("a", 1)]).items()) == [("a", 1)]
    assert repr(ordered) == "<ckconv builder for collections.OrderedDict>"
    assert ordered.__call__ == up._ordered_dict
