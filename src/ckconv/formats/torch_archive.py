"""The torch.save archive: a zip of ``archive/data.pkl``, one ``archive/data/<key>`` record per storage and the
small records torch writes beside them (``.format_version``, ``.storage_alignment``, ``byteorder``, ``version``,
``.data/serialization_id``).

Format toolkit, not a plugin: a ``.pth`` file, every shard of a sharded torch folder and every item of a DCP
``.distcp`` file is such an archive, so the layout is written here once, and the pickle's storage references are
resolved against the archive's records here once.
"""

from __future__ import annotations

import os
import re

from .. import dtypes
from ..errors import CorruptCheckpoint
from ..model import Storage
from ..pickling.unpickler import StorageType, short_repr
from ..pickling.writer import PickleWriter
from ..storage.fastcopy import SourceFiles
from ..storage.zipio import ZipWriter

ZIP_MAGIC = b"PK\x03\x04"
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")


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
        if name not in records:
            raise CorruptCheckpoint(f"{where}: storage {key!r:.80} is referenced but missing from the archive")
        start, size, crc = records[name]
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


def write_archive(f, root, *, files, allow=(), where="the torch checkpoint", progress=None):
    """Append ``root`` as one torch.save archive at ``f``'s position, laid out record for record as torch.save
    lays it out. Storage bytes go file to file (``files``: a :class:`ckconv.storage.fastcopy.SourceFiles`), a zip
    source's CRC checked in the same pass that yields the output CRC; pickles name only globals the writing
    policy allows (``allow``: the user's additions; ``where`` names the output in a refusal)."""
    order: dict = {}

    def key_of(storage):
        return order.setdefault(id(storage), (str(len(order)), storage))[0]

    pickled = PickleWriter(key_of, allow=allow, where=where).dumps(root)
    out = _Relative(f)
    zw = ZipWriter(out)
    zw.add("archive/data.pkl", [pickled], len(pickled))
    zw.add("archive/.format_version", [b"1"], 1)
    zw.add("archive/.storage_alignment", [b"64"], 2)
    zw.add("archive/byteorder", [b"little"], 6)
    for key, storage in order.values():
        zw.add_copy(f"archive/data/{key}", storage.nbytes,
                    lambda fd, pos, st=storage: st.copy_to(fd, out.base + pos, want_crc=True, progress=progress,
                                                           files=files))
    zw.add("archive/version", [b"3\n"], 2)
    zw.add("archive/.data/serialization_id", [os.urandom(20).hex().encode()], 40)
    zw.close()


def write_zip(root, path, options=None):
    """``root`` as a torch.save file at ``path`` (``options``: a :class:`ckconv.formats.base.WriteOptions`)."""
    with open(path, "wb") as f, SourceFiles() as files:
        write_archive(f, root, files=files, allow=options.allow_globals if options else (),
                      progress=options.progress if options else None)
