"""Writing a DCP folder as ``torch.distributed.checkpoint.save`` with the default ``FileSystemWriter`` does.

:func:`plan_write` flattens the tree as DCP does and shares the items out between ranks (one rank when a single
process writes); each rank writes ``__<rank>_0.distcp`` with :func:`write_rank_file`, streaming tensor bytes
file to file, and :func:`write_metadata` writes ``.metadata`` once every rank has said where its items went.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import uuid
from collections import OrderedDict
from pathlib import Path

from ... import dtypes, tensor_kinds, tree
from ...errors import UnsupportedContent
from ...model import CHUNK, Storage, TensorRef
from ...pickling import structure
from ...storage.fastcopy import SourceFiles
from ..torch_archive import write_archive
from .metadata import METADATA_ATTR, METADATA_NAME, STRUCTURE_ATTR, load_metadata
from .optimizers import name_slots

SUFFIX = ".distcp"
DCP_VERSION = "1.0.0"  # what torch's FileSystemWriter writes (CURRENT_DCP_VERSION)


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


def flatten(root, slots=None):
    """DCP's ``flatten_state_dict`` on a ckconv tree: -> ([(fqn, path, leaf)], exact skeleton of the containers).

    Mappings are walked with ``str(key)``; a list is walked only when it holds a tensor or a walkable container
    (else it is one leaf); tuples and everything else are leaves -- exactly ``traverse_state_dict``.
    ``slots``: {key path: [[slot, name], ...]} of the optimizers written keyed by name (:mod:`.optimizers`); their
    skeleton nodes record it, for the reader to number them again.
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
        if tensor_kinds.is_special(v):
            kind = "sparse" if isinstance(v, tensor_kinds.SparseTensor) else "quantized"
            raise UnsupportedContent(f"{fqn!r:.80} is a {kind} tensor ({tensor_kinds.describe(v)}), which a DCP "
                                     "checkpoint cannot hold; write .pth or .safetensors instead")
        leaves.append((fqn, path, v))
        node = {"$leaf": fqn}
        if isinstance(v, TensorRef):
            if v.parameter:
                node["param"] = True
            if v.requires_grad:
                node["requires_grad"] = True
        return node

    def visit(path, v, keys=()):
        if keys in named:
            return {"$slots": named[keys], "$node": walk(path, v, keys)}
        return walk(path, v, keys)

    def walk(path, v, keys):
        if isinstance(v, dict):
            items = [[_plain(k, "a key"), visit(path + (tree.key_text(k),), x, keys + (k,))] for k, x in v.items()]
            node = {"$odict" if isinstance(v, OrderedDict) else "$dict": items}
            attrs = getattr(v, "__dict__", None) if isinstance(v, OrderedDict) else None
            if attrs:
                node["$attrs"] = _plain(dict(attrs), "OrderedDict attributes")
            return node
        if terminal(v):
            return leaf(path, v)
        return {"$list": [visit(path + (i,), x, keys + (i,)) for i, x in enumerate(v)]}

    named = {tuple(k): v for k, v in (slots or {}).items()}
    skeleton = visit((), root)
    return leaves, skeleton


def _plain(value, what):
    encoded, named, _ = structure.encode(value)
    if named:
        raise UnsupportedContent(f"tensors inside {what} cannot be stored in a DCP checkpoint")
    return encoded


def plan_write(root, world=1) -> WritePlan:
    """The items and who writes them; optimizers keyed by parameter name where their slots can be named."""
    root, slots = name_slots(root)
    leaves, skeleton = flatten(root, slots)
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
    if blob.kind == "tensor":
        ref = blob.value
        root = TensorRef(_Contiguous(ref), ref.dtype, ref.shape)
    else:
        root = blob.value
    write_archive(f, root, files=files, allow=allow, where="the DCP checkpoint", progress=progress)


def write_rank_file(folder, rank, blobs, progress=None, allow=()) -> dict:
    """Write ``__<rank>_0.distcp`` (non-tensors first, as torch does); -> blob index -> (name, offset, length)."""
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
    return sorted({p.name for p in names if p.parent == folder})  # the layout replaces only its own names


def write_metadata(folder, plan: WritePlan, locations: dict, metadata=None):
    """``.metadata`` as torch's FileSystemWriter writes it, plus ckconv's exact structure record and the source's
    metadata (``metadata``: ``user_metadata`` of the checkpoint), each an extra attribute DCP itself ignores."""
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
    if metadata:
        setattr(md, METADATA_ATTR, json.dumps(metadata, ensure_ascii=False))
    with open(Path(folder) / METADATA_NAME, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())

