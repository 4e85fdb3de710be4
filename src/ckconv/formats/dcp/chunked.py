"""DCP tensors made of chunks, each chunk (and each non-tensor value) a torch.save archive inside a ``.distcp``.

Every archive is read through :class:`ckconv.storage.zipio.ZipRecords` at its byte window, so it gets the same
checks as a ``.pth`` file (overlapping and duplicate records, compressed records, sizes past the end). A tensor's
bytes stream from its chunks only when a writer asks, in blocks of bounded size however many chunks there are.
"""

from __future__ import annotations

from math import prod

from ... import dtypes
from ...errors import CorruptCheckpoint, UnsupportedContent
from ...model import CHUNK, Storage, TensorRef, contiguous_strides
from ...pickling.unpickler import unpickle
from ...storage.zipio import ZipRecords, record_bytes
from ..torch_archive import DATA_PKL, ZIP_MAGIC, storage_loader

MAX_BLOB_PICKLE = 1 << 31


def read_archive(path, start, length, where, globals_=None):
    """The object the torch.save archive at bytes [start, start + length) of ``path`` holds, read with ckconv's
    restricted unpickler; the globals its pickle names (with their roles) are added to ``globals_`` when given
    (DCP loads a bytes item with ``torch.load(weights_only=False)``: its pickle runs, whatever of it is kept)."""
    with open(path, "rb") as f:
        f.seek(start)
        magic = f.read(4) if length >= 4 else b""
        if magic != ZIP_MAGIC:
            f.seek(0)
            head = f.read(9)
            if len(head) == 9 and head[8:9] == b"{":
                raise UnsupportedContent(
                    f"{where}: the .distcp files are safetensors (saved with serialization_format=SAFETENSORS); "
                    "ckconv reads DCP checkpoints saved with the default torch.save serialization")
            raise CorruptCheckpoint(f"{where}: the stored bytes are not a torch.save archive")
    records = ZipRecords(path, _refuse_torchscript(where), window=(start, length), where=where).records
    roots = [m.group(1) for n in records if (m := DATA_PKL.match(n))]
    if len(roots) != 1:
        raise CorruptCheckpoint(f"{where}: torch.save archive without exactly one data.pkl")
    prefix = roots[0] + "/"
    if prefix + "byteorder" in records:
        if record_bytes(path, records[prefix + "byteorder"], f"{where}: record byteorder", 16).strip() != b"little":
            raise UnsupportedContent(f"{where}: big-endian data is not supported")
    load_storage = storage_loader(path, records, prefix, where, label=where)
    data = record_bytes(path, records[prefix + "data.pkl"], f"{where}: record data.pkl", MAX_BLOB_PICKLE)
    root, up = unpickle(data, storage_loader=load_storage, where=where)
    if globals_ is not None:
        globals_ += up.globals
    return root


def _refuse_torchscript(where):
    def check(names):
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise UnsupportedContent(f"{where}: holds a TorchScript archive; ckconv does not run TorchScript")

    return check


class Piece:
    """One chunk of a tensor: a box (offsets, sizes) whose torch.save archive sits at a byte range of a file."""

    def __init__(self, fqn, dtype, offsets, sizes, path, start, length):
        self.fqn, self.dtype, self.offsets, self.sizes = fqn, dtype, offsets, sizes
        self.path, self.start, self.length = path, start, length
        self._ref = None
        self._gathered = None

    @property
    def where(self):
        return f"{self.path} ({self.fqn} at {list(self.offsets)})"

    def ref(self) -> TensorRef:
        """The chunk's tensor, found by reading its archive's pickle (small) on first use."""
        if self._ref is None:
            ref = read_archive(self.path, self.start, self.length, self.where)
            if not isinstance(ref, TensorRef):
                raise CorruptCheckpoint(f"{self.where}: a tensor chunk's archive holds {type(ref).__name__}")
            if ref.dtype != self.dtype or ref.shape != tuple(self.sizes):
                raise CorruptCheckpoint(f"{self.where}: the chunk holds {ref.dtype} {list(ref.shape)} but the "
                                        f"metadata says {self.dtype} {list(self.sizes)}")
            self._ref = ref
        return self._ref

    def read(self, start, length) -> bytes:
        """Bytes [start, start+length) of the chunk in C order."""
        ref = self.ref()
        if ref.is_contiguous:
            return ref.storage.read(ref.offset * dtypes.itemsize(ref.dtype) + start, length)
        if self._gathered is None:
            self._gathered = b"".join(bytes(c) for c in ref.chunks())
        return self._gathered[start:start + length]


class DcpTensorStorage(Storage):
    """A DCP tensor's bytes in C order, streamed from its chunk archives.

    One chunk covering the tensor streams (or kernel-copies) straight from the file. Several chunks are assembled
    in blocks of at most ``size`` bytes: each block is a run of the output along one dimension, to which every
    overlapping chunk contributes one contiguous byte range, so memory stays bounded by the block size however
    large the tensor.
    """

    def __init__(self, fqn, dtype, shape, pieces):
        super().__init__(fqn, dtype, prod(shape) * dtypes.itemsize(dtype), label=fqn)
        self.verified = True  # each chunk archive's own CRC is checked as its bytes are read
        self.shape = tuple(shape)
        self.pieces = pieces

    def _whole(self):
        if len(self.pieces) == 1 and tuple(self.pieces[0].sizes) == self.shape:
            return self.pieces[0].ref()
        return None

    def chunks(self, start=0, length=None, size=CHUNK):
        if length is None:
            length = self.nbytes - start
        if length <= 0:
            return
        if start < 0 or start + length > self.nbytes:
            raise CorruptCheckpoint(f"{self.label}: read past the end of the tensor")
        ref = self._whole()
        if ref is not None:
            if ref.is_contiguous:
                yield from ref.storage.chunks(ref.offset * dtypes.itemsize(self.dtype) + start, length, size)
            else:
                data = self.pieces[0].read(start, length)
                for pos in range(0, len(data), size):
                    yield data[pos:pos + size]
            return
        yield from self._assemble(start, length, size)

    def copy_to(self, fd, dst_offset, start=0, length=None, *, want_crc=False, progress=None, files=None):
        if length is None:
            length = self.nbytes - start
        ref = self._whole()
        if ref is not None and ref.is_contiguous:  # file to file, in the kernel
            return ref.storage.copy_to(fd, dst_offset, ref.offset * dtypes.itemsize(self.dtype) + start, length,
                                       want_crc=want_crc, progress=progress, files=files)
        return super().copy_to(fd, dst_offset, start, length, want_crc=want_crc, progress=progress, files=files)

    def _assemble(self, start, length, size):
        import numpy as np

        item = dtypes.itemsize(self.dtype)
        shape, nd = self.shape, len(self.shape)
        vt = np.dtype(f"V{item}")
        inner = [prod(shape[i + 1:]) * item for i in range(nd)]  # bytes per index step along each dimension
        d = next(i for i in range(nd) if inner[i] <= size)  # blocks run along dimension d
        k = max(1, size // inner[d])
        outer_bytes = shape[d] * inner[d]
        end = start + length
        pieces = [(p, contiguous_strides(p.sizes)) for p in self.pieces if prod(p.sizes)]
        for o_lin in range(start // outer_bytes, (end - 1) // outer_bytes + 1):
            o = _unravel(o_lin, shape[:d])
            base = o_lin * outer_bytes
            a_first = max(0, (start - base) // inner[d])
            a_stop = min(shape[d], -(-(end - base) // inner[d]))
            for a in range(a_first, a_stop, k):
                b = min(a + k, a_stop)
                block = np.empty((b - a,) + shape[d + 1:], dtype=vt)
                filled = 0
                for p, pst in pieces:
                    if not all(p.offsets[i] <= o[i] < p.offsets[i] + p.sizes[i] for i in range(d)):
                        continue
                    lo, hi = max(a, p.offsets[d]), min(b, p.offsets[d] + p.sizes[d])
                    if lo >= hi:
                        continue
                    first = sum((o[i] - p.offsets[i]) * pst[i] for i in range(d)) + (lo - p.offsets[d]) * pst[d]
                    count = (hi - lo) * prod(p.sizes[d + 1:])
                    part = np.frombuffer(p.read(first * item, count * item), dtype=vt)
                    target = (slice(lo - a, hi - a),) + tuple(
                        slice(p.offsets[j], p.offsets[j] + p.sizes[j]) for j in range(d + 1, nd))
                    block[target] = part.reshape((hi - lo,) + tuple(p.sizes[d + 1:]))
                    filled += count
                if filled != block.size:
                    raise CorruptCheckpoint(f"{self.label}: its chunks do not cover the tensor")
                raw = memoryview(block.reshape(-1).view(np.uint8))
                block_start = base + a * inner[d]
                lo_b, hi_b = max(start, block_start) - block_start, min(end, block_start + len(raw)) - block_start
                yield raw[lo_b:hi_b]


def _unravel(index, dims):
    out = []
    for n in reversed(dims):
        out.append(index % n)
        index //= n
    return tuple(reversed(out))

