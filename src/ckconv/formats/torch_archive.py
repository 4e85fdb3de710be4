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
import zlib

from .. import dtypes
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

    def load_storage(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise CorruptCheckpoint(f"{where}: malformed storage reference {short_repr(pid)}")
        _, stype, key, _location, numel = pid
        if key in storages:
            return storages[key]
        name = prefix + "data/" + key
        record = dict.get(records, name)  # a name stored as spelt: no other spelling of it is (RecordTable)
        if record is None:
            if name not in records:  # or found only under another spelling: RecordTable refuses that
                raise CorruptCheckpoint(f"{where}: storage {key!r:.80} is referenced but missing from the archive")
            record = records[name]
        start, size, crc = record
        if numel * dtypes.itemsize(stype.dtype) != size:
            raise CorruptCheckpoint(
                f"{where}: storage {key:.80} declares {numel} x {stype.dtype} "
                f"({numel * dtypes.itemsize(stype.dtype)} bytes) "
                f"but its record holds {size} bytes; the file is corrupt")
        storages[key] = Storage(key, stype.dtype, size, path=str(path), offset=start, crc=crc,
                                label=label or key)
        return storages[key]

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
    source's metadata to keep (:data:`METADATA_RECORD`)."""
    order: dict = {}

    def key_of(storage):
        return order.setdefault(id(storage), (str(len(order)), storage))[0]

    pickled = PickleWriter(key_of, allow=allow, where=where).dumps(root)
    out = _Relative(f)
    zw = _ArchiveWriter(out)
    zw.add("archive/data.pkl", [pickled], len(pickled))
    zw.add("archive/.format_version", [b"1"], 1)
    zw.add("archive/.storage_alignment", [b"64"], 2)
    zw.add("archive/byteorder", [b"little"], 6)
    for key, storage in order.values():
        small = storage.read_small(files)
        if small is not None:  # bytes in hand: one buffered write, no system call of its own
            zw.add_bytes(f"archive/data/{key}", small, zlib.crc32(small))
            if progress:
                progress(len(small))
            continue
        zw.add_copy(f"archive/data/{key}", storage.nbytes,
                    lambda fd, pos, st=storage: st.copy_to(fd, out.base + pos, want_crc=True, progress=progress,
                                                           files=files))
    zw.add("archive/version", [b"3\n"], 2)
    zw.add("archive/.data/serialization_id", [os.urandom(20).hex().encode()], 40)
    record = metadata_record(metadata)
    if record is not None:
        zw.add("archive/" + METADATA_RECORD, [record], len(record))
    zw.close()


class _ArchiveWriter(ZipWriter):
    """The zip writer, plus records whose bytes are in hand: a million small storages written in sequence."""

    def add_bytes(self, name: str, data, crc: int):
        """A record whose bytes and CRC-32 are known: header and bytes written in sequence, no seek back."""
        bname, extra, zip64 = self._layout(name, len(data))
        self.entries.append((bname, self.pos, len(data), crc, zip64))
        self._write(self._local_header(bname, extra, len(data), crc, zip64) + data)


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
