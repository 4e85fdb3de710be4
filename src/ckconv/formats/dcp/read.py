"""Reading a DCP folder into a ckconv tree: every leaf from its stored item, nested as it was saved.

The nesting comes from ckconv's exact ``ckconv_structure`` record when ckconv wrote the folder, else from DCP's
own ``planner_data`` paths, replayed the way ``dcp_to_torch_save`` replays them and bounded against hostile paths.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from ... import tree, tree_keys
from ...errors import CorruptCheckpoint, LimitExceeded
from ...model import Checkpoint, TensorRef
from ...pickling import structure
from .chunked import DcpTensorStorage, Piece, read_archive
from .metadata import METADATA_NAME, STRUCTURE_ATTR, BytesEntry, DcpMetadata, load_metadata
from .optimizers import by_slot


def read_dcp(path) -> Checkpoint:
    folder = Path(path)
    if folder.name == METADATA_NAME and folder.is_file():
        folder = folder.parent
    meta = load_metadata(folder)
    values = {}
    names: list = []  # the globals of the bytes items' pickles
    shared: dict = {}  # identical chunk layouts (ties written by ckconv) share one storage
    for fqn, entry in meta.entries.items():
        if isinstance(entry, BytesEntry):
            file, off, length = meta.locations[(fqn, None)]
            values[fqn] = read_archive(file, off, length, f"{file} ({fqn})", names)
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
    info = {**meta.user_metadata, "dcp.version": meta.version, "dcp.entries": str(len(meta.entries)), "dcp.files": str(len(files))}
    if meta.save_id:
        info["dcp.save_id"] = meta.save_id
    return Checkpoint(root=root, format="dcp", path=str(folder), metadata=info, foreign=tree_keys.foreign_objects(root),
                      globals=names)


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
        if "$slots" in node:  # an optimizer written keyed by parameter name: numbered again (.optimizers)
            return by_slot(build(node.get("$node"), depth + 1), node["$slots"], where)
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

