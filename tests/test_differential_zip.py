"""storage.zipio reads what torch's miniz reads: every layout the writers produce is accepted, byte for byte as
``torch._C.PyTorchFileReader`` returns it; the ambiguities are refused (the harness is tests/test_differential.py)."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib

import pytest
import torch

import mutants as M
from ckconv.errors import CorruptCheckpoint
from ckconv.pickling.unpickler import unpickle
from ckconv.storage.zipio import ZipRecords, ZipWriter


def torch_reads(path, name):
    return torch._C.PyTorchFileReader(str(path)).get_record(name)


@pytest.mark.parametrize("how", ["torch2", "torch5", "empty_tensor", "zipfile", "ckconv"])
def test_every_writer_layout_reads_as_torch_reads_it(how, tmp_path):
    path = tmp_path / "a.pth"
    state = {"w": torch.arange(6.0), "e": torch.zeros(0), "i": torch.ones(3, dtype=torch.int64)}
    if how.startswith("torch") or how == "empty_tensor":
        torch.save(state if how != "torch2" else {"w": state["w"]}, path,
                   pickle_protocol=5 if how == "torch5" else 2)
    elif how == "zipfile":  # Python's writer, stored: no data descriptors, no zip64 end records
        buf = io.BytesIO()
        torch.save(state, buf)
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in M.records_of(buf.getvalue()):
                zf.writestr(name, data)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(path, "wb") as f:
            w = ZipWriter(f)
            for name, data in M.records_of(buf.getvalue()):
                w.add(name, [data], len(data))
            w.close()
    records = ZipRecords(path)
    top = next(iter(records.records)).split("/")[0]
    for name in records.records:
        assert records.read(name) == torch_reads(path, name[len(top) + 1:]), name


def test_zip64_records_and_offsets_read_as_torch_reads_them(tmp_path):
    """A record of 4 GiB + 1 byte (sparse zeros) then a small one past 4 GiB: ckconv's writer uses zip64 sizes,
    offsets and end records; both readers agree on every offset."""
    path = tmp_path / "big.pth"
    size = (1 << 32) + 1
    crc = 0
    chunk = bytes(1 << 24)
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(size % len(chunk)), crc)
    with open(path, "wb") as f:
        w = ZipWriter(f)
        w.add("a/data.pkl", [b"\x80\x02N."], 4)
        w.add_copy("a/data/0", size, lambda fd, offset: os.ftruncate(fd, offset + size) or crc)
        w.add("a/version", [b"3\n"], 2)
        w.close()
    records = ZipRecords(path)
    assert records.records["a/data/0"][1] == size
    assert records.records["a/version"][0] > 1 << 32
    assert records.read("a/version") == torch_reads(path, "version") == b"3\n"
    reader = torch._C.PyTorchFileReader(str(path))
    assert reader.get_record_offset("data/0") == records.records["a/data/0"][0]


def test_a_record_reached_under_another_spelling_is_refused(tmp_path):
    path = tmp_path / "a.pth"
    path.write_bytes(M.archive([("a/data.pkl", b"\x80\x02N."), ("a/Byteorder", b"big")]))
    records = ZipRecords(path).records
    assert "a/data.pkl" in records and "a/nothing" not in records
    with pytest.raises(CorruptCheckpoint, match="stored as 'a/Byteorder'"):
        "a/byteorder" in records  # noqa: B015 - the lookup itself refuses


def test_a_frame_inside_a_frame_past_stop_is_refused():
    """The outer FRAME runs past STOP while the last one ends before it: still two readings."""
    body = pickle.dumps({"a": 1}, protocol=2)[2:]
    inner = b"\x95" + struct.pack("<Q", len(body)) + body
    outer = b"\x80\x04\x95" + struct.pack("<Q", len(inner) + 8) + inner + b"\0" * 8
    assert pickle.loads(outer) == {"a": 1}
    with pytest.raises(CorruptCheckpoint, match="FRAME holds 8 bytes after its STOP"):
        unpickle(outer, where="x")


def test_frames_that_end_at_stop_are_read():
    data = pickle.dumps({"a": list(range(5))}, protocol=4)
    assert unpickle(data, where="x")[0] == {"a": [0, 1, 2, 3, 4]}
    assert unpickle(M.reframe(pickle.dumps({"a": 1}, protocol=2)), where="x")[0] == {"a": 1}


def test_detection_and_reading_parse_the_directory_once(tmp_path, monkeypatch):
    """Every zip plugin's sniff and the reader share one parse of the central directory (issue 24); a file
    rewritten between them is parsed again, and what it now holds is what is read."""
    import ckconv
    from ckconv.storage import zipdir

    path = tmp_path / "a.pth"
    torch.save({f"w{i}": torch.full((2,), float(i)) for i in range(5)}, path)
    parses = []
    real = zipdir._directory
    monkeypatch.setattr(zipdir, "_directory", lambda *a: parses.append(a[2]) or real(*a))
    ckpt = ckconv.read(path)
    assert ckpt.format == "torch" and sorted(ckpt.root) == [f"w{i}" for i in range(5)]
    assert len(parses) == 1
    assert not zipdir._last  # taken by the reader: nothing kept once it is read

    assert zipdir.directory_names(path)  # kept for a reader
    torch.save({"other": torch.zeros(3)}, path)  # rewritten: another size and modification time
    os.utime(path, ns=(1, 1))
    assert sorted(ckconv.read(path).root) == ["other"]


def test_a_zip_that_reading_refuses_is_still_named_by_its_sniff(tmp_path):
    """An archive ckconv's directory parse refuses (a comment after the end record) still reaches the plugin whose
    sniff recognises it through Python's zipfile, which says what is wrong, as before the shared parse."""
    from ckconv.storage import zipdir

    path = tmp_path / "a.pth"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"appended"
    with pytest.raises(CorruptCheckpoint, match="comment"):
        zipdir.directory_names(path)
    assert any(n.endswith("/data.pkl") for n in zipdir.sniffed_names(path))
