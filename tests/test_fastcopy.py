"""The write/stream path: kernel copies, the one-pass copy with CRC, fallbacks, and that a tampered source is still caught."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib

import pytest
import torch

import ckconv
from ckconv.storage import fastcopy
from ckconv.errors import CorruptCheckpoint
from ckconv.formats.torch_file import read_zip
from helpers import assert_deep_equal


@pytest.fixture(params=["copy_file_range", "sendfile", "buffer"])
def copy_mode(request, monkeypatch):
    """Run a test with each way of moving bytes, in many small blocks and buffers."""
    flags = {"copy_file_range": request.param == "copy_file_range",
             "sendfile": request.param in ("copy_file_range", "sendfile")}
    flags = {k: v and fastcopy._kernel_copy[k] for k, v in flags.items()}
    monkeypatch.setattr(fastcopy, "_kernel_copy", flags)
    monkeypatch.setattr(fastcopy, "BLOCK", 4096 + 64)  # many blocks, a ragged last one
    monkeypatch.setattr(fastcopy, "BUF", 1000)
    return request.param


def checkpoint():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(100, 70, generator=g)
    base = torch.arange(60, dtype=torch.int64)
    return {"model": {"w": big, "b": torch.randn(7, generator=g).to(torch.bfloat16),
                      "tied": big, "view": base[10:40], "t": torch.randn(8, 9, generator=g).t(),
                      "empty": torch.empty(0, 3), "flag": torch.tensor(True)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(100, 70, generator=g)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "epoch": 4}


@pytest.mark.parametrize("chain", [[".pth"], [".safetensors", ".pth"], [".safetensors", ".safetensors", ".pth"]])
def test_roundtrip_is_bit_exact_with_every_copy_mode(tmp_path, copy_mode, chain):
    obj = checkpoint()
    current = tmp_path / "src.pth"
    torch.save(obj, current)
    for i, suffix in enumerate(chain):
        nxt = tmp_path / f"step{i}{suffix}"
        ckconv.convert(current, nxt)
        current = nxt
    assert_deep_equal(obj, torch.load(current, weights_only=True))


def test_sharded_output_is_bit_exact(tmp_path, copy_mode):
    sd = {f"layer{i}.weight": torch.randn(64, 33, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    torch.save(sd, tmp_path / "src.pth")
    ckconv.convert(tmp_path / "src.pth", tmp_path / "shards", max_shard_size="20KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    ckconv.convert(tmp_path / "shards", tmp_path / "back.pth")
    assert_deep_equal(sd, torch.load(tmp_path / "back.pth", weights_only=True))


def test_written_zip_records_have_correct_crcs(tmp_path, copy_mode):
    torch.save(checkpoint(), tmp_path / "src.pth")
    ckconv.convert(tmp_path / "src.pth", tmp_path / "mid.safetensors")
    ckconv.convert(tmp_path / "mid.safetensors", tmp_path / "out.pth")
    with zipfile.ZipFile(tmp_path / "out.pth") as zf:
        assert zf.testzip() is None
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
    records = read_zip(tmp_path / "out.pth")  # aligned, well-formed, readable by ckconv itself
    assert records.format == "torch"


def _tamper_largest_record(path):
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_tampered_zip_source_is_refused_and_nothing_is_written(tmp_path, copy_mode, suffix):
    torch.save(checkpoint(), tmp_path / "src.pth")
    _tamper_largest_record(tmp_path / "src.pth")
    dst = tmp_path / f"out{suffix}"
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        ckconv.convert(tmp_path / "src.pth", dst)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src.pth"]  # no temporary left behind either


def test_truncated_source_is_a_corrupt_checkpoint(tmp_path, copy_mode):
    sd = {"w": torch.randn(50, 50)}
    torch.save(sd, tmp_path / "src.pth")
    ckpt = ckconv.read(tmp_path / "src.pth")
    st = ckpt.root["w"].storage
    os.truncate(tmp_path / "src.pth", st.offset + st.nbytes // 2)
    with open(tmp_path / "out.bin", "wb") as f, pytest.raises(CorruptCheckpoint, match="truncated"):
        st.copy_to(f.fileno(), 0, want_crc=True)


def test_copy_with_crc_matches_zlib_for_ragged_ranges(tmp_path, copy_mode):
    data = os.urandom(50_000)
    (tmp_path / "src").write_bytes(data)
    for start, length in [(0, 50_000), (1, 49_998), (4095, 10_001), (7, 0), (49_999, 1)]:
        src = os.open(tmp_path / "src", os.O_RDONLY)
        dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            os.pwrite(dst, b"H" * 13, 0)
            seen = []
            crc = fastcopy.copy_with_crc(src, start, dst, 13, length, progress=seen.append)
            assert crc == zlib.crc32(data[start:start + length])
            assert sum(seen) == length
            fastcopy.kernel_copy(src, start, dst, 13 + length, length)
        finally:
            os.close(src)
            os.close(dst)
        assert (tmp_path / "dst").read_bytes() == b"H" * 13 + data[start:start + length] * 2


def test_storage_read_is_exact_and_checks_the_crc(tmp_path):
    t = torch.randn(300)
    torch.save({"t": t}, tmp_path / "src.pth")
    st = ckconv.read(tmp_path / "src.pth").root["t"].storage
    assert st.read() == t.numpy().tobytes()
    assert st.read(8, 16) == t.numpy().tobytes()[8:24]
    _tamper_largest_record(tmp_path / "src.pth")
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        ckconv.read(tmp_path / "src.pth").root["t"].storage.read()


@pytest.mark.parametrize("backend", ["isal", "zlib-ng", "zlib"])
def test_every_crc32_backend_gives_zlibs_crc_and_catches_tampering(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("CKCONV_CRC32", backend)
    name, crc32 = fastcopy._pick_crc32()
    if name != backend:
        pytest.skip(f"{backend} is not installed")  # zlib always is; isal is a dependency where it has wheels
    monkeypatch.setattr(fastcopy, "_crc32", crc32)
    data = os.urandom(3 * fastcopy.BUF + 12_345)  # several buffers, a ragged last one
    (tmp_path / "src").write_bytes(data)
    src, dst = os.open(tmp_path / "src", os.O_RDONLY), os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        assert fastcopy.copy_with_crc(src, 5, dst, 0, len(data) - 5) == zlib.crc32(data[5:])
    finally:
        os.close(src)
        os.close(dst)
    torch.save(checkpoint(), tmp_path / "ckpt.pth")
    _tamper_largest_record(tmp_path / "ckpt.pth")
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch"):
        ckconv.convert(tmp_path / "ckpt.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
