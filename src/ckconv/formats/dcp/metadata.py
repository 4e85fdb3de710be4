"""DCP's ``.metadata``: read through ckconv's restricted unpickler, then interpreted and checked.

The DCP dataclasses arrive as inert :class:`~ckconv.model.Foreign` records; this module turns them into a
:class:`DcpMetadata` only after checking what a hostile file could abuse: storage files must lie inside the
folder, byte ranges must fit their files and never overlap, chunks must tile their tensor exactly once.
"""

from __future__ import annotations

import itertools
import os
import re
from math import prod
from collections import OrderedDict
from pathlib import Path

from ... import dtypes, tree
from ...errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsupportedContent
from ...model import Foreign
from ...pickling import policy
from ...pickling.unpickler import RestrictedUnpickler, refuse, unpickle
from ...storage.files import inside_folder, read_sized, regular_file
from ...storage.files import parse_json

METADATA_NAME = ".metadata"
RANK_METADATA = re.compile(r"__\d+\.metadata")  # a rank's own metadata (saved without collectives)
STRUCTURE_ATTR = "ckconv_structure"
METADATA_ATTR = "ckconv_metadata"  # the source's metadata (safetensors __metadata__, ...) as a JSON object text
MAX_METADATA = int(os.environ.get("CKCONV_MAX_DCP_METADATA", 1 << 30))
MAX_ENTRIES = int(os.environ.get("CKCONV_MAX_TENSORS", 1_000_000))
MAX_CORNERS = 1 << 21  # chunk corners checked per tensor (chunks x 2**split dimensions): 8 dims of 8,000 chunks


_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
# the modules that define them: pathlib up to Python 3.12, pathlib._local from 3.13 (pickles name the defining one)
_PATH_MODULES = {"pathlib", "pathlib._local"}


def _path_builder(*parts):
    if not all(isinstance(p, str) for p in parts):
        raise CorruptCheckpoint("malformed path record in DCP metadata")
    return os.path.join(*parts) if parts else ""


def _layout_builder(name):
    if not isinstance(name, str):
        raise CorruptCheckpoint("malformed layout record in DCP metadata")
    return name


def _builder_for(module, name):
    """The builder that answers one of the two non-DCP globals DCP metadata names (a path class from the module that
    defines it, torch's layout lookup), or None."""
    if module in _PATH_MODULES and name in _PATH_CLASSES:
        return _path_builder
    if (module, name) == ("torch.serialization", "_get_layout"):
        return _layout_builder
    return None


class MetadataUnpickler(RestrictedUnpickler):
    """ckconv's restricted unpickler plus the two harmless globals DCP metadata names.

    ``StorageMeta.checkpoint_id`` is often a ``pathlib.PosixPath`` and ``TensorProperties`` pickles its layout
    through ``torch.serialization._get_layout``; both modules are on the dangerous list, so they are answered here
    by builders that only return strings. Everything else (the DCP dataclasses included) goes through the normal
    allowlist and becomes an inert :class:`~ckconv.model.Foreign` record.
    """

    def find_class(self, module, name):
        if isinstance(module, str) and isinstance(name, str):
            builder = _builder_for(module, name)
            if builder is not None:
                return builder
            # torch reads .metadata with a plain pickle.load: any global beyond DCP's own records and benign
            # data would run when torch loads this checkpoint, wherever it hides (planner_data, storage_meta...).
            # Here by name; the roles the pickle gives each are checked after it is read (dangerous_roles).
            if not (_dcp_record(module, name) or policy.verdict(module, name) == policy.SAFE):
                full = policy.dotted(module, name)
                if full not in self.dangerous:
                    self.dangerous.append(full)
        return super().find_class(module, name)


# the records torch.distributed.checkpoint pickles in .metadata, by exact name: a name DCP does not define makes
# torch's pickle.load fail, and DCP then reads a rank's __0.metadata instead (a second reading of the folder)
DCP_RECORDS = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})


def _dcp_record(module, name) -> bool:
    """One of the classes DCP pickles in its metadata (a record of data)."""
    return (module, name) in DCP_RECORDS


DCP_CALLED = frozenset({("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")})  # an enum, by value


def dangerous_roles(up_globals) -> list:
    """The globals of a ``.metadata`` pickle used in a role that runs code under ``pickle.load``: a DCP name other
    than instantiated or referenced (``FileSystem.mkdir(None, path)``, ``save_state_dict`` called), any other name
    in a role ckconv does not know it in (``numpy.ndarray.tofile`` called). The builders' names are answered here."""
    bad = []
    for module, name, role in up_globals:
        if _builder_for(module, name) is not None or (module, name) in DCP_CALLED:
            continue
        if _dcp_record(module, name):
            ok = not role & ~(policy.R | policy.I)
        else:
            ok = policy.verdict(module, name, roles=role) == policy.SAFE
        if not ok:
            bad.append(policy.dotted(module, name))
    return bad


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

    def __init__(self, entries, planner_data, locations, version, save_id, structure_text, user_metadata=None):
        self.entries = entries  # OrderedDict fqn -> TensorEntry | BytesEntry
        self.planner_data = planner_data  # fqn -> tuple path, or None (saved without flattening)
        self.locations = locations  # (fqn, offsets tuple or None) -> (relative path, offset, length)
        self.version = version
        self.save_id = save_id
        self.structure_text = structure_text
        self.user_metadata = user_metadata or {}  # what METADATA_ATTR carried


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
    rank_files = sorted(e.name for e in os.scandir(folder) if RANK_METADATA.fullmatch(e.name))
    if rank_files:
        raise CorruptCheckpoint(f"{where}: the folder also holds {rank_files[0]}, which torch.distributed.checkpoint "
                                "reads instead when .metadata fails to load: two readings of one folder, so ckconv "
                                "refuses it (keep the metadata file of the save you mean)")
    data = read_sized(mpath, size, where)
    obj, up = unpickle(data, where=where, unpickler_class=MetadataUnpickler)  # opcode pre-scan, then restricted
    bad = dangerous_roles(up.globals)
    if bad:
        raise refuse(where, bad)
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
    entries = _entries(sdm, where)
    paths = _planner_paths(md.get("planner_data"), entries, where)
    locations = _locations(md.get("storage_data"), folder, where)
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
    return DcpMetadata(entries, paths, locations, version if isinstance(version, str) else "", save_id, text,
                       _user_metadata(md.get(METADATA_ATTR), where))


def _entries(sdm, where) -> OrderedDict:
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
    return entries


def _planner_paths(planner, entries, where):
    """fqn -> nesting path from planner_data, or None when it is absent or a custom planner's private data."""
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
    return paths


def _locations(storage, folder, where) -> dict:
    """(fqn, chunk offsets or None) -> (file, offset, length), each range checked against its file's size."""
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
    return locations


def _user_metadata(text, where) -> dict:
    if text is None:
        return {}
    bad = CorruptCheckpoint(f"{where}: {METADATA_ATTR} must be a JSON object of names to strings or numbers")
    if not isinstance(text, str):
        raise bad
    meta = parse_json(text.encode("utf-8", "surrogatepass"), 1, bad, f"{where}: {METADATA_ATTR}")
    if not isinstance(meta, dict) or not all(isinstance(v, (str, int, float)) for v in meta.values()):
        raise bad
    return meta


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
    boxes = [b for b in boxes if prod(b[1])]
    numel = prod(shape)
    held = sum(prod(sz) for _, sz in boxes)
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
            count[point] = count.get(point, 0) + sign * prod(f for _, f in corner)

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

