"""Flat partitions: a run of elements laid out over several ranks' tensors, and tensors streamed out of it.

ZeRO keeps each parameter group as one flat fp32 vector cut into one partition per rank. A parameter (and each of
its optimizer moments) is then a range of elements that may cross from one rank's partition into the next
(ZeRO-1/2), or one equal slice of every rank's partition (ZeRO-3). :class:`PieceStorage` is such a tensor's bytes
as a list of byte ranges of the partitions' own storages, streamed in bounded blocks when a writer asks: nothing
is gathered in memory.
"""

from __future__ import annotations

from ... import dtypes
from ...errors import CorruptCheckpoint
from ...model import CHUNK, Storage, TensorRef


class Piece:
    """Bytes ``[offset, offset + length)`` of ``storage``; ``path`` names the file they come from (what the scanner
    and the data-loss check count as read)."""

    __slots__ = ("storage", "offset", "length")

    def __init__(self, storage, offset, length):
        self.storage, self.offset, self.length = storage, offset, length

    @property
    def path(self):
        return self.storage.path


class Flat:
    """Elements ``[0, numel)`` of a vector made of 1-D contiguous tensors placed end to end."""

    def __init__(self, parts, what):
        self.parts = list(parts)
        self.what = what
        self.dtype = self.parts[0].dtype if self.parts else "float32"
        if any(p.dtype != self.dtype for p in self.parts):
            raise CorruptCheckpoint(f"{what}: partitions of different dtypes")
        self.starts = []
        total = 0
        for p in self.parts:
            self.starts.append(total)
            total += p.shape[0]
        self.numel = total

    def pieces(self, start, numel) -> list:
        """The :class:`Piece` list of elements ``[start, start + numel)``."""
        if start < 0 or numel < 0 or start + numel > self.numel:
            raise CorruptCheckpoint(f"{self.what}: elements {start}..{start + numel} lie past its {self.numel} "
                                    "elements; the checkpoint's shapes and partitions disagree")
        size = dtypes.itemsize(self.dtype)
        out, end = [], start + numel
        for part, first in zip(self.parts, self.starts):
            lo, hi = max(start, first), min(end, first + part.shape[0])
            if lo < hi:
                out.append(Piece(part.storage, (part.offset + lo - first) * size, (hi - lo) * size))
        return out


class PieceStorage(Storage):
    """A tensor's bytes, the concatenation of byte ranges of other storages, streamed piece by piece."""

    def __init__(self, label, dtype, pieces):
        for p in pieces:
            if p.offset < 0 or p.length < 0 or p.offset + p.length > p.storage.nbytes:
                raise CorruptCheckpoint(f"{label}: reaches past the end of storage {p.storage.label}")
        super().__init__(label, dtype, sum(p.length for p in pieces), label=label)
        self.verified = True  # each source storage checks its own CRC as its bytes are read
        self.pieces = pieces

    def chunks(self, start=0, length=None, size=CHUNK):
        if length is None:
            length = self.nbytes - start
        if start < 0 or length < 0 or start + length > self.nbytes:
            raise CorruptCheckpoint(f"{self.label}: read past the end of the tensor")
        pos, end = 0, start + length
        for p in self.pieces:
            lo, hi = max(start, pos), min(end, pos + p.length)
            if lo < hi:
                yield from p.storage.chunks(p.offset + lo - pos, hi - lo, size)
            pos += p.length
            if pos >= end:
                break


def tensor_of(label, dtype, shape, pieces) -> TensorRef:
    """One tensor over ``pieces``, with a storage of its own (as ``torch.save(model.state_dict())`` has)."""
    return TensorRef(PieceStorage(label, dtype, pieces), dtype, shape)
