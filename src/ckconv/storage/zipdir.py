"""The central directory of a zip archive, found and parsed as miniz finds it; one parse per file.

:func:`directory` finds the directory where the end record (or the zip64 end record) declares it and requires it
to fill exactly the bytes between there and the end records (see :mod:`ckconv.storage.zipio` for why). Detection
(:func:`directory_names`, every zip plugin's sniff) and reading (:class:`ckconv.storage.zipio.ZipRecords`) share
one parse: the last file parsed is kept, keyed by its device, inode, size and modification time, until the reader
takes it. A 100k-record archive's directory is 8 MB: parsed three times it cost more than the pickle's read.
"""

from __future__ import annotations

import os
import struct
import zipfile

from ..errors import CkconvError, CorruptCheckpoint

LOCAL, CENTRAL, END, END64, LOCATOR64, DESCRIPTOR = (
    0x04034B50, 0x02014B50, 0x06054B50, 0x06064B50, 0x07064B50, 0x08074B50)
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_END = struct.Struct("<IHHHHIIH")  # 22 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_LOCATOR64 = struct.Struct("<IIQI")  # 20 bytes
FLAG_ENCRYPTED, FLAG_DEFLATE_OPTIONS, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x6, 0x8, 0x800
SATURATED = 0xFFFFFFFF
AMBIGUOUS = ("torch and other zip readers could read it differently, so ckconv refuses it "
             "(re-save the original with torch.save)")


class _Entry:  # one central directory entry
    __slots__ = ("name", "raw", "version", "flags", "method", "crc", "size", "csize", "offset")


class _Broken(Exception):
    """The bytes do not parse as a zip archive at all."""


_last: dict = {}  # (device, inode, size, mtime) -> (entries, directory offset): the last archive parsed


def _stamp(f):
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def directory_names(path) -> list:
    """The record names of the zip archive ``path`` as its central directory lists them (no other check), or []
    when it does not parse at all. The parse is kept for the reader (:func:`directory`)."""
    with open(path, "rb") as f:
        stamp = _stamp(f)
        if stamp not in _last:
            try:
                parsed = _directory(f, stamp[2], str(path))
            except _Broken:
                return []
            _last.clear()
            _last[stamp] = parsed
        return [e.name for e in _last[stamp][0]]


def sniffed_names(path) -> list:
    """The record names a format's sniff looks at: :func:`directory_names`' (its parse kept for the reader), or,
    for an archive that reading would refuse, Python ``zipfile``'s, so the plugin that recognises it can say what is
    wrong. Raises what ``zipfile`` raises for a file that is no zip at all."""
    try:
        names = directory_names(path)
    except CkconvError:
        names = []
    if names:
        return names
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def directory(f, size, where):
    """(entries, offset) of the central directory of the open archive ``f``: the parse :func:`directory_names`
    kept for the same file (taken: memory stays flat), or a new one. ``f`` without a descriptor (a window of a
    larger file) is always parsed."""
    fileno = getattr(f, "fileno", None)
    if fileno is not None and _last:
        try:
            stamp = _stamp(f)
        except (OSError, ValueError):
            stamp = None
        if stamp is not None and stamp[2] == size and stamp in _last:
            return _last.pop(stamp)
    return _directory(f, size, where)


def _directory(f, size, where):
    """The central directory entries and its offset, found where the end record (or the zip64 end record)
    declares, as miniz finds it; it must fill exactly the bytes between there and the end records."""
    if size < 22:
        raise _Broken("too short for a zip archive")
    f.seek(size - 22)
    sig, disk, cd_disk, n_disk, n, cd_size, cd_offset, comment = _END.unpack(f.read(22))
    if sig != END:
        f.seek(max(0, size - 22 - 0xFFFF))
        found = f.read().rfind(END.to_bytes(4, "little"))
        if found < 0:
            raise _Broken("no end of central directory record")
        raise CorruptCheckpoint(f"{where}: bytes after the zip end record (appended data or an archive comment); "
                                f"{AMBIGUOUS}")
    if comment:
        raise CorruptCheckpoint(f"{where}: the zip end record carries a {comment}-byte comment; {AMBIGUOUS}")
    end_start = size - 22
    if size >= 22 + 20 + 56:
        f.seek(size - 42)
        lsig, l_disk, z64_offset, disks = _LOCATOR64.unpack(f.read(20))
        if lsig == LOCATOR64:
            end_start = size - 42 - 56
            f.seek(end_start)
            z = _END64.unpack(f.read(56))
            if (z64_offset != end_start or z[0] != END64 or z[1] != 44 or (l_disk, disks) != (0, 1)
                    or (z[4], z[5]) != (0, 0) or z[6] != z[7]):
                raise CorruptCheckpoint(f"{where}: the zip64 end records do not agree on where they are; {AMBIGUOUS}")
            wide = (z[7], z[8], z[9])
            for short, value, top in ((n, wide[0], 0xFFFF), (n_disk, wide[0], 0xFFFF), (cd_size, wide[1], SATURATED),
                                      (cd_offset, wide[2], SATURATED)):
                if short not in (value, top):
                    raise CorruptCheckpoint(f"{where}: the zip end record and the zip64 end record disagree; "
                                            f"{AMBIGUOUS}")
            n, n_disk, cd_size, cd_offset = wide[0], wide[0], wide[1], wide[2]
    if (disk, cd_disk) != (0, 0) or n_disk != n:
        raise _Broken("multi-disk archives are not supported")
    if cd_offset + cd_size > end_start:
        raise _Broken("the central directory lies past the end of the file")
    if cd_offset + cd_size != end_start:
        raise CorruptCheckpoint(f"{where}: {end_start - cd_offset - cd_size} bytes between the central directory "
                                f"at its declared offset and the end record; {AMBIGUOUS}")
    if n * 46 > cd_size:
        raise _Broken(f"{n} entries do not fit a central directory of {cd_size} bytes")
    f.seek(cd_offset)
    return _entries(f.read(cd_size), n, where), cd_offset


def _entries(cd: bytes, n: int, where) -> list:
    entries = []
    append = entries.append
    unpack = _CENTRAL.unpack_from
    end = len(cd)
    pos = 0
    for _ in range(n):
        if pos + 46 > end:
            raise _Broken("the central directory is truncated")
        (sig, _, version, flags, method, _, _, crc, csize, size, name_len, extra_len, comment_len, disk, _, _,
         offset) = unpack(cd, pos)
        if sig != CENTRAL:
            raise _Broken("broken central directory entry")
        start = pos + 46
        pos = start + name_len + extra_len + comment_len
        raw = cd[start:start + name_len]
        # torch.save's entries have no extra field: no parse (an empty block has no fields)
        extra = _fields(cd[start + name_len:start + name_len + extra_len], extra_len) if extra_len else _NO_FIELDS
        if pos > end or extra is None or disk != 0:
            raise _Broken("broken central directory entry")
        if comment_len:
            raise CorruptCheckpoint(f"{where}: zip record {raw!r:.80} carries a comment; {AMBIGUOUS}")
        e = _Entry()
        try:
            e.name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpoint(f"{where}: zip record name {raw!r:.80} is not UTF-8; {AMBIGUOUS}") from None
        e.raw, e.version, e.flags, e.method, e.crc = raw, version, flags, method, crc
        if size == SATURATED or csize == SATURATED or offset == SATURATED:
            e.size, e.csize, e.offset = _wide(extra, (size, csize, offset), where, e.name)
        else:
            e.size, e.csize, e.offset = size, csize, offset
        append(e)
    if pos != end:
        raise CorruptCheckpoint(f"{where}: the central directory holds {len(cd) - pos} bytes past its {n} declared "
                                f"entries; {AMBIGUOUS}")
    return entries


_NO_FIELDS: dict = {}  # the fields of an empty extra block (never modified)


def _fields(extra: bytes, length: int):
    """{field id: data} of a zip extra block, or None when it is truncated, malformed or repeats a field."""
    if len(extra) != length:
        return None
    fields, pos = {}, 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            return None
        fid, flen = struct.unpack_from("<HH", extra, pos)
        if fid in fields or pos + 4 + flen > len(extra):
            return None
        fields[fid] = extra[pos + 4:pos + 4 + flen]
        pos += 4 + flen
    return fields


def _wide(extra: dict, values, where, name):
    """The (size, compressed size, offset) of an entry: each saturated 32-bit value taken, in order, from the
    zip64 extra field, as miniz and zipfile both read it."""
    z64 = extra.get(1, b"")
    out, pos = [], 0
    for value in values:
        if value == SATURATED:
            if pos + 8 > len(z64):
                raise _Broken(f"zip record {name!r:.80} lacks its zip64 sizes")
            value = int.from_bytes(z64[pos:pos + 8], "little")
            pos += 8
        out.append(value)
    return out


