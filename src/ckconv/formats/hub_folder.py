"""The huggingface_hub model folder: an index, numbered shards, "index last", and what an earlier output is.

Format toolkit, not a plugin. huggingface_hub (``serialization/_base.py::split_state_dict_into_shards_factory``)
and transformers write a checkpoint as one file (``model.safetensors``) or, past a shard size, as numbered shards
(``model-00001-of-00003.safetensors``) plus an index ``model.safetensors.index.json`` =
``{"metadata": {"total_size": N, ...}, "weight_map": {tensor name: shard file}}``. The safetensors and
torch-sharded formats are both this folder: each is a :class:`HubLayout` record, and keeps only its one-shard
reader and writer. Here are the planner (:func:`split`), reading an index folder (:func:`read_index_folder`),
writing one (:class:`HubShards`, shards then the index) and the rule of what an earlier output in a destination
folder is (:meth:`HubLayout.folder_layout`: only the layout's own names are ever replaced).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CkconvError, CorruptCheckpoint, LimitExceeded
from ..pickling import structure
from ..pickling.unpickler import short_repr
from ..storage.atomic import FolderLayout
from ..storage.files import inside_folder, parse_json, read_capped, regular_file
from .base import RankWrite

MAX_INDEX = 100_000_000  # bytes of an index file: the safetensors header's cap
MAX_TENSORS = int(os.environ.get("CKCONV_MAX_TENSORS", 1_000_000))
MAX_INDEX_OBJECTS = 10_000  # JSON objects in an index: root, metadata, weight_map and a few for user metadata
SHARD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # a shard an index may name: a plain file name of these characters
SHARD_NUMBER = re.compile(r"-(\d{1,9})-of-\d{1,9}\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class HubLayout:
    """One format's names in a hub folder."""

    index: str  # "model.safetensors.index.json": present exactly when the checkpoint is sharded
    single: str  # "model.safetensors": the whole checkpoint when it fits one shard (then no index)
    shard: str  # "model-{:05d}-of-{:05d}.safetensors": shard i of n, numbered from 1

    def shard_names(self, n: int) -> list:
        return [self.shard.format(i, n) for i in range(1, n + 1)]

    def folder_layout(self) -> FolderLayout:
        """What an output of this layout replaces in an existing folder: the single file, the index, and of the
        names an earlier index gives only those of the shard pattern (never a user's file it happens to name)."""
        return FolderLayout(index=(self.single, self.index), earlier=self.earlier_output, shards=self.shard)

    def earlier_output(self, folder: Path) -> list:
        """The file names the index of an earlier output in ``folder`` gives (raises when there is none)."""
        wmap, _ = load_index(folder / self.index)
        return list(dict.fromkeys(wmap.values()))


# --- planning ------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """A planned hub folder: ``shards`` in file order, each ``[(name, tensor)]`` in input order; ``files`` their
    names (the layout's single name when there is one shard); ``total_size`` the bytes counted (each storage once)."""

    shards: list
    files: list
    total_size: int

    @property
    def is_sharded(self) -> bool:
        return len(self.shards) > 1

    def weight_map(self) -> dict:
        return {name: fname for fname, shard in zip(self.files, self.shards) for name, _ in shard}


def split(named, max_size: int, layout: HubLayout, *, storage_size: Callable[[Any], int],
          storage_id: Callable[[Any], Any] = lambda tensor: None) -> Split:
    """Shards of ``[(name, tensor)]``, exactly as huggingface_hub's ``split_state_dict_into_shards_factory``.

    In order, each distinct storage (``storage_id``; None: every tensor its own) counted once at
    ``storage_size``; a shard closes when the next storage would push it past ``max_size``; a storage over
    ``max_size`` gets a shard of its own, placed where it is met, and the open shard stays open. No packing: sizes
    [6, 6, 2, 6, 2, 2] under a limit of 10 give [6], [6, 2], [6, 2, 2]. Tensors sharing a storage join the shard of its first tensor; within a shard names keep their
    input order. Same names and limit, same files and weight_map as the hub. An empty input is one empty shard.
    """
    position = {name: i for i, (name, _) in enumerate(named)}
    groups: dict = {}  # storage id -> [(name, tensor)] sharing it, the first one placed
    shards, current, size, total = [], [], 0, 0
    for name, tensor in named:
        key = storage_id(tensor)
        if key is not None:
            if key in groups:
                groups[key].append((name, tensor))
                continue
            groups[key] = [(name, tensor)]
        n = storage_size(tensor)
        total += n
        if n > max_size:
            shards.append([(name, tensor)])
            continue
        if size + n > max_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += n
    if current or not shards:
        shards.append(current)
    shard_of = {name: i for i, shard in enumerate(shards) for name, _ in shard}
    for members in groups.values():
        shards[shard_of[members[0][0]]].extend(members[1:])
    shards = [sorted(shard, key=lambda item: position[item[0]]) for shard in shards]
    files = [layout.single] if len(shards) == 1 else layout.shard_names(len(shards))
    return Split(shards, files, total)


# --- writing -------------------------------------------------------------------------------------------------

def write_index(folder: Path, layout: HubLayout, plan: Split, metadata: dict | None = None):
    """``folder/<layout.index>``: ``{"metadata": {"total_size": N, **metadata}, "weight_map": ...}``."""
    index = {"metadata": {"total_size": plan.total_size, **(metadata or {})}, "weight_map": plan.weight_map()}
    with open(Path(folder) / layout.index, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)
        f.write("\n")


class HubShards(RankWrite):
    """A sharded hub folder: every shard by ``write_shard(path, [(name, tensor)])``, then the index last (a folder
    with an index is complete), with ``index_metadata`` beside ``total_size``. Per-shard header metadata is the
    ``write_shard`` callable's to add. Under torchrun shard i is written by rank i mod ``world`` (and fsynced
    there); rank 0 writes the index in ``finish``. One process: ``run_alone``."""

    def __init__(self, layout: HubLayout, plan: Split, write_shard: Callable, index_metadata=None, world: int = 1):
        self.layout, self.plan, self.write_shard = layout, plan, write_shard
        self.index_metadata, self.world = index_metadata, world

    def setup(self, path):
        Path(path).mkdir(exist_ok=True)

    def write(self, path, rank):
        for i, (fname, shard) in enumerate(zip(self.plan.files, self.plan.shards)):
            if i % self.world == rank:
                self.write_shard(Path(path) / fname, shard)
                if self.world > 1:
                    with open(Path(path) / fname, "rb+") as f:
                        os.fsync(f.fileno())

    def finish(self, path, results):
        write_index(path, self.layout, self.plan, self.index_metadata)


# --- reading -------------------------------------------------------------------------------------------------

def load_index(index_path: Path):
    """-> (weight_map, metadata) of an index file, refused unless it has exactly the expected shape."""
    raw = read_capped(index_path, MAX_INDEX, f"{index_path}: index file")  # never a FIFO, never /dev/zero
    too_many = LimitExceeded(f"{index_path}: index holds more than {MAX_INDEX_OBJECTS} JSON objects; an index "
                             "maps names to shard files")
    index = parse_json(raw, MAX_INDEX_OBJECTS, too_many, f"{index_path}: index")
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    meta = index.get("metadata", {}) if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not isinstance(meta, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CorruptCheckpoint(f"{index_path}: index needs a weight_map of tensor name -> shard file name")
    if len(wmap) > MAX_TENSORS:
        raise LimitExceeded(f"{index_path}: index maps {len(wmap)} tensors, over the limit of {MAX_TENSORS} "
                            "(CKCONV_MAX_TENSORS)")
    return wmap, meta


def shard_path(folder: Path, fname: str, where) -> Path:
    """A shard named by the index: a plain name of a regular file inside ``folder`` (symlinks may not leave it)."""
    if not SHARD_NAME.match(fname) or fname in (".", "..") or os.path.isabs(fname) or Path(fname).name != fname:
        raise CorruptCheckpoint(f"{where}: weight_map entry {fname!r:.80} points outside the folder; "
                                "refusing to read it")
    path = folder / fname
    if not os.path.lexists(path):
        raise CorruptCheckpoint(f"{where}: shard {fname} is missing from the folder")
    if not os.path.exists(path):
        raise CorruptCheckpoint(f"{where}: shard {fname} is missing from the folder (a dangling link)")
    inside_folder(folder, path, f"{where}: shard {fname}")  # the huggingface_hub cache's blobs/ excepted
    regular_file(path, f"{where}: shard {fname}")
    return path


def shard_order(names: list) -> list:
    """Shards in their numbered order (``-00002-of-00005``), else in the order the index names them first."""
    numbers = [SHARD_NUMBER.search(n) for n in names]
    if all(numbers):
        order = sorted(range(len(names)), key=lambda i: (int(numbers[i].group(1)), i))
        return [names[i] for i in order]
    return names


def read_index_folder(index_path: Path, read_shard: Callable) -> tuple:
    """The tensors of the folder ``index_path`` describes -> (root, metadata, notes).

    Every shard name is checked before any shard is opened; ``read_shard(path, fname)`` -> ({name: tensor} in
    file order, notes) reads one. Tensors come in shard order, then each shard's own order; each must be in
    exactly the shard the index maps it to, and every name the index maps must be found. A ``ckconv.structure``
    record in the index metadata rebuilds the tree around them (:func:`assemble`)."""
    wmap, meta = load_index(index_path)
    folder = index_path.parent
    paths = {fname: shard_path(folder, fname, index_path) for fname in dict.fromkeys(wmap.values())}
    tensors: dict = {}
    notes: list = []
    for fname in shard_order(list(paths)):
        held, shard_notes = read_shard(paths[fname], fname)
        notes += shard_notes
        for name in held:
            if wmap.get(name) != fname:
                raise CorruptCheckpoint(f"{paths[fname]}: holds tensor {name!r:.80} that the index does not map "
                                        "to it")
        tensors.update(held)  # no name is in two shards: each maps to exactly one
    for name, fname in wmap.items():
        if name not in tensors:
            raise CorruptCheckpoint(f"{index_path}: tensor {name!r:.80} is missing from shard {fname}")
    text = meta.get(structure.KEY)
    if text is not None and not isinstance(text, str):
        raise CorruptCheckpoint(f"{index_path}: {structure.KEY} must be a string")
    metadata = {k: v if isinstance(v, (str, int, float)) else short_repr(v, 200) for k, v in meta.items()}
    return assemble(tensors, text, str(index_path)), metadata, notes


def assemble(tensors: dict, text, where):
    """``tensors`` as the tree a ``ckconv.structure`` record ``text`` describes (just ``tensors`` without one)."""
    if text is None:
        return tensors
    try:
        return structure.decode(structure.loads(text, where), tensors, where)
    except CkconvError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{where}: invalid {structure.KEY} metadata ({type(exc).__name__}: "
                                f"{str(exc)[:80]}); the file was altered or written by a newer ckconv") from None
