"""Writing .pth archives in bounded memory (issue 24): the pickle streamed into the archive, the zip directory held
deflated, storages numbered without a key object each, tied views found without a tuple per tensor. Each piece
gives the bytes it gave when it held everything whole, and torch reads the result."""

from __future__ import annotations

import io
import zipfile
from collections import OrderedDict

import torch

from ckconv.formats import torch_archive
from ckconv.formats.torch_archive import _ArchiveWriter, _StorageKeys
from ckconv.conversion import _unique_tensors
from ckconv.model import Storage, TensorRef, foreign_class
from ckconv.pickling import writer as pickle_writer
from ckconv.pickling.writer import PickleWriter
from ckconv.storage.zipio import ZipRecords, ZipWriter


def _tree():
    """Big dicts and lists (past the 1,000-item batches and the 1 MiB flush), tensors with shared storages and
    views, a foreign record and torch values."""
    shared = Storage("s", "float32", 64, buffer=bytearray(64))
    big = {f"layer.{i}.weight": TensorRef(Storage(str(i), "float32", 4, buffer=bytearray(4)), "float32", (1,))
           for i in range(5_000)}
    record = foreign_class("argparse", "Namespace")()
    record.__setstate__({"lr": 0.1})
    return OrderedDict(model=big, tied=[TensorRef(shared, "float32", (4, 4)), TensorRef(shared, "float32", (4, 4)),
                                        TensorRef(shared, "float32", (2,), offset=3)],
                       names=[f"n{i}" * 3 for i in range(100_000)], args=record, step=7)


def test_a_streamed_pickle_is_the_pickle_written_whole_and_is_held_a_mib_at_a_time():
    root = _tree()
    whole = PickleWriter(_StorageKeys()).dumps(root)
    pieces = []
    writer = PickleWriter(_StorageKeys(), sink=lambda data: pieces.append(bytes(data)))
    assert writer.dumps(root) == b""
    assert b"".join(pieces) == whole and len(whole) > 2 * pickle_writer.FLUSH
    assert len(pieces) >= 3 and max(map(len, pieces)) < pickle_writer.FLUSH + 64 * 1024


def test_storages_are_numbered_in_first_use_order_and_a_shared_one_keeps_its_key():
    a, b, c = (Storage(n, "uint8", 1) for n in "abc")
    keys = _StorageKeys()
    assert [keys(s) for s in (a, b, a, c, b, c)] == ["0", "1", "0", "2", "1", "2"]
    assert list(keys.order) == [a, b, c]
    alone = _StorageKeys()
    assert [alone(s) for s in (a, b, c)] == ["0", "1", "2"] and alone.index is None  # no index unless one repeats


def test_tied_views_are_found_without_a_key_per_tensor():
    st, other = Storage("s", "float32", 64), Storage("t", "float32", 64)
    refs = [TensorRef(st, "float32", (4, 4)), TensorRef(other, "float32", (16,)), TensorRef(st, "float32", (4, 4)),
            TensorRef(st, "float32", (4, 4), (1, 4)), TensorRef(st, "float32", (4, 4), (1, 4)),
            TensorRef(other, "float32", (16,))]
    assert _unique_tensors({str(i): ref for i, ref in enumerate(refs)}) == [refs[0], refs[1], refs[3]]


def test_a_record_streamed_with_a_wrong_size_guess_is_written_again_as_if_known(tmp_path):
    data = [bytes([i]) * 1000 for i in range(50)]

    def archive(guess):
        buf = io.BytesIO()
        zw = _ArchiveWriter(buf)
        zw.add_streamed("archive/data.pkl", lambda sink: [sink(d) for d in data], guess)
        zw.add("archive/version", [b"3\n"], 2)
        zw.close()
        return buf.getvalue()

    right = archive(0)
    assert archive(1 << 32) == right  # guessed zip64: the record is laid out again over itself
    assert zipfile.ZipFile(io.BytesIO(right)).read("archive/data.pkl") == b"".join(data)


def test_a_directory_of_many_records_is_written_from_its_deflated_pieces(tmp_path):
    path = tmp_path / "many.zip"
    with open(path, "wb") as f:
        zw = ZipWriter(f)
        for i in range(25_000):  # ~1.6 MB of directory entries: several deflated pieces
            zw.add(f"archive/data/{i}", [i.to_bytes(3, "little")], 3)
        zw.close()
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names == [f"archive/data/{i}" for i in range(25_000)]
        assert [z.read(names[i]) for i in (0, 1, 24_999)] == [b"\0\0\0", b"\1\0\0", (24_999).to_bytes(3, "little")]
    records = ZipRecords(path)
    assert len(records.records) == 25_000 and records.read("archive/data/12345") == (12_345).to_bytes(3, "little")


def test_a_streamed_archive_loads_in_torch_with_its_ties(tmp_path):
    root = _tree()
    path = tmp_path / "out.pth"
    torch_archive.write_zip(root, path)
    back = torch.load(path, weights_only=False)
    assert len(back["model"]) == 5_000 and back["names"][-1] == "n99999" * 3 and back["step"] == 7
    t0, t1, t2 = back["tied"]
    assert t0.untyped_storage().data_ptr() == t1.untyped_storage().data_ptr() == t2.untyped_storage().data_ptr()
    assert t2.storage_offset() == 3 and back["args"].lr == 0.1
