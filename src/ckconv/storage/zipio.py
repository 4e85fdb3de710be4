"""Reading and writing the zip container of torch checkpoints, with checks torch itself skips.

torch.save writes stored (uncompressed) records aligned to 64 bytes. On read we refuse compressed members and
duplicate names, check every declared size against the file, and hand out each record as a byte range whose CRC
is checked whenever its bytes are read. An archive may also sit at a byte window of a larger file (DCP stores one
torch.save archive per item inside a ``.distcp`` file); it gets exactly the same checks.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from ..errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsupportedContent

ALIGN = 64


class _Window(io.RawIOBase):
    """A read-only file object showing bytes [start, start + length) of an open file."""

    def __init__(self, f, start, length):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        new = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        if new < 0:
            raise ValueError("negative seek position")
        self.pos = new
        return new

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        if not n:
            return 0
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class ZipRecords:
    """Name -> (data offset, size, crc) for every record of a torch zip archive.

    ``check_names(names)`` runs on the list of record names before any record is judged, so a reader can give
    the precise reason for an archive it does not handle (a TorchScript archive) before a generic one.

    ``window=(start, length)`` reads the archive held at those bytes of ``path``: every check applies to the
    window as if it were the whole file, the offsets handed out are offsets in ``path``, and errors name
    ``where`` (default ``path``). Such an archive was located by its container, so one that does not parse is
    corrupt (:class:`CorruptCheckpoint`) rather than not a checkpoint.
    """

    def __init__(self, path, check_names=None, *, window=None, where=None, deflated=None):
        self.path = path
        self.where = str(path) if where is None else where
        self.deflated = deflated or (lambda name: False)  # names a reader allows to be deflated (TorchScript code)
        self.inflated_sizes = {}  # name -> declared size once inflated, for the deflated records
        try:
            with open(path, "rb") as f:
                base = 0
                if window is not None:
                    base, length = window
                    f = _Window(f, base, length)
                self.file_size = f.seek(0, 2)
                zf = zipfile.ZipFile(f)
                infos = zf.infolist()
                if check_names is not None:
                    check_names([i.filename for i in infos])
                self.records = {}
                spans = []
                for info in infos:
                    start = self._check(f, info)
                    self.records[info.filename] = (base + start, info.compress_size, info.CRC)
                    spans.append((info.header_offset, start + info.compress_size, info.filename))
                self._no_overlap(spans, zf.start_dir)
        except (CorruptCheckpoint, UnsupportedContent):
            raise
        except OSError as exc:
            if exc.errno is not None and not isinstance(exc, zipfile.BadZipFile):
                raise NotACheckpoint(f"{self.where}: cannot read it ({exc.strerror or exc})") from None
            raise self._broken(exc, window, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - zipfile raises many types on hostile input
            raise self._broken(exc, window, f"{type(exc).__name__}: {str(exc)[:120]}") from None

    def _broken(self, exc, window, detail):
        """A zip that does not parse: a file that is not a checkpoint, or, when its container located it (a
        window), a corrupt part of one."""
        if window is not None:
            return CorruptCheckpoint(f"{self.where}: broken torch.save archive ({exc})")
        return NotACheckpoint(f"{self.where}: not a readable checkpoint (broken zip archive: {detail})")

    def _check(self, f, info) -> int:
        path, name = self.where, info.filename
        if name in self.records:
            raise CorruptCheckpoint(f"{path}: duplicate zip record {name!r:.80}; refusing an ambiguous archive")
        if info.compress_type == zipfile.ZIP_DEFLATED and self.deflated(name):
            self.inflated_sizes[name] = info.file_size
        elif info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpoint(
                f"{path}: zip record {name!r:.80} is compressed; torch.save never writes compressed "
                "records, so this file was altered (possible decompression bomb)")
        elif info.file_size != info.compress_size:
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} declares inconsistent sizes")
        if info.flag_bits & 0x1:
            raise UnsupportedContent(f"{path}: encrypted zip records are not supported")
        if not 0 <= info.header_offset <= self.file_size - 30:
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} has a local header outside the file")
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} has a broken local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_name = f.read(name_len)
        cp437 = info.orig_filename.encode("cp437", "replace")
        if local_name.decode("utf-8", "replace") != name and local_name != cp437:
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} disagrees with its local header")
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > self.file_size:
            raise CorruptCheckpoint(
                f"{path}: zip record {name!r:.80} declares {info.file_size} bytes past the end of the "
                "file; the file is truncated or altered")
        return start

    def _no_overlap(self, spans, central_directory):
        """Each record's header and bytes lie apart from every other's and before the central directory.

        Overlapping records are how "non-recursive" zip bombs reuse one run of bytes many times over.
        """
        spans.sort()
        for (_, end, name), (next_start, _, next_name) in zip(spans, spans[1:] + [(central_directory, 0, None)]):
            if end > next_start:
                other = f"record {next_name!r:.80}" if next_name is not None else "the central directory"
                raise CorruptCheckpoint(f"{self.where}: zip record {name!r:.80} overlaps {other}; "
                                        "the archive was crafted or damaged")

    def read(self, name, limit=1 << 31) -> bytes:
        if name in self.inflated_sizes:
            raise CorruptCheckpoint(f"{self.where}: record {name!r:.80} is deflated where stored bytes belong")
        return record_bytes(self.path, self.records[name], f"{self.where}: record {name!r:.80}", limit)

    def read_deflated(self, name, limit) -> bytes:
        """A record the reader allowed to be deflated, inflated to at most ``limit`` bytes and CRC-checked."""
        where = f"{self.where}: record {name!r:.80}"
        start, size, crc = self.records[name]
        declared = self.inflated_sizes.get(name, size)
        if declared > limit:
            raise LimitExceeded(f"{where} inflates to {declared} bytes, over the {limit} ckconv reads")
        with open(self.path, "rb") as f:
            f.seek(start)
            raw = f.read(size)
        if name not in self.inflated_sizes:
            data = raw
        else:
            inflater = zlib.decompressobj(-15)
            data = inflater.decompress(raw, declared + 1)
            if len(data) != declared or not inflater.eof:
                raise CorruptCheckpoint(f"{where} does not inflate to its declared {declared} bytes")
        if len(raw) != size or zlib.crc32(data) != crc:
            raise CorruptCheckpoint(f"{where}: truncated or CRC mismatch; the file is corrupt, get a fresh copy")
        return data


def record_bytes(path, record, where, limit) -> bytes:
    """The bytes of a stored record ``(start, size, crc)`` of ``path``, CRC-checked; ``where`` names it in errors."""
    start, size, crc = record
    if size > limit:
        raise CorruptCheckpoint(f"{where} is implausibly large ({size} bytes)")
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(size)
    if len(data) != size:
        raise CorruptCheckpoint(f"{where} is truncated")
    if zlib.crc32(data) != crc:
        raise CorruptCheckpoint(f"{where}: CRC mismatch; the file is corrupt, get a fresh copy")
    return data


class ZipWriter:
    """Streams stored, 64-byte-aligned records the way torch's PyTorchFileWriter lays them out."""

    def __init__(self, f):
        self.f = f
        self.pos = f.tell()
        self.entries = []  # (name bytes, offset, size, crc, zip64)
        self._moved = False  # True after add_copy wrote through the descriptor: f's own position is behind

    def add(self, name: str, chunks, size: int, expected_crc: int | None = None):
        """Write a record from ``chunks``; the local header's CRC is patched in once the bytes have streamed."""
        bname, extra, zip64 = self._layout(name, size)
        header_pos = self.pos
        self._write(self._local_header(bname, extra, size, 0, zip64))
        crc = written = 0
        for c in chunks:
            crc = zlib.crc32(c, crc)
            self._write(c)
            written += len(c)
        if written != size:
            raise CorruptCheckpoint(f"record {name} produced {written} bytes, expected {size}")
        if expected_crc is not None and crc != expected_crc:
            raise CorruptCheckpoint(f"CRC mismatch while copying record {name}; the source file is corrupt")
        self.f.seek(header_pos + 14)
        self.f.write(struct.pack("<I", crc))
        self.f.seek(self.pos)
        self.entries.append((bname, header_pos, size, crc, zip64))

    def add_copy(self, name: str, size: int, copy):
        """Write a record of ``size`` bytes that ``copy(fd, offset)`` puts at ``offset`` of the file's descriptor.

        ``copy`` returns the CRC-32 of what it wrote (``Storage.copy_to(..., want_crc=True)`` does, checking the
        source's own CRC in the same pass), so the bytes are checksummed once and never pass through this object.
        The local header goes in afterwards, CRC included, through ``f`` (which may be a wrapper that shifts
        positions): one seek and one buffered write, no patching.
        """
        bname, extra, zip64 = self._layout(name, size)
        header_pos = self.pos
        header_len = 30 + len(bname) + len(extra)
        self.f.flush()  # buffered bytes reach the file before the descriptor is written directly
        crc = copy(self.f.fileno(), header_pos + header_len)
        self.f.seek(header_pos)
        self.f.write(self._local_header(bname, extra, size, crc, zip64))
        self.pos = header_pos + header_len + size
        self._moved = True
        self.entries.append((bname, header_pos, size, crc, zip64))

    def _layout(self, name, size):
        bname = name.encode()
        zip64 = size >= 0xFFFFFFFF or self.pos >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = (-(self.pos + 30 + len(bname) + len(extra) + 4)) % ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding field, as torch writes
        return bname, extra, zip64

    def _write(self, data):
        if self._moved:
            self.f.seek(self.pos)
            self._moved = False
        self.f.write(data)
        self.pos += len(data)

    @staticmethod
    def _local_header(bname, extra, size, crc, zip64):
        sz = 0xFFFFFFFF if zip64 else size
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0x21, crc, sz, sz,
                           len(bname), len(extra)) + bname + extra

    def close(self):
        cd_start = self.pos
        for bname, offset, size, crc, _ in self.entries:
            big = size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF
            extra = struct.pack("<HHQQQ", 1, 24, size, size, offset) if big else b""
            sz = 0xFFFFFFFF if big else size
            off = 0xFFFFFFFF if big else offset
            self._write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45 if big else 20, 45 if big else 20, 0, 0,
                                    0, 0x21, crc, sz, sz, len(bname), len(extra), 0, 0, 0, 0, off) + bname + extra)
        cd_size = self.pos - cd_start
        n = len(self.entries)
        if n >= 0xFFFF or cd_start >= 0xFFFFFFFF or cd_size >= 0xFFFFFFFF:
            eocd64 = self.pos
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))
