"""Reading and writing the zip container of torch checkpoints: one reading, torch's, or a refusal.

torch reads archives with miniz (``torch._C.PyTorchFileReader``): it finds the central directory at the offset
the end record declares and a record by its name ignoring ASCII case; Python's ``zipfile`` looks for the directory
just before the end record and matches names exactly. So this module parses the container as miniz does and
accepts only the layout zip writers produce (torch.save's, ckconv's, ``zipfile``'s): records one after another
from the first byte, each local header agreeing with its directory entry (or a data descriptor right after the
bytes repeating it), the directory right after the last record and where declared, the (zip64) end records
right after it, nothing more. Everything else (names equal ignoring case, records outside the one top folder, a
lookup under a spelling other than the record's own) is refused: another reader could see it differently.

Records are handed out as byte ranges whose CRC is checked whenever their bytes are read. An archive may also sit
at a byte window of a larger file (DCP stores one torch.save archive per item inside a ``.distcp`` file); it gets
exactly the same checks, the window taken as the whole archive (torch reads it from a buffer of those bytes).
"""

from __future__ import annotations

import io
import struct
import zlib

from ..errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsupportedContent
from .zipdir import (_LOCAL, AMBIGUOUS, DESCRIPTOR, FLAG_DESCRIPTOR, FLAG_ENCRYPTED, FLAG_DEFLATE_OPTIONS, FLAG_UTF8,
                     LOCAL, SATURATED, _Broken, _fields, directory, directory_names)

__all__ = ["ZipRecords", "ZipWriter", "directory_names", "record_bytes"]

ALIGN = 64
AHEAD = 1 << 15  # bytes of local headers and small records read at a time
_LOCAL_KEY = struct.Struct("<IHHH4xIIIHH")  # a local header without its time and date, which no reader compares
_FIELD = struct.Struct("<HH")  # an extra field's id and length
_DESCRIPTOR32 = struct.Struct("<IIII")  # signature, CRC, compressed and stored size
_PLAIN_FLAGS = FLAG_DESCRIPTOR | FLAG_UTF8


def fold(name: str) -> bytes:
    """A record name as miniz compares it: its bytes with ASCII letters lowercased (``bytes.lower``)."""
    return name.encode("utf-8", "surrogateescape").lower()


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


class RecordTable(dict):
    """Record name -> ``(data offset, size, crc)``. torch looks a record up ignoring ASCII case, so a lookup that
    would reach a record under a spelling other than its own is refused instead of answered either way."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.folded: dict = {}

    def __contains__(self, name):
        exact = self.folded.get(fold(name))
        if exact is None:
            return False
        if exact != name:
            raise CorruptCheckpoint(f"{self.where}: zip record {name!r:.80} is stored as {exact!r:.80}; torch finds "
                                    f"it under either spelling; {AMBIGUOUS}")
        return True

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        return dict.__getitem__(self, name)


class ZipRecords:
    """Name -> (data offset, size, crc) for every record of a torch zip archive, read as torch reads it.

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
        self.records = RecordTable(self.where)
        self.deflated = deflated or (lambda name: False)  # names a reader allows to be deflated (TorchScript code)
        self.inflated_sizes = {}  # name -> declared size once inflated, for the deflated records
        try:
            with open(path, "rb") as f:
                base = 0
                if window is not None:
                    base, length = window
                    f = _Window(f, base, length)
                self.file_size = f.seek(0, 2)
                entries, self.directory_offset = directory(f, self.file_size, self.where)
                names = [e.name for e in entries]
                if check_names is not None:
                    check_names(names)
                self._check_names(entries)
                self._gap(self._check_all(f, entries, base), self.directory_offset, "the central directory")
        except (CorruptCheckpoint, UnsupportedContent):
            raise
        except _Broken as exc:
            raise self._broken(window, str(exc)) from None
        except OSError as exc:
            raise NotACheckpoint(f"{self.where}: cannot read it ({exc.strerror or exc})") from None

    def _broken(self, window, detail):
        """A zip that does not parse: a file that is not a checkpoint, or, when its container located it (a
        window), a corrupt part of one."""
        if window is not None:
            return CorruptCheckpoint(f"{self.where}: broken torch.save archive ({detail})")
        return NotACheckpoint(f"{self.where}: not a readable checkpoint (broken zip archive: {detail})")

    def _check_names(self, entries):
        """One top folder (torch takes it from the first entry and refuses others), no two names equal ignoring
        ASCII case (miniz's lookup would pick one of them, by its sort order)."""
        if not entries:
            raise _Broken("the archive holds no records")
        if "/" not in entries[0].name:
            raise CorruptCheckpoint(f"{self.where}: the first zip record {entries[0].name!r:.80} is not in a folder; "
                                    "torch.save archives keep every record in one folder")
        top = entries[0].name.split("/", 1)[0] + "/"
        folded = self.records.folded
        for e in entries:
            if not e.name.startswith(top):
                raise CorruptCheckpoint(f"{self.where}: zip record {e.name!r:.80} is outside the archive's folder "
                                        f"{top!r:.80}, which torch takes from the first record; {AMBIGUOUS}")
            key = fold(e.name)
            if key in folded:
                same = "" if folded[key] == e.name else (f" (equal to {folded[key]!r:.80} ignoring case, as torch "
                                                         "compares names)")
                raise CorruptCheckpoint(f"{self.where}: duplicate zip record {e.name!r:.80}{same}; {AMBIGUOUS}")
            folded[key] = e.name

    def _check_all(self, f, entries, base) -> int:
        """Check every record against its local header and its place (:meth:`_check`); return where the last ends.

        The records torch.save writes (stored, sizes under 4 GiB, right after the record before, a data descriptor
        or none) are checked here against local headers read ahead a block at a time (a hundred thousand small
        records: a few hundred reads) with a few comparisons each; any other record, or one that fails a check
        here, takes :meth:`_check`, which decides and says what is wrong. Both accept exactly the same records."""
        end = 0
        ahead, at, top = b"", 0, 0  # the file's bytes [at, top), read ahead
        header, field, descriptor = _LOCAL_KEY.unpack_from, _FIELD.unpack_from, _DESCRIPTOR32.unpack_from
        records, limit = self.records, self.directory_offset
        for e in entries:
            size, flags, raw = e.size, e.flags, e.raw
            n = len(raw)
            if e.offset == end and e.method == 0 and not flags & ~_PLAIN_FLAGS and size == e.csize < SATURATED:
                if end + 94 + n > top:  # the header, its name, a padding field
                    f.seek(end)
                    ahead, at = f.read(AHEAD), end
                    top = at + len(ahead)
                if end + 30 <= top:
                    rel = end - at
                    sig, version, lflags, method, crc, csize, lsize, name_len, xlen = header(ahead, rel)
                    x = rel + 30 + n  # the extra block
                    start = end + 30 + n + xlen
                    stop = start + size
                    if (sig == LOCAL and version == e.version and lflags == flags and method == 0 and name_len == n
                            and ahead.startswith(raw, rel + 30) and start <= top and stop <= limit
                            and (flags & FLAG_DESCRIPTOR or crc == e.crc and csize == lsize == size)
                            and (not xlen or xlen >= 4 and field(ahead, x)[1] == xlen - 4  # one field filling it
                                 or _fields(ahead[x:x + xlen], xlen) is not None)):
                        if flags & FLAG_DESCRIPTOR:  # its CRC and sizes after the bytes, 32-bit
                            if stop + 16 > top:
                                f.seek(stop)
                                ahead, at = f.read(AHEAD), stop
                                top = at + len(ahead)
                            if stop + 16 <= top and descriptor(ahead, stop - at) == (DESCRIPTOR, e.crc, size, size):
                                records[e.name] = base + start, size, e.crc
                                end = stop + 16
                                continue
                        else:
                            records[e.name] = base + start, size, e.crc
                            end = stop
                            continue
            end = self._check(f, e, end, base)
        return end

    def _check(self, f, e, expected, base) -> int:
        """Check one record against its local header and its place; return where the next record must start."""
        path, name = self.where, e.name
        if e.method == 8 and self.deflated(name):
            self.inflated_sizes[name] = e.size
        elif e.method != 0:
            raise CorruptCheckpoint(
                f"{path}: zip record {name!r:.80} is compressed; torch.save never writes compressed "
                "records, so this file was altered (possible decompression bomb)")
        elif e.size != e.csize:
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} declares inconsistent sizes")
        if e.flags & FLAG_ENCRYPTED:
            raise UnsupportedContent(f"{path}: encrypted zip records are not supported")
        if e.flags & ~(FLAG_DESCRIPTOR | FLAG_UTF8 | FLAG_DEFLATE_OPTIONS * (e.method == 8)):
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} sets flags {e.flags:#x} no zip writer of "
                                    "checkpoints sets; the file was altered")
        if e.offset + 30 + e.csize > self.file_size:
            raise CorruptCheckpoint(
                f"{path}: zip record {name!r:.80} declares {e.csize} bytes past the end of the "
                "file; the file is truncated or altered")
        self._gap(expected, e.offset, f"zip record {name!r:.80}")
        f.seek(e.offset)
        header = f.read(30)
        if len(header) != 30 or int.from_bytes(header[:4], "little") != LOCAL:
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} has a broken local header")
        _, version, flags, method, _, _, crc, csize, size, name_len, extra_len = _LOCAL.unpack(header)
        local_name = f.read(name_len)
        extra = _fields(f.read(extra_len), extra_len)
        if extra is None or local_name != e.raw or (version, flags, method) != (e.version, e.flags, e.method):
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} disagrees with its local header; {AMBIGUOUS}")
        if not e.flags & FLAG_DESCRIPTOR and not _local_sizes_agree(e, crc, csize, size, extra):
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80}: its local header declares other sizes or "
                                    f"CRC than the central directory; {AMBIGUOUS}")
        start = e.offset + 30 + name_len + extra_len
        end = start + e.csize
        if end > self.directory_offset:
            raise CorruptCheckpoint(f"{path}: zip record {name!r:.80} overlaps the central directory; "
                                    "the archive was crafted or damaged")
        if e.flags & FLAG_DESCRIPTOR:
            end += self._descriptor(f, e, end)
        dict.__setitem__(self.records, name, (base + start, e.csize, e.crc))
        return end

    def _descriptor(self, f, e, at) -> int:
        """The data descriptor after a record's bytes (flag bit 3): its signature, CRC and sizes (32- or 64-bit,
        as miniz writes them) must be the central directory's; returns its length."""
        f.seek(at)
        raw = f.read(24)
        if raw[:4] == DESCRIPTOR.to_bytes(4, "little"):
            if len(raw) >= 16 and struct.unpack_from("<III", raw, 4) == (e.crc, e.csize, e.size):
                return 16
            if len(raw) == 24 and struct.unpack_from("<IQQ", raw, 4) == (e.crc, e.csize, e.size):
                return 24
        raise CorruptCheckpoint(f"{self.where}: zip record {e.name!r:.80} has no data descriptor matching its "
                                f"central directory entry; {AMBIGUOUS}")

    def _gap(self, expected, actual, what):
        if actual < expected:
            raise CorruptCheckpoint(f"{self.where}: {what} overlaps the record before it; "
                                    "the archive was crafted or damaged")
        if actual > expected:
            where = "before the first record" if expected == 0 else "between zip records"
            raise CorruptCheckpoint(f"{self.where}: {actual - expected} bytes {where} (before {what}) that no record "
                                    f"holds; {AMBIGUOUS}")

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


def _local_sizes_agree(e, crc, csize, size, extra) -> bool:
    """A local header without a data descriptor must carry the entry's own CRC and sizes (zip64 when saturated)."""
    if crc != e.crc:
        return False
    if (csize, size) == (SATURATED, SATURATED):
        z64 = extra.get(1, b"")
        return len(z64) >= 16 and struct.unpack_from("<QQ", z64) in ((e.size, e.csize), (e.csize, e.size))
    return (size, csize) == (e.size, e.csize)


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


_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII").pack


class ZipWriter:
    """Streams stored, 64-byte-aligned records the way torch's PyTorchFileWriter lays them out."""

    def __init__(self, f):
        self.f = f
        self.pos = f.tell()
        # The central directory, each record's entry packed as it is added and kept deflated a MiB at a time:
        # a million entries that differ in a few bytes each hold ~8 MB, not a 65 MB directory or a tuple each.
        self.directory = bytearray()  # entries not yet deflated
        self._deflate = zlib.compressobj(1)
        self._deflated: list = []
        self.count = 0
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
        self.entry(bname, header_pos, size, crc)

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
        self.entry(bname, header_pos, size, crc)

    def entry(self, bname, offset, size, crc):
        """The record's central directory entry, packed now: a million records hold no tuple each."""
        big = size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF
        extra = struct.pack("<HHQQQ", 1, 24, size, size, offset) if big else b""
        sz = 0xFFFFFFFF if big else size
        self.directory += _CENTRAL(0x02014B50, 45 if big else 20, 45 if big else 20, 0, 0, 0, 0x21, crc, sz, sz,
                                   len(bname), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if big else offset)
        self.directory += bname
        self.directory += extra
        self.count += 1
        if len(self.directory) >= 1 << 20:
            self._deflated.append(self._deflate.compress(self.directory))
            self.directory = bytearray()

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
        deflated = self._deflated + [self._deflate.compress(self.directory), self._deflate.flush()]
        self._deflated, self.directory = [], bytearray()
        inflate = zlib.decompressobj()
        for piece in deflated:  # written a MiB at a time
            while piece:
                self._write(inflate.decompress(piece, 1 << 20))
                piece = inflate.unconsumed_tail
        cd_size = self.pos - cd_start
        n = self.count
        if n >= 0xFFFF or cd_start >= 0xFFFFFFFF or cd_size >= 0xFFFFFFFF:
            eocd64 = self.pos
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))
