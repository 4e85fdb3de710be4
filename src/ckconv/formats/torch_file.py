"""Reading torch.save files: the zip format (torch >= 1.6), the legacy pre-1.6 format and plain pickles.

Format toolkit, not a plugin: the ``torch`` format reads whole files with it and ``torch-sharded`` reads every
shard with it, so both get the same checks. The format is decided by magic bytes. Tensors are described from the
pickle (dtype, shape, stride, storage) and their bytes stay in the file until written elsewhere or materialised;
nothing named in the pickle is ever called.
"""

from __future__ import annotations

import os
import struct
import tarfile
from pathlib import Path

from .. import dtypes, tensor_kinds, tree, tree_keys
from ..errors import CkconvError, CorruptCheckpoint, NotACheckpoint, UnsupportedContent
from ..model import Checkpoint, Foreign, Storage, TensorRef
from ..pickling.unpickler import PARAMETER, StorageType, short_repr, unpickle
from ..storage.zipio import ZipRecords, directory_names
from .base import guarded
from .torch_archive import DATA_PKL, ZIP_MAGIC, read_metadata, storage_loader

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def sniff(path: Path, head: bytes) -> bool:
    """True when ``path`` is a torch.save file by its bytes (``head``: its first bytes)."""
    if path.is_dir():
        return False
    if head.startswith(ZIP_MAGIC):  # torch's own test: the first four bytes, wherever else a zip may end
        try:
            names = directory_names(path)
        except CkconvError:  # an ambiguous directory: read() says precisely what is wrong
            return True
        return not names or any(DATA_PKL.match(n) or n.endswith("/constants.pkl") for n in names)
    if _is_tar(head):
        return True  # legacy .tar checkpoints: read() names them
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return False  # a safetensors header whose length happens to start with b"\x80\x02"
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read(path: Path, allow_dangerous=False) -> Checkpoint:
    """The checkpoint a torch.save file holds. ``allow_dangerous``: globals that would run code when torch loads
    the file are recorded (``Checkpoint.dangerous``) as inert records instead of refused, for a report."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGIC):
        return guarded(read_zip, path, allow_dangerous=allow_dangerous)
    if _is_tar(head) or _torch_opens_as_tar(path):
        raise UnsupportedContent(f"{path}: legacy .tar checkpoint (torch < 0.4) is not supported: "
                                 "load it with an old torch you trust and re-save it with torch.save")
    return guarded(read_legacy, path, allow_dangerous=allow_dangerous)


def _torch_opens_as_tar(path) -> bool:
    """torch.load tries ``tarfile`` on every non-zip file before reading pickles: a pickle stream whose first
    block also parses as a tar header (a polyglot) is read by torch as a tar checkpoint, by others as pickles."""
    try:
        with tarfile.open(path, mode="r:", format=tarfile.PAX_FORMAT):
            return True
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


INTERNALS = (StorageType, Storage)  # builders left as values are references to their globals
_FINISH_KINDS = (Foreign, *INTERNALS, type(PARAMETER))


def _finish(root, up, fmt, path) -> Checkpoint:
    foreign = []
    keys: list = []  # dict keys other than str and int: records there too (tree_keys)

    def visit(p, node):
        if isinstance(node, Foreign):
            foreign.append((tree.format_path(p), node.class_name))
        elif isinstance(node, dict):
            tree_keys.odd_keys(p, node, keys)
        elif isinstance(node, INTERNALS) or node is PARAMETER:
            raise CorruptCheckpoint(f"{path}: the pickle leaves {short_repr(node)} at {tree.format_path(p)} where a "
                                    "value belongs; the file is malformed")

    count = tree.walk(root, visit, kinds=_FINISH_KINDS + (dict,))  # no call per tensor: only the nodes visit looks at
    foreign += tree_keys.foreign_in_keys(keys, count)
    return Checkpoint(root=root, format=fmt, path=str(path), foreign=foreign, dangerous=list(up.dangerous),
                      globals=list(up.globals))


def _refuse_torchscript(path, names):
    if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
        raise UnsupportedContent(f"{path}: this is a TorchScript archive, not a checkpoint; ckconv does not run "
                                 "TorchScript: load it with torch.jit.load if you trust it and save its state_dict()")


def read_zip(path, allow_dangerous=False) -> Checkpoint:
    records = ZipRecords(path, check_names=lambda names: _refuse_torchscript(path, names))
    names = list(records.records)
    roots = [m.group(1) for n in names if (m := DATA_PKL.match(n))]
    if len(roots) != 1:
        raise NotACheckpoint(f"{path}: not a readable checkpoint (zip archive without exactly one data.pkl)")
    prefix = roots[0] + "/"
    byteorder = records.read(prefix + "byteorder", limit=16) if prefix + "byteorder" in records.records else b"little"
    if byteorder.strip() != b"little":
        raise UnsupportedContent(f"{path}: big-endian checkpoints are not supported: re-save on a little-endian machine")
    load_storage = storage_loader(path, records.records, prefix, str(path))
    data = records.read(prefix + "data.pkl")
    root, up = unpickle(data, storage_loader=load_storage, where=str(path), allow_dangerous=allow_dangerous)
    ckpt = _finish(root, up, "torch", path)
    ckpt.metadata = read_metadata(records, prefix, str(path))
    return ckpt



def read_legacy(path, allow_dangerous=False) -> Checkpoint:
    where = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first, up = unpickle(f, where=where, allow_dangerous=allow_dangerous)
        # Anything but the exact magic int is a plain pickle; the comparison never touches a hostile object.
        if not (type(first) is int and first == LEGACY_MAGIC):
            # A plain pickle (protocol 2-5): the object itself.
            if f.read(1):
                raise CorruptCheckpoint(f"{path}: trailing bytes after the pickle; the file was altered")
            return _finish(first, up, "torch", path)
        aux = list(up.globals)  # torch.load runs all five pickles of a legacy file: every one's globals count
        protocol, up = unpickle(f, where=where)
        aux += up.globals
        if not (type(protocol) is int and protocol == LEGACY_PROTOCOL):
            raise UnsupportedContent(f"{path}: legacy checkpoint protocol {short_repr(protocol)} is not supported")
        sys_info, up = unpickle(f, where=where)
        aux += up.globals
        if type(sys_info) is dict and sys_info.get("little_endian", True) is False:
            raise UnsupportedContent(f"{path}: big-endian checkpoints are not supported: re-save on a little-endian machine")
        storages: dict = {}
        declared: dict = {}

        def load_storage(pid):
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                    and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                    and type(pid[4]) is int and pid[4] >= 0):
                raise CorruptCheckpoint(f"{path}: malformed storage reference {short_repr(pid)}")
            _, stype, key, _location, numel, view = pid
            if view is not None:
                raise UnsupportedContent(f"{path}: storage views from torch < 0.4 are not supported")
            if key not in storages:
                storages[key] = Storage(key, stype.dtype, -1, path=str(path), label=key)
                declared[key] = numel
            return storages[key]

        root, up = unpickle(f, storage_loader=load_storage, where=where, allow_dangerous=allow_dangerous)
        keys, keys_up = unpickle(f, where=where)
        aux += keys_up.globals
        if (type(keys) is not list or not all(type(k) is str for k in keys) or set(keys) != set(storages)
                or len(keys) != len(set(keys))):
            raise CorruptCheckpoint(f"{path}: legacy storage table does not match the tensors it should hold")
        pos = f.tell()
        for key in keys:
            f.seek(pos)
            raw = f.read(8)
            if len(raw) != 8:
                raise CorruptCheckpoint(f"{path}: truncated before the data of storage {key}")
            numel = struct.unpack("<q", raw)[0]
            st = storages[key]
            nbytes = numel * dtypes.itemsize(st.dtype)
            if numel < 0 or pos + 8 + nbytes > size:
                raise CorruptCheckpoint(f"{path}: storage {key:.80} declares {numel} elements past the end of the file")
            if numel != declared[key]:
                raise CorruptCheckpoint(f"{path}: storage {key:.80} declares {declared[key]} elements in the pickle "
                                        f"but {numel} in the data; the file is corrupt")
            st.offset, st.nbytes = pos + 8, nbytes
            pos += 8 + nbytes
        if pos != size:  # torch stops reading here; a zip reader would find an archive appended to the file
            raise CorruptCheckpoint(f"{path}: {size - pos} bytes after the last storage, which torch.save never writes "
                                    "and other readers could take for a second file; refusing an ambiguous file "
                                    "(re-save the original with torch.save)")
        found = tree.instances(root, (TensorRef, tensor_kinds.SparseTensor))
        for ref in (view for n in found for view in tensor_kinds.views(n)):
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
            if ref.numel and (last + 1) * dtypes.itemsize(ref.dtype) > ref.storage.nbytes:
                raise CorruptCheckpoint(f"{path}: a tensor view reaches past the end of its storage")
    ckpt = _finish(root, up, "torch", path)
    ckpt.globals = aux + ckpt.globals
    return ckpt
