"""Built-in format plugin: torch.distributed.checkpoint (DCP) folders, and conversion across ranks under torchrun.

A DCP checkpoint is a folder: ``.metadata`` (a pickle of ``torch.distributed.checkpoint.metadata.Metadata``) and
``__<rank>_<n>.distcp`` files. The state is flattened: every leaf has a dotted name (``model.fc.weight``,
``optim.param_groups.0.lr``); ``planner_data`` maps each name back to its path of keys and list indices. A tensor
is one or more chunks (a box of the full tensor, one per rank that held a shard); each chunk, and each non-tensor
leaf, is a ``torch.save`` archive stored at a byte range of a ``.distcp`` file (``storage_data``).

Reading never runs code and never loads tensor data: ``.metadata`` goes through ckconv's restricted unpickler,
where the DCP classes become inert records this module interprets (and ``pathlib``/``torch.serialization``
globals that DCP pickles are answered by builders that only build strings). Tensors are :class:`TensorRef` over a
:class:`DcpTensorStorage` that streams the chunk archives' bytes when a writer asks, assembling several chunks in
bounded blocks. Non-tensor leaves are small ``torch.save`` archives read with ckconv's own torch reader.

Writing produces what ``torch.distributed.checkpoint.save`` with the default ``FileSystemWriter`` produces
(``__<rank>_0.distcp`` per rank, one torch.save archive per leaf, ``.metadata``), streaming tensor bytes file to
file. DCP itself loses some structure (mapping keys become strings, OrderedDicts plain dicts, empty containers
vanish); ckconv keeps an exact description of the containers in an extra ``ckconv_structure`` attribute of the
Metadata object, which torch ignores and ckconv uses to give back exactly what was written.

Multi-rank conversion (:func:`save_distributed`): under ``torchrun`` every rank reads the source lazily and writes
only its share of the output, coordinating with ``torch.distributed`` object collectives over gloo.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import re
import stat
import struct
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

from .. import dtypes, errors, tree
from ..pickling import policy, structure
from ..errors import CkconvError, CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsupportedContent, WriteFailed
from ..hookspecs import hookimpl
from ..model import CHUNK, Checkpoint, Foreign, Storage, TensorRef, contiguous_strides
from ..pickling.unpickler import RestrictedUnpickler, unpickle
from .base import Format, WriteOptions
from ..storage.files import inside_folder, read_sized, regular_file
from .torch_pickle import storage_loader
from ..storage.zipio import ZipWriter, record_bytes

METADATA_NAME = ".metadata"
SUFFIX = ".distcp"
DCP_VERSION = "1.0.0"  # what torch's FileSystemWriter writes (CURRENT_DCP_VERSION)
STRUCTURE_ATTR = "ckconv_structure"
MAX_METADATA = int(os.environ.get("CKCONV_MAX_DCP_METADATA", 1 << 30))
MAX_ENTRIES = int(os.environ.get("CKCONV_MAX_TENSORS", 1_000_000))
MAX_BLOB_PICKLE = 1 << 31
MAX_CORNERS = 1 << 21  # chunk corners checked per tensor (chunks x 2**split dimensions): 8 dims of 8,000 chunks
DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")


def _prod(values):
    n = 1
    for v in values:
        n *= v
    return n


class DcpFormat(Format):
    name = "dcp"
    writes_pickles = True
    description = "torch.distributed.checkpoint folders (.metadata + __N_M.distcp shards)"
    extensions = ()

    def sniff(self, path: Path, head: bytes) -> bool:
        if not path.is_dir():
            return False
        meta = path / METADATA_NAME
        if not meta.is_file():
            return False
        with open(meta, "rb") as f:
            first = f.read(2)
        return len(first) == 2 and first[0] == 0x80

    def read(self, path: Path) -> Checkpoint:
        return read_dcp(path)

    def writes_directory(self, options: WriteOptions) -> bool:
        return True

    def folder_layout(self, options: WriteOptions):
        from ..storage.atomic import FolderLayout

        return FolderLayout(index=(METADATA_NAME,), earlier=earlier_output)

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        from ..pickling.writer import check_writable

        check_writable(checkpoint.root, options.allow_globals, "the DCP checkpoint")  # before any file
        plan = plan_write(checkpoint.root, world=1)
        locations = write_rank_file(path, 0, plan.blobs_for(0), options.progress, allow=options.allow_globals)
        write_metadata(path, plan, locations)


# =============================================================================================================
# Reading .metadata
# =============================================================================================================

_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


def _path_builder(*parts):
    if not all(isinstance(p, str) for p in parts):
        raise CorruptCheckpoint("malformed path record in DCP metadata")
    return os.path.join(*parts) if parts else ""


def _layout_builder(name):
    if not isinstance(name, str):
        raise CorruptCheckpoint("malformed layout record in DCP metadata")
    return name


class MetadataUnpickler(RestrictedUnpickler):
    """ckconv's restricted unpickler plus the two harmless globals DCP metadata names.

    ``StorageMeta.checkpoint_id`` is often a ``pathlib.PosixPath`` and ``TensorProperties`` pickles its layout
    through ``torch.serialization._get_layout``; both modules are on the dangerous list, so they are answered here
    by builders that only return strings. Everything else (the DCP dataclasses included) goes through the normal
    allowlist and becomes an inert :class:`~ckconv.model.Foreign` record.
    """

    def find_class(self, module, name):
        if isinstance(module, str) and isinstance(name, str):
            if (module == "pathlib" or module.startswith("pathlib.")) and name in _PATH_CLASSES:
                return _path_builder
            if module == "torch.serialization" and name == "_get_layout":
                return _layout_builder
            # torch reads .metadata with a plain pickle.load: any global beyond DCP's own records and benign
            # data would run when torch loads this checkpoint, wherever it hides (planner_data, storage_meta...).
            if not (module.startswith("torch.distributed.checkpoint.") and policy.valid_name(module, name)
                    or policy.verdict(module, name) == policy.SAFE):
                full = policy.dotted(module, name)
                if full not in self.dangerous:
                    self.dangerous.append(full)
        return super().find_class(module, name)


class TensorEntry:
    __slots__ = ("fqn", "dtype", "shape", "requires_grad", "chunks")

    def __init__(self, fqn, dtype, shape, requires_grad, chunks):
        self.fqn, self.dtype, self.shape, self.requires_grad, self.chunks = fqn, dtype, shape, requires_grad, chunks


class BytesEntry:
    __slots__ = ("fqn",)

    def __init__(self, fqn):
        self.fqn = fqn


class DcpMetadata:
    """What ``.metadata`` says, checked: entries in order, the nesting map, where every item's bytes are."""

    def __init__(self, entries, planner_data, locations, version, save_id, structure_text):
        self.entries = entries  # OrderedDict fqn -> TensorEntry | BytesEntry
        self.planner_data = planner_data  # fqn -> tuple path, or None (saved without flattening)
        self.locations = locations  # (fqn, offsets tuple or None) -> (relative path, offset, length)
        self.version = version
        self.save_id = save_id
        self.structure_text = structure_text


def _is_record(obj, qualname) -> bool:
    return isinstance(obj, Foreign) and obj.qualname == qualname and obj.module.startswith("torch.distributed")


def _state(obj, where, what) -> dict:
    state = obj.state
    if state is None:
        return {}
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
        state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CorruptCheckpoint(f"{where}: malformed {what} record")
    return state


def _ints(value, where, what):
    if isinstance(value, (tuple, list)) and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)
    raise CorruptCheckpoint(f"{where}: {what} {value!r:.80} is not a list of non-negative integers")


def load_metadata(folder: Path) -> DcpMetadata:
    mpath = folder / METADATA_NAME
    where = str(mpath)
    inside_folder(folder, mpath, where)
    size = regular_file(mpath, where)
    if size > MAX_METADATA:
        raise LimitExceeded(f"{where}: {size} bytes of metadata, over the limit of {MAX_METADATA} "
                            "(CKCONV_MAX_DCP_METADATA)")
    data = read_sized(mpath, size, where)
    obj, _ = unpickle(data, where=where, unpickler_class=MetadataUnpickler)  # opcode pre-scan, then restricted
    return interpret_metadata(obj, folder, where)


def interpret_metadata(obj, folder: Path, where: str) -> DcpMetadata:
    if not _is_record(obj, "Metadata"):
        raise NotACheckpoint(f"{where}: not a DCP metadata file (it holds {type(obj).__name__})")
    md = _state(obj, where, "Metadata")
    sdm = md.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise CorruptCheckpoint(f"{where}: state_dict_metadata is missing")
    if len(sdm) > MAX_ENTRIES:
        raise LimitExceeded(f"{where}: {len(sdm)} entries, over the limit of {MAX_ENTRIES} (CKCONV_MAX_TENSORS)")
    entries = OrderedDict()
    for fqn, item in sdm.items():
        if not isinstance(fqn, str):
            raise CorruptCheckpoint(f"{where}: entry name {fqn!r:.80} is not a string")
        if _is_record(item, "BytesStorageMetadata"):
            entries[fqn] = BytesEntry(fqn)
        elif _is_record(item, "TensorStorageMetadata"):
            entries[fqn] = _tensor_entry(fqn, _state(item, where, "TensorStorageMetadata"), where)
        else:
            raise CorruptCheckpoint(f"{where}: entry {fqn!r:.80} is neither tensor nor bytes metadata")

    planner = md.get("planner_data")
    if planner is not None and not isinstance(planner, dict):
        planner = None  # a custom planner's private data: nothing ckconv can use
    paths = None
    if planner is not None and any(k in entries for k in planner):
        paths = {}
        for fqn in entries:
            p = planner.get(fqn)
            if p is None:
                continue
            if (not isinstance(p, (tuple, list)) or not p or len(p) > tree.MAX_DEPTH
                    or not all(type(c) is str or (type(c) is int and 0 <= c < tree.MAX_NODES) for c in p)):
                raise CorruptCheckpoint(f"{where}: planner_data path of {fqn!r:.80} is malformed")
            paths[fqn] = tuple(p)

    storage = md.get("storage_data")
    if not isinstance(storage, dict):
        raise CorruptCheckpoint(f"{where}: storage_data is missing (not written by FileSystemWriter?)")
    locations = {}
    sizes: dict = {}
    checked: dict = {}  # relative name -> validated path
    for index, info in storage.items():
        if not _is_record(index, "MetadataIndex") or not _is_record(info, "_StorageInfo"):
            raise CorruptCheckpoint(f"{where}: storage_data maps {index!r:.60} to {info!r:.60}; expected "
                                    "MetadataIndex -> _StorageInfo")
        idx = _state(index, where, "MetadataIndex")
        fqn, offset = idx.get("fqn"), idx.get("offset")
        if not isinstance(fqn, str):
            raise CorruptCheckpoint(f"{where}: storage_data has an index without a name")
        key = (fqn, None if offset is None else _ints(offset, where, f"chunk offset of {fqn!r:.80}"))
        si = _state(info, where, "_StorageInfo")
        rel, off, length = si.get("relative_path"), si.get("offset"), si.get("length")
        transforms = si.get("transform_descriptors")
        if transforms:
            raise UnsupportedContent(f"{where}: {fqn!r:.80} is stored through stream transforms {transforms!r:.80} "
                                     "(compression or encryption extensions); ckconv reads DCP checkpoints written "
                                     "without _extensions")
        if type(off) is not int or type(length) is not int or off < 0 or length < 0:
            raise CorruptCheckpoint(f"{where}: storage of {fqn!r:.80} has an invalid offset or length")
        file = checked.get(rel) if isinstance(rel, str) else None
        if file is None:
            file = checked[rel] = _safe_file(folder, rel, where)
            sizes[file] = os.path.getsize(file)
        if off + length > sizes[file]:
            raise CorruptCheckpoint(f"{where}: {fqn!r:.80} is stored at bytes {off}..{off + length} of {rel}, "
                                    f"which has only {sizes[file]}; the checkpoint is truncated")
        locations[key] = (file, off, length)

    for fqn, entry in entries.items():
        keys = [(fqn, None)] if isinstance(entry, BytesEntry) else [(fqn, offs) for offs, _ in entry.chunks]
        for key in keys:
            if key not in locations:
                what = "value" if key[1] is None else f"chunk at {list(key[1])}"
                raise CorruptCheckpoint(f"{where}: the {what} of {fqn!r:.80} has no storage entry; "
                                        "a .distcp file or part of the metadata is missing")
    check_ranges(entries, locations, where)

    storage_meta = md.get("storage_meta")
    save_id = ""
    if _is_record(storage_meta, "StorageMeta"):
        sid = _state(storage_meta, where, "StorageMeta").get("save_id")
        save_id = sid if isinstance(sid, str) else ""
    version = md.get("version")
    text = md.get(STRUCTURE_ATTR)
    if text is not None and not isinstance(text, str):
        raise CorruptCheckpoint(f"{where}: {STRUCTURE_ATTR} must be a string")
    return DcpMetadata(entries, paths, locations, version if isinstance(version, str) else "", save_id, text)


def check_ranges(entries, locations, where):
    """No two stored items may share bytes of a file: a range read for many entries multiplies the work (the DCP
    twin of overlapping zip records). The one exception is a tie ckconv writes: the same tensor layout (dtype,
    shape, chunks) under several names, stored once, which reading turns back into one shared storage."""
    layout_of = {}
    ranges = []
    identity: dict = {}  # file name -> (device, inode): two names (links) of one file are one file
    for fqn, entry in entries.items():
        if isinstance(entry, BytesEntry):
            keys = [(fqn, None)]
        else:
            keys = [(fqn, offs) for offs, _ in entry.chunks]
            layout = (entry.dtype, entry.shape, tuple((o, s, locations[(fqn, o)]) for o, s in entry.chunks))
            layout_of.update((key, layout) for key in keys)
        for key in keys:
            file, off, length = locations[key]
            if file not in identity:
                st = os.stat(file)
                identity[file] = (st.st_dev, st.st_ino)
            if length:
                ranges.append((identity[file], off, off + length, key))
    ranges.sort(key=lambda r: r[:3])
    prev, reach = None, 0
    for r in ranges:
        if prev is not None and r[0] == prev[0]:
            if r[1:3] == prev[1:3] and r[3][1] == prev[3][1] and r[3][0] != prev[3][0] and r[3] in layout_of \
                    and layout_of[r[3]] == layout_of[prev[3]]:
                continue  # a tie: several names for one stored tensor
            if r[1] < reach:
                raise CorruptCheckpoint(f"{where}: {r[3][0]!r:.80} and {prev[3][0]!r:.80} are stored at overlapping "
                                        f"bytes of {locations[r[3]][0]} ({r[1]}..{r[2]} and {prev[1]}..{prev[2]}); "
                                        "the metadata was altered")
        else:
            reach = 0
        prev, reach = r, max(reach, r[2])


def _tensor_entry(fqn, st, where):
    props, size, chunks = st.get("properties"), st.get("size"), st.get("chunks")
    what = f"tensor {fqn!r:.80}"
    if not _is_record(props, "TensorProperties"):
        raise CorruptCheckpoint(f"{where}: {what} has no TensorProperties")
    p = props.state
    if isinstance(p, tuple) and len(p) >= 3 and not isinstance(p[0], dict):
        dtype, layout, requires_grad = p[0], p[1], p[2]
    else:
        pd = _state(props, where, "TensorProperties")
        dtype, layout, requires_grad = pd.get("dtype"), pd.get("layout"), pd.get("requires_grad", False)
    name = str(dtype) if isinstance(dtype, str) else None
    if name in dtypes.QUANTIZED:
        raise UnsupportedContent(f"{where}: {what} is quantized; quantized tensors are not supported")
    if name not in dtypes.DTYPES:
        raise CorruptCheckpoint(f"{where}: {what} has unknown dtype {dtype!r:.40}")
    layout_name = layout if isinstance(layout, str) else getattr(layout, "qualname", None)
    if layout is not None and layout_name not in ("torch.strided", "strided"):
        raise UnsupportedContent(f"{where}: {what} has layout {layout_name}; only dense (strided) tensors are "
                                 "supported")
    shape = _ints(size, where, f"shape of {what}")
    if not isinstance(chunks, list):
        raise CorruptCheckpoint(f"{where}: {what} has no chunk list")
    boxes = []
    for ch in chunks:
        if not _is_record(ch, "ChunkStorageMetadata"):
            raise CorruptCheckpoint(f"{where}: {what} has a malformed chunk record")
        cs = _state(ch, where, "ChunkStorageMetadata")
        offs = _ints(cs.get("offsets"), where, f"chunk offsets of {what}")
        sz = _ints(cs.get("sizes"), where, f"chunk sizes of {what}")
        if len(offs) != len(shape) or len(sz) != len(shape) or any(
                o + s > n for o, s, n in zip(offs, sz, shape)):
            raise CorruptCheckpoint(f"{where}: a chunk of {what} ({list(offs)} + {list(sz)}) lies outside its "
                                    f"shape {list(shape)}")
        boxes.append((offs, sz))
    check_tiling(boxes, shape, f"{where}: {what}")
    return TensorEntry(fqn, name, shape, bool(requires_grad), boxes)


def check_tiling(boxes, shape, what):
    """The chunks must cover the tensor exactly once: no gap, no overlap. O(chunks x 2**split dimensions).

    A box's indicator is a signed sum over its corners of "everything above and to the right of this point", and
    that representation is unique: the chunks tile the tensor exactly when, at every corner point, the chunks'
    signed corner counts add up to the tensor's own. Dimensions that no chunk splits drop out.
    """
    boxes = [b for b in boxes if _prod(b[1])]
    numel = _prod(shape)
    held = sum(_prod(sz) for _, sz in boxes)
    if held != numel:
        raise CorruptCheckpoint(f"{what}: its chunks hold {held} elements, the tensor has {numel}; chunks overlap "
                                "or are missing")
    if len(boxes) <= 1:
        return
    split = [d for d, n in enumerate(shape) if any(o[d] or s[d] != n for o, s in boxes)]
    if len(boxes) << len(split) > MAX_CORNERS:
        raise LimitExceeded(f"{what}: {len(boxes)} chunks splitting {len(split)} dimensions are too many to check "
                            f"(over {MAX_CORNERS} corners)")
    count: dict = {}

    def add(offs, sz, sign):
        for corner in itertools.product(*[((offs[d], 1), (offs[d] + sz[d], -1)) for d in split]):
            point = tuple(c for c, _ in corner)
            count[point] = count.get(point, 0) + sign * _prod(f for _, f in corner)

    for offs, sz in boxes:
        add(offs, sz, 1)
    add((0,) * len(shape), shape, -1)
    if any(count.values()):
        raise CorruptCheckpoint(f"{what}: two chunks overlap")


def _safe_file(folder: Path, rel, where) -> str:
    """A storage file named by the metadata, refused unless it is a plain relative path inside the folder."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise CorruptCheckpoint(f"{where}: storage file name {rel!r:.80} is invalid")
    parts = rel.split("/")
    if os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpoint(f"{where}: storage file {rel!r:.80} points outside the checkpoint folder; "
                                "refusing to read it")
    path = folder / rel
    if not os.path.lexists(path):
        raise CorruptCheckpoint(f"{where}: storage file {rel} is missing from the checkpoint folder")
    inside_folder(folder, path, f"{where}: storage file {rel!r:.80}")
    regular_file(path, f"{where}: storage file {rel!r:.80}")
    return str(path)


# =============================================================================================================
# torch.save archives inside a byte range of a .distcp file
# =============================================================================================================

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


def zip_records(path, start, length, where) -> dict:
    """Name -> (absolute data offset, size, crc) of the torch.save archive at [start, start + length) of ``path``.

    The same checks as :class:`ckconv.storage.zipio.ZipRecords`, on a window of a larger file.
    """
    records = {}
    with open(path, "rb") as f:
        win = _Window(f, start, length)
        if win.read(4) != b"PK\x03\x04":
            f.seek(0)
            head = f.read(9)
            if len(head) == 9 and head[8:9] == b"{":
                raise UnsupportedContent(
                    f"{where}: the .distcp files are safetensors (saved with serialization_format=SAFETENSORS); "
                    "ckconv reads DCP checkpoints saved with the default torch.save serialization")
            raise CorruptCheckpoint(f"{where}: the stored bytes are not a torch.save archive")
        win.seek(0)
        try:
            zf = zipfile.ZipFile(win)
            for info in zf.infolist():
                name = info.filename
                if name in records:
                    raise CorruptCheckpoint(f"{where}: duplicate zip record {name!r}; refusing an ambiguous archive")
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise CorruptCheckpoint(f"{where}: zip record {name!r} is compressed or declares inconsistent "
                                            "sizes; torch.save never writes that, so the file was altered")
                if info.flag_bits & 0x1:
                    raise UnsupportedContent(f"{where}: encrypted zip records are not supported")
                win.seek(info.header_offset)
                header = win.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    raise CorruptCheckpoint(f"{where}: zip record {name!r} has a broken local header")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                local_name = win.read(name_len)
                if local_name.decode("utf-8", "replace") != name:
                    raise CorruptCheckpoint(f"{where}: zip record {name!r} disagrees with its local header")
                data_start = info.header_offset + 30 + name_len + extra_len
                if data_start + info.file_size > length:
                    raise CorruptCheckpoint(f"{where}: zip record {name!r} runs past the end of its stored range")
                records[name] = (start + data_start, info.file_size, info.CRC)
        except zipfile.BadZipFile as exc:
            raise CorruptCheckpoint(f"{where}: broken torch.save archive ({exc})") from None
        except (EOFError, struct.error, ValueError) as exc:
            raise CorruptCheckpoint(f"{where}: broken torch.save archive ({exc})") from None
    return records


def read_torch_blob(path, start, length, where):
    """The object a torch.save archive at a byte range holds, read with ckconv's restricted unpickler."""
    records = zip_records(path, start, length, where)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in records):
        raise UnsupportedContent(f"{where}: holds a TorchScript archive; ckconv does not run TorchScript")
    roots = [m.group(1) for n in records if (m := DATA_PKL.match(n))]
    if len(roots) != 1:
        raise CorruptCheckpoint(f"{where}: torch.save archive without exactly one data.pkl")
    prefix = roots[0] + "/"
    if prefix + "byteorder" in records:
        if record_bytes(path, records[prefix + "byteorder"], f"{where}: record byteorder", 16).strip() != b"little":
            raise UnsupportedContent(f"{where}: big-endian data is not supported")
    load_storage = storage_loader(path, records, prefix, where, label=where)

    data = record_bytes(path, records[prefix + "data.pkl"], f"{where}: record data.pkl", MAX_BLOB_PICKLE)
    root, _ = unpickle(data, storage_loader=load_storage, where=where)
    return root


# =============================================================================================================
# Tensors made of chunks
# =============================================================================================================

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
            ref = read_torch_blob(self.path, self.start, self.length, self.where)
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
        super().__init__(fqn, dtype, _prod(shape) * dtypes.itemsize(dtype), label=fqn)
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
        inner = [_prod(shape[i + 1:]) * item for i in range(nd)]  # bytes per index step along each dimension
        d = next(i for i in range(nd) if inner[i] <= size)  # blocks run along dimension d
        k = max(1, size // inner[d])
        outer_bytes = shape[d] * inner[d]
        end = start + length
        pieces = [(p, contiguous_strides(p.sizes)) for p in self.pieces if _prod(p.sizes)]
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
                    count = (hi - lo) * _prod(p.sizes[d + 1:])
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


# =============================================================================================================
# read
# =============================================================================================================

def read_dcp(path) -> Checkpoint:
    folder = Path(path)
    if folder.name == METADATA_NAME and folder.is_file():
        folder = folder.parent
    meta = load_metadata(folder)
    values = {}
    shared: dict = {}  # identical chunk layouts (ties written by ckconv) share one storage
    for fqn, entry in meta.entries.items():
        if isinstance(entry, BytesEntry):
            file, off, length = meta.locations[(fqn, None)]
            values[fqn] = read_torch_blob(file, off, length, f"{file} ({fqn})")
            continue
        layout = (entry.dtype, entry.shape, tuple(
            (offs, sz, meta.locations[(fqn, offs)]) for offs, sz in entry.chunks))
        storage = shared.get(layout)
        if storage is None:
            pieces = [Piece(fqn, entry.dtype, offs, sz, *meta.locations[(fqn, offs)]) for offs, sz in entry.chunks]
            storage = shared[layout] = DcpTensorStorage(fqn, entry.dtype, entry.shape, pieces)
        values[fqn] = TensorRef(storage, entry.dtype, entry.shape)
    where = str(folder / METADATA_NAME)
    if meta.structure_text is not None:
        root = _rebuild(structure.loads(meta.structure_text, where), values, where)
    else:
        root = _unflatten(meta, values, where)
    tree.walk(root)
    files = {loc[0] for loc in meta.locations.values()}
    info = {"dcp.version": meta.version, "dcp.entries": str(len(meta.entries)), "dcp.files": str(len(files))}
    if meta.save_id:
        info["dcp.save_id"] = meta.save_id
    return Checkpoint(root=root, format="dcp", path=str(folder), metadata=info, foreign=tree.foreign_objects(root))


def _unflatten(meta: DcpMetadata, values, where):
    """DCP's own nesting: ``set_element`` along each ``planner_data`` path, in metadata order."""
    root: dict = {}
    room = tree.MAX_NODES  # containers and list slots the paths may create, all entries together
    for fqn in meta.entries:
        path = meta.planner_data.get(fqn) if meta.planner_data is not None else None
        if path is None:
            if fqn in root:
                raise CorruptCheckpoint(f"{where}: {fqn!r:.80} is stored twice")
            root[fqn] = values[fqn]
            continue
        room = _set_element(root, path, values[fqn], f"{where}: planner_data path of {fqn!r:.80}", room)
    return root


def _set_element(root, path, value, what, room):
    """DCP's ``set_element``; ``room`` is how many containers and list slots it may still create (checked before
    a list is extended: one entry's path could otherwise ask for millions of slots). Returns what is left."""

    def spend(n):
        nonlocal room
        room -= n
        if room < 0:
            raise LimitExceeded(f"{what} and the paths before it build more than {tree.MAX_NODES} containers "
                                "and list slots (CKCONV_MAX_NODES); the metadata is hostile")

    def grow(items, index):
        if index >= len(items):
            spend(index + 1 - len(items))
            items.extend([None] * (index + 1 - len(items)))

    cur = root
    for prev, key in zip(path, path[1:]):
        if isinstance(cur, dict):
            if type(prev) is not str:
                raise CorruptCheckpoint(f"{what} indexes a mapping with a number")
            if prev not in cur:
                spend(1)
                cur[prev] = {} if type(key) is str else []
            cur = cur[prev]
        else:
            if type(prev) is not int:
                raise CorruptCheckpoint(f"{what} indexes a list with a name")
            grow(cur, prev)
            if cur[prev] is None:
                spend(1)
                cur[prev] = {} if type(key) is str else []
            cur = cur[prev]
        if not isinstance(cur, (dict, list)):
            raise CorruptCheckpoint(f"{what} runs through a stored value")
    key = path[-1]
    if isinstance(cur, dict):
        if type(key) is not str or key in cur:
            raise CorruptCheckpoint(f"{what} collides with another entry")
        cur[key] = value
    else:
        if type(key) is not int:
            raise CorruptCheckpoint(f"{what} indexes a list with a name")
        grow(cur, key)
        if cur[key] is not None:
            raise CorruptCheckpoint(f"{what} collides with another entry")
        cur[key] = value
    return room


def _rebuild(skeleton, values, where):
    """Exact containers from the ``ckconv_structure`` record; leaves come from DCP's entries by name."""
    used: set = set()

    def bad(msg):
        return CorruptCheckpoint(f"{where}: invalid {STRUCTURE_ATTR} record ({msg})")

    def build(node, depth):
        if depth > tree.MAX_DEPTH:
            raise bad("nesting too deep")
        if type(node) is not dict:
            raise bad(f"unexpected {type(node).__name__}")
        if "$leaf" in node:
            fqn = node["$leaf"]
            if not isinstance(fqn, str) or fqn not in values or fqn in used:
                raise bad(f"leaf {fqn!r:.80} is unknown or used twice")
            used.add(fqn)
            value = values[fqn]
            if isinstance(value, TensorRef) and (node.get("param") or node.get("requires_grad")):
                value = TensorRef(value.storage, value.dtype, value.shape, value.stride, value.offset,
                                  bool(node.get("requires_grad")), bool(node.get("param")))
            return value
        if "$list" in node:
            items = node["$list"]
            if type(items) is not list:
                raise bad("$list must be a list")
            return [build(v, depth + 1) for v in items]
        tag = "$odict" if "$odict" in node else "$dict" if "$dict" in node else None
        if tag is None or type(node[tag]) is not list:
            raise bad("unknown node")
        out = OrderedDict() if tag == "$odict" else {}
        for pair in node[tag]:
            if type(pair) is not list or len(pair) != 2:
                raise bad("mapping items must be pairs")
            key = structure.decode(pair[0], {}, where)
            try:
                out[key] = build(pair[1], depth + 1)
            except TypeError:
                raise bad("unhashable key") from None
        if "$attrs" in node:
            attrs = structure.decode(node["$attrs"], {}, where)
            if tag != "$odict" or type(attrs) is not dict:
                raise bad("$attrs must be a mapping on an OrderedDict")
            out.__dict__.update(attrs)
        return out

    try:
        root = build(skeleton, 0)
    except RecursionError:
        raise bad("nesting too deep") from None
    if used != set(values):
        missing = sorted(set(values) - used)
        raise bad(f"{len(missing)} stored entries are not placed, e.g. {missing[0]!r:.80}")
    return root


# =============================================================================================================
# write
# =============================================================================================================

class Blob:
    """One stored item: a tensor (possibly under several names, when tied) or a non-tensor leaf."""

    __slots__ = ("index", "kind", "fqns", "value", "nbytes")

    def __init__(self, index, kind, fqns, value, nbytes):
        self.index, self.kind, self.fqns, self.value, self.nbytes = index, kind, fqns, value, nbytes


class WritePlan:
    def __init__(self, leaves, skeleton, blobs, owner):
        self.leaves = leaves  # [(fqn, path, value)] in DCP's flattening order
        self.skeleton = skeleton
        self.blobs = blobs
        self.owner = owner  # blob index -> rank

    def blobs_for(self, rank):
        return [b for b in self.blobs if self.owner[b.index] == rank]


def flatten(root):
    """DCP's ``flatten_state_dict`` on a ckconv tree: -> ([(fqn, path, leaf)], exact skeleton of the containers).

    Mappings are walked with ``str(key)``; a list is walked only when it holds a tensor or a walkable container
    (else it is one leaf); tuples and everything else are leaves -- exactly ``traverse_state_dict``.
    """
    if not isinstance(root, dict):
        raise UnsupportedContent(f"a DCP checkpoint holds a dict at the top level; this checkpoint's root is a "
                                 f"{type(root).__name__}: convert it to another format, or wrap it in a dict")
    tree.walk(root)
    leaves: list = []
    seen: dict = {}

    def terminal(v):
        if isinstance(v, dict):
            return False
        if not isinstance(v, list):
            return True
        for e in v:
            if isinstance(e, (dict, list)) and not terminal(e):
                return False
            if isinstance(e, TensorRef):
                return False
        return True

    def leaf(path, v):
        fqn = ".".join(map(str, path))
        if fqn in seen:
            raise UnsupportedContent(f"two entries are both named {fqn!r:.80} once flattened for DCP (keys "
                                     f"{seen[fqn]!r:.60} and {path!r:.60}); rename one")
        seen[fqn] = path
        leaves.append((fqn, path, v))
        node = {"$leaf": fqn}
        if isinstance(v, TensorRef):
            if v.parameter:
                node["param"] = True
            if v.requires_grad:
                node["requires_grad"] = True
        return node

    def visit(path, v):
        if isinstance(v, dict):
            items = [[_plain(k, "a key"), visit(path + (tree.key_text(k),), x)] for k, x in v.items()]
            node = {"$odict" if isinstance(v, OrderedDict) else "$dict": items}
            attrs = getattr(v, "__dict__", None) if isinstance(v, OrderedDict) else None
            if attrs:
                node["$attrs"] = _plain(dict(attrs), "OrderedDict attributes")
            return node
        if terminal(v):
            return leaf(path, v)
        return {"$list": [visit(path + (i,), x) for i, x in enumerate(v)]}

    skeleton = visit((), root)
    return leaves, skeleton


def _plain(value, what):
    encoded, named, _ = structure.encode(value)
    if named:
        raise UnsupportedContent(f"tensors inside {what} cannot be stored in a DCP checkpoint")
    return encoded


def plan_write(root, world=1) -> WritePlan:
    leaves, skeleton = flatten(root)
    blobs, by_view = [], {}
    for fqn, _, v in leaves:
        if isinstance(v, TensorRef):
            key = v.view_key()
            if key in by_view:
                by_view[key].fqns.append(fqn)
                continue
            by_view[key] = Blob(len(blobs), "tensor", [fqn], v, v.nbytes)
            blobs.append(by_view[key])
        else:
            blobs.append(Blob(len(blobs), "bytes", [fqn], v, 0))
    owner, load, n_bytes = {}, [0] * world, 0
    for b in blobs:  # as FileSystemWriter buckets: non-tensors round-robin, tensors largest first to least loaded
        if b.kind == "bytes":
            owner[b.index] = n_bytes % world
            n_bytes += 1
    for b in sorted((b for b in blobs if b.kind == "tensor"), key=lambda b: (-b.nbytes, b.index)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[b.index] = rank
        load[rank] += b.nbytes
    return WritePlan(leaves, skeleton, blobs, owner)


class _Relative:
    """A writable file seen from its current position: zip offsets inside a .distcp start at 0."""

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


class _Contiguous(Storage):
    """A tensor's bytes in C order as a storage of their own (a chunk archive holds exactly the tensor)."""

    def __init__(self, ref: TensorRef):
        super().__init__("0", ref.dtype, ref.nbytes, label=repr(ref))
        self.ref = ref
        self.verified = True

    def chunks(self, start=0, length=None, size=CHUNK):
        if length is None:
            length = self.nbytes - start
        ref = self.ref
        if start == 0 and length == self.nbytes:
            yield from ref.chunks()
        elif ref.is_contiguous:
            yield from ref.storage.chunks(ref.offset * dtypes.itemsize(ref.dtype) + start, length, size)
        else:
            yield gather_bytes(ref)[start:start + length]

    def copy_to(self, fd, dst_offset, start=0, length=None, *, want_crc=False, progress=None, files=None):
        if start == 0 and (length is None or length == self.nbytes):
            return self.ref.copy_to(fd, dst_offset, want_crc=want_crc, progress=progress, files=files)
        return super().copy_to(fd, dst_offset, start, length, want_crc=want_crc, progress=progress, files=files)


def gather_bytes(ref):
    return b"".join(bytes(c) for c in ref.chunks())


def write_blob(f, blob: Blob, progress, files, allow=()):
    """Append one torch.save archive (a tensor, contiguous, or a non-tensor leaf) at the file's position."""
    from ..pickling.writer import PickleWriter

    rel = _Relative(f)
    order: dict = {}
    if blob.kind == "tensor":
        ref = blob.value
        root = TensorRef(_Contiguous(ref), ref.dtype, ref.shape)
    else:
        root = blob.value

    def key_of(storage):
        return order.setdefault(id(storage), (str(len(order)), storage))[0]

    pickled = PickleWriter(key_of, allow=allow, where="the DCP checkpoint").dumps(root)
    zw = ZipWriter(rel)
    zw.add("archive/data.pkl", [pickled], len(pickled))
    zw.add("archive/.format_version", [b"1"], 1)
    zw.add("archive/.storage_alignment", [b"64"], 2)
    zw.add("archive/byteorder", [b"little"], 6)
    for key, storage in order.values():
        zw.add_copy(f"archive/data/{key}", storage.nbytes,
                    lambda fd, pos, st=storage: st.copy_to(fd, rel.base + pos, want_crc=True, progress=progress,
                                                           files=files))
    zw.add("archive/version", [b"3\n"], 2)
    zw.add("archive/.data/serialization_id", [os.urandom(20).hex().encode()], 40)
    zw.close()


def write_rank_file(folder, rank, blobs, progress=None, allow=()) -> dict:
    """Write ``__<rank>_0.distcp`` (non-tensors first, as torch does); -> blob index -> (name, offset, length)."""
    from ..storage.fastcopy import SourceFiles

    name = f"__{rank}_0{SUFFIX}"
    locations = {}
    ordered = [b for b in blobs if b.kind == "bytes"] + [b for b in blobs if b.kind == "tensor"]
    with open(Path(folder) / name, "wb") as f, SourceFiles() as files:
        for blob in ordered:
            start = f.tell()
            write_blob(f, blob, progress, files, allow)
            f.seek(0, 2)
            locations[blob.index] = (name, start, f.tell() - start)
        f.flush()
        os.fsync(f.fileno())
    return locations


def earlier_output(folder: Path) -> list:
    """The ``.distcp`` files an earlier DCP checkpoint's ``.metadata`` in ``folder`` names (read by ckconv's
    restricted reader; an unreadable or missing ``.metadata`` names none): what a new output there replaces."""
    try:
        if not stat.S_ISREG(os.stat(folder / METADATA_NAME).st_mode):
            return []
        meta = load_metadata(folder)
    except Exception:  # noqa: BLE001 - an earlier output ckconv cannot read names nothing to replace
        return []
    names = (Path(file) for file, _, _ in meta.locations.values())
    return sorted({p.name for p in names if p.parent == folder and re.fullmatch(r"__\d+_\d+\.distcp", p.name)})


def write_metadata(folder, plan: WritePlan, locations: dict):
    """``.metadata`` as torch's FileSystemWriter writes it, plus ckconv's exact structure record."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    blob_of = {fqn: b for b in plan.blobs for fqn in b.fqns}
    sdm, storage, planner = {}, {}, {}
    for fqn, path, value in plan.leaves:
        planner[fqn] = path
        rel, off, length = locations[blob_of[fqn].index]
        if isinstance(value, TensorRef):
            zeros, size = torch.Size([0] * len(value.shape)), torch.Size(value.shape)
            props = TensorProperties(dtype=dtypes.torch_dtype(value.dtype), requires_grad=bool(value.requires_grad))
            sdm[fqn] = TensorStorageMetadata(props, size, [ChunkStorageMetadata(offsets=zeros, sizes=size)])
            storage[MetadataIndex(fqn, zeros, 0)] = _StorageInfo(rel, off, length)
        else:
            sdm[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = _StorageInfo(rel, off, length)
    md = Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4())), version=DCP_VERSION)
    setattr(md, STRUCTURE_ATTR, structure.dumps(plan.skeleton))
    with open(Path(folder) / METADATA_NAME, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())


# =============================================================================================================
# Conversion across ranks (torchrun)
# =============================================================================================================

def world_from_env():
    """(rank, world size) when this process is one of several started by torchrun, else None."""
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return None  # RANK / WORLD_SIZE without a rendezvous address: not torchrun (or not usable)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ["RANK"])
    except (KeyError, ValueError):
        return None
    if world <= 1 or not 0 <= rank < world:
        return None
    return rank, world


class Group:
    """The process group ckconv converts with: object collectives only, over gloo (CPU; no tensors move).

    When no default group exists ckconv starts one from torchrun's environment and keeps it until the process
    exits: starting a second one in the same process would rendezvous again on torchrun's store, where keys left
    by the first make that unreliable. A caller's existing group is joined (a gloo subgroup is made if it runs
    another backend, e.g. NCCL).
    """

    def __init__(self):
        import atexit

        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
            atexit.register(_destroy_group)
        self.pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def bcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def gather(self, obj):
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.pg)
        return out


def _destroy_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _failure(exc, rank):
    name = type(exc).__name__ if isinstance(exc, CkconvError) else ""
    text = str(exc) if isinstance(exc, CkconvError) else f"{type(exc).__name__}: {exc}"
    return ("error", name, f"rank {rank}: {text}" if not text.startswith("rank ") else text)


def _raise(status):
    _, name, text = status
    cls = getattr(errors, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, CkconvError)):
        cls = WriteFailed
    raise cls(text)


def run_collective(group: Group, path: Path, *, directory: bool, force: bool, work, setup=None, finish=None,
                   protect=frozenset(), layout=None):
    """Rank 0 stages the output (ckconv.storage.atomic.staged: a folder output into a new or existing folder, replacing
    only ``layout``'s files, never a ``protect``-ed source file) and tells every rank the temporary path; every
    rank runs ``work(tmp)``; when all succeeded rank 0 runs ``finish(tmp, results)`` and moves the output into
    place. A failure on any rank fails every rank with the same message, and the destination is as it was.
    """
    from ..storage.atomic import staged

    if group.rank == 0:
        try:
            with staged(path, directory=directory, force=force, protect=protect, layout=layout) as tmp:
                if setup is not None:
                    setup(tmp)
                group.bcast(("ok", str(tmp)))
                outcomes = group.gather(_attempt(work, tmp, 0))
                for o in outcomes:
                    if o[0] != "ok":
                        _raise(o)
                if finish is not None:
                    finish(tmp, [o[1] for o in outcomes])
        except BaseException as exc:
            # Rank 0 broadcasts exactly once more: the first broadcast if it failed before announcing the
            # temporary path, else the final one; the other ranks are waiting for exactly that message.
            group.bcast(_failure(exc, 0))
            raise
        group.bcast(("ok", None))
        return
    status = group.bcast(None)
    if status[0] != "ok":
        _raise(status)
    group.gather(_attempt(work, Path(status[1]), group.rank))
    final = group.bcast(None)
    if final[0] != "ok":
        _raise(final)


def _attempt(work, tmp, rank):
    try:
        return ("ok", work(Path(tmp)))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails every rank with it
        return _failure(exc, rank)


def save_distributed(obj, path, *, format=None, max_shard_size=None, force=False, progress=None,
                     allow_globals=()) -> str:
    """``ckconv.save`` run by every rank of a torchrun job, each writing its share; returns the format name.

    * ``dcp``: each rank writes ``__<rank>_0.distcp`` holding its share of the items (non-tensors round-robin,
      tensors balanced by size) and rank 0 writes ``.metadata`` after gathering where everything went -- the
      layout of ``torch.distributed.checkpoint.save`` across ranks.
    * ``safetensors``: one file is laid out by every rank identically (same header); rank 0 creates it at full
      size, then each rank writes the bytes of a contiguous run of tensors at their offsets. Sharded output
      (``max_shard_size``): shard i is written by rank i mod world size, rank 0 writes the index last.
    * other formats: rank 0 writes the output alone (the other ranks wait).

    Every rank reads the source lazily, so each reads only the tensor bytes it writes. The output is
    byte-identical to the single-process result for safetensors, and holds the same content for torch (whose
    files carry a random serialization id) and dcp (one file per rank).
    """
    from ..io import as_checkpoint, output_target, parse_size

    ckpt = as_checkpoint(obj)
    shard = parse_size(max_shard_size)
    target = output_target(ckpt, path, format=format, max_shard_size=shard)  # same answer on every rank
    path, fmt, name = target.path, target.format, target.format.name
    stage = {"protect": target.protect, "layout": target.layout}
    options = WriteOptions(max_shard_size=shard, progress=progress, allow_globals=tuple(allow_globals))
    if getattr(fmt, "writes_pickles", False):  # every rank refuses the same globals before writing
        from ..pickling.writer import check_writable

        check_writable(ckpt.root, options.allow_globals, f"the {fmt.name} checkpoint")
    group = Group()
    if name == "dcp":
        plan = plan_write(ckpt.root, group.world)

        def finish(tmp, results):
            write_metadata(tmp, plan, {k: v for r in results for k, v in r.items()})

        run_collective(group, path, directory=True, force=force, finish=finish, **stage,
                       work=lambda tmp: write_rank_file(tmp, group.rank, plan.blobs_for(group.rank), progress,
                                                        allow=options.allow_globals))
    elif name == "safetensors":
        _safetensors_distributed(ckpt, path, options, force, group, stage)
    else:
        run_collective(group, path, directory=fmt.writes_directory(options), force=force, **stage,
                       work=lambda tmp: fmt.write(ckpt, tmp, options) if group.rank == 0 else None)
    return name


def _safetensors_distributed(ckpt, path, options, force, group, stage):
    # The same plan as SafetensorsFormat.write (tests check the outputs are byte-identical).
    from ..contents.layout import optimizer_namer
    from ..storage.fastcopy import SourceFiles
    from .safetensors_format import INDEX_NAME, RAW_DTYPES, SINGLE_NAME, _metadata, _write_json, header_bytes, plan_shards, write_file

    root = ckpt.root
    encoded, named, needs_structure = structure.encode(root, raw_dtypes=RAW_DTYPES, namer=optimizer_namer(root))
    text = structure.dumps(encoded) if needs_structure else None
    rank, world = group.rank, group.world
    if options.max_shard_size is None:
        header = header_bytes(named, _metadata(text))
        starts, pos = [], len(header)
        for _, ref in named:
            starts.append(pos)
            pos += ref.nbytes
        total = pos
        data = total - len(header)

        def setup(tmp):
            with open(tmp, "wb") as f:
                f.write(header)
                f.truncate(total)

        def work(tmp):  # a contiguous run of tensors, about total/world bytes per rank
            mine = [i for i, s in enumerate(starts)
                    if min(world - 1, (s - len(header)) * world // max(data, 1)) == rank]
            with open(tmp, "r+b", buffering=0) as f, SourceFiles() as files:
                for i in mine:
                    named[i][1].copy_to(f.fileno(), starts[i], progress=options.progress, files=files)
                os.fsync(f.fileno())

        run_collective(group, path, directory=False, force=force, setup=setup, work=work, **stage)
        return
    shards = plan_shards(named, options.max_shard_size)
    if len(shards) == 1:
        run_collective(group, path, directory=True, force=force, **stage, work=lambda tmp: write_file(
            tmp / SINGLE_NAME, named, _metadata(text), options.progress) if rank == 0 else None)
        return
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    def work_shards(tmp):
        for i, shard in enumerate(shards):
            if i % world == rank:
                write_file(tmp / names[i], shard, {"format": "pt"}, options.progress)
                with open(tmp / names[i], "rb+") as f:
                    os.fsync(f.fileno())

    def finish_index(tmp, _results):
        weight_map = {n: names[i] for i, shard in enumerate(shards) for n, _ in shard}
        index = {"metadata": {"total_size": sum(ref.nbytes for _, ref in named)}, "weight_map": weight_map}
        if text is not None:
            index["metadata"][structure.KEY] = text
        _write_json(tmp / INDEX_NAME, index)

    run_collective(group, path, directory=True, force=force, work=work_shards, finish=finish_index, **stage)


@hookimpl
def ckconv_register_formats(register):
    register(DcpFormat())
