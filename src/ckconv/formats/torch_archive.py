"""The torch.save archive: a zip of ``archive/data.pkl``, one ``archive/data/<key>`` record per storage and the
small records torch writes beside them (``.format_version``, ``.storage_alignment``, ``byteorder``, ``version``,
``.data/serialization_id``).

Format toolkit, not a plugin: a ``.pth`` file, every shard of a sharded torch folder and every item of a DCP
``.distcp`` file is such an archive, so the layout is written here once, and the pickle's storage references are
resolved against the archive's records here once.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib

from ..errors import CorruptCheckpoint, LimitExceeded
from ..model import Storage
from ..pickling.unpickler import StorageType, short_repr
from ..pickling.writer import PickleWriter
from ..storage.fastcopy import SourceFiles, write_at
from ..storage.zipio import ZipWriter
from ..storage.files import parse_json

ZIP_MAGIC = b"PK\x03\x04"
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$", re.IGNORECASE | re.ASCII)  # miniz finds it in any ASCII case
# The source's metadata (safetensors __metadata__, a hub index's metadata) in a .pth: a JSON object in a record
# torch.load never reads, so the file loads as before and ckconv finds the metadata again (issue 23).
METADATA_RECORD = ".data/ckconv_metadata.json"
MAX_METADATA = 100_000_000  # as a safetensors header


def read_metadata(records, prefix: str, where: str) -> dict:
    """The metadata record of an archive read with ``records`` (:class:`ckconv.storage.zipio.ZipRecords`), or {}."""
    name = prefix + METADATA_RECORD
    if name not in records.records:
        return {}
    if records.records[name][1] > MAX_METADATA:
        raise LimitExceeded(f"{where}: metadata record over {MAX_METADATA} bytes")
    meta = parse_json(records.read(name, limit=MAX_METADATA), 1, CorruptCheckpoint("nested metadata object"),
                      f"{where}: metadata record")
    if not isinstance(meta, dict) or not all(isinstance(v, (str, int, float)) for v in meta.values()):
        raise CorruptCheckpoint(f"{where}: metadata record {METADATA_RECORD} must map names to strings or numbers")
    return meta


def metadata_record(metadata) -> bytes | None:
    """The record's bytes for ``metadata`` (``user_metadata`` of a checkpoint), None when there is nothing to keep
    beyond safetensors' default ``format: pt``."""
    if not metadata or metadata == {"format": "pt"}:
        return None
    return json.dumps(metadata, ensure_ascii=False, indent=1).encode("utf-8")


def top_folder(names) -> str | None:
    """The archive's one top folder (``<stem>/``), or None when the records do not share exactly one."""
    tops = {n.split("/", 1)[0] for n in names}
    return next(iter(tops)) + "/" if len(tops) == 1 and all("/" in n for n in names) else None


def storage_loader(path, records: dict, prefix: str, where: str, label: str | None = None):
    """The unpickler's persistent-id resolver for a torch zip archive: ``('storage', type, key, location, numel)``
    -> a :class:`Storage` over record ``{prefix}data/{key}`` of ``path``, its size checked against ``numel``.
    Storages are labelled ``label``, or their key when None."""
    storages: dict = {}
    folder = prefix + "data/"
    path = str(path)

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise CorruptCheckpoint(f"{where}: malformed storage reference {short_repr(pid)}")
        _, stype, key, _location, numel = pid
        storage = storages.get(key)
        if storage is not None:
            return storage
        record = dict.get(records, folder + key)  # a name stored as spelt: no other spelling of it is (RecordTable)
        if record is None:
            name = folder + key
            if name not in records:  # or found only under another spelling: RecordTable refuses that
                raise CorruptCheckpoint(f"{where}: storage {key!r:.80} is referenced but missing from the archive")
            record = records[name]
        start, size, crc = record
        if numel * stype.itemsize != size:
            raise CorruptCheckpoint(
                f"{where}: storage {key:.80} declares {numel} x {stype.dtype} ({numel * stype.itemsize} bytes) "
                f"but its record holds {size} bytes; the file is corrupt")
        storage = storages[key] = Storage(key, stype.dtype, size, path=path, offset=start, crc=crc, label=label or key)
        return storage

    return load_storage


class _Relative:
    """A writable file seen from its current position: an archive appended to a file has offsets from 0."""

    def __init__(self, f):
        self.f = f
        self.base = f.tell()

    def write(self, data):
        return self.f.write(data)

    def tell(self):
        return self.f.tell() - self.base

    def seek(self, pos, whence=0):
        if whence != 0:
            raise ValueError("only absolute seeks")
        return self.f.seek(self.base + pos) - self.base

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()


def write_archive(f, root, *, files, allow=(), where="the torch checkpoint", progress=None, metadata=None):
    """Append ``root`` as one torch.save archive at ``f``'s position, laid out record for record as torch.save
    lays it out. Storage bytes go file to file (``files``: a :class:`ckconv.storage.fastcopy.SourceFiles`), a zip
    source's CRC checked in the same pass that yields the output CRC; pickles name only globals the writing
    policy allows (``allow``: the user's additions; ``where`` names the output in a refusal). ``metadata``: the
    source's metadata to keep (:data:`METADATA_RECORD`). The pickle streams into the archive as it is written;
    ``f`` is a staged file (:func:`ckconv.io.write`), which a refusal discards."""
    out = _Relative(f)
    zw = _ArchiveWriter(out)
    keys = _StorageKeys()

    def pickle(sink):
        nonlocal keys
        keys = _StorageKeys()  # numbered afresh if the pickle is written twice (over 4 GiB: see add_streamed)
        PickleWriter(keys, allow=allow, where=where, sink=sink).dumps(root)

    zw.add_streamed("archive/data.pkl", pickle)
    zw.add("archive/.format_version", [b"1"], 1)
    zw.add("archive/.storage_alignment", [b"64"], 2)
    zw.add("archive/byteorder", [b"little"], 6)
    for i, storage in enumerate(keys.order):
        key = f"archive/data/{i}"
        small = storage.read_small(files)
        if small is not None:  # bytes in hand: one buffered write, no system call of its own
            zw.add_bytes(key, small, zlib.crc32(small))
            if progress:
                progress(len(small))
            continue
        zw.add_copy(key, storage.nbytes,
                    lambda fd, pos, st=storage: st.copy_to(fd, out.base + pos, want_crc=True, progress=progress,
                                                           files=files))
    zw.add("archive/version", [b"3\n"], 2)
    zw.add("archive/.data/serialization_id", [os.urandom(20).hex().encode()], 40)
    record = metadata_record(metadata)
    if record is not None:
        zw.add("archive/" + METADATA_RECORD, [record], len(record))
    zw.close()


class _StorageKeys:
    """Storage -> its record key, "0", "1", ... in the order the pickle first names them, as torch.save numbers
    them. A storage costs one slot of ``order``, keyed by the storage itself (no id() int, no tuple); the key of
    one named a second time (tied weights) is found through ``index``, made the first time that happens."""

    def __init__(self):
        self.order: dict = {}  # storage (or its id(), for a class that defines equality) -> None, in key order
        self.index: dict | None = None  # the same keys -> position

    def __call__(self, storage) -> str:
        slot = storage if type(storage).__eq__ is object.__eq__ else id(storage)
        order = self.order
        n = len(order)
        order.setdefault(slot, None)
        if len(order) > n:
            if self.index is not None:
                self.index[slot] = n
            return str(n)
        if self.index is None:
            self.index = {s: i for i, s in enumerate(order)}
        return str(self.index[slot])


class _ArchiveWriter(ZipWriter):
    """The zip writer, plus records whose bytes are in hand: a million small storages written in sequence; and a
    record streamed in pieces of unknown total size (the pickle)."""

    def add_bytes(self, name: str, data, crc: int):
        """A record whose bytes and CRC-32 are known: header and bytes written in sequence, no seek back."""
        bname, extra, zip64 = self._layout(name, len(data))
        self.entry(bname, self.pos, len(data), crc)
        self._write(self._local_header(bname, extra, len(data), crc, zip64) + data)

    def add_streamed(self, name: str, write, size: int = 0):
        """A record that ``write(sink)`` produces, calling ``sink`` with each piece: the local header goes first
        with its sizes and CRC patched in afterwards. Its layout depends on whether the size needs zip64 (4 GiB or
        more): when the guess (``size``) was wrong, the record is written again over itself with the size known
        (``write`` must give the same bytes again)."""
        start = self.pos
        bname, extra, zip64 = self._layout(name, size)
        self._write(self._local_header(bname, extra, 0, 0, zip64))
        crc = total = 0

        def sink(data):
            nonlocal crc, total
            crc = zlib.crc32(data, crc)
            total += len(data)
            self._write(data)

        write(sink)
        end, self.pos = self.pos, start
        again = self._layout(name, total)[1] != extra
        if again:
            self._moved = True
            return self.add_streamed(name, write, total)
        self.pos = end
        self.f.seek(start + 14)
        self.f.write(struct.pack("<III", crc, 0xFFFFFFFF, 0xFFFFFFFF) if zip64 else
                     struct.pack("<III", crc, total, total))
        if zip64:
            self.f.seek(start + 30 + len(bname) + 4)
            self.f.write(struct.pack("<QQ", total, total))
        self._moved = True
        self.entry(bname, start, total, crc)


def write_zip(root, path, options=None, metadata=None):
    """``root`` as a torch.save file at ``path`` (``options``: a :class:`ckconv.formats.base.WriteOptions`;
    ``metadata``: the source's, kept in :data:`METADATA_RECORD`)."""
    with open(path, "wb", buffering=0) as raw, SourceFiles() as files:
        f = _PositionalWriter(raw.fileno())
        write_archive(f, root, files=files, allow=options.allow_globals if options else (),
                      progress=options.progress if options else None, metadata=metadata)
        f.flush()


class _PositionalWriter:
    """A file written from one buffer with ``pwrite`` (:func:`ckconv.storage.fastcopy.write_at`), a MiB at a time:
    a million small records cost a system call per MiB, and every byte reaches the file the one way the copies
    do, so a full disk fails the same way wherever it strikes."""

    def __init__(self, fd):
        self.fd, self.pos, self.pending, self.start = fd, 0, bytearray(), 0

    def write(self, data):
        if not self.pending:
            self.start = self.pos
        self.pending += data
        self.pos += len(data)
        if len(self.pending) >= 1 << 20:
            self.flush()
        return len(data)

    def flush(self):
        if self.pending:
            write_at(self.fd, self.pending, self.start)
            self.pending = bytearray()

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        if whence != 0:
            raise ValueError("only absolute seeks")
        self.flush()
        self.pos = pos
        return pos

    def fileno(self):
        return self.fd
