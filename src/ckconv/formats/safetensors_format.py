"""Built-in format plugin: safetensors files and huggingface_hub-style sharded folders.

The file is :mod:`ckconv.formats.safetensors_file`; the sharded folder (index, numbered shards, the planner, what
an earlier output is) is :mod:`ckconv.formats.hub_folder` with the safetensors layout. This module decides what
goes into which file, single-process and across torchrun ranks. Non-tensor structure travels in
``__metadata__["ckconv.structure"]`` (the index's ``metadata`` for a sharded folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import dtypes
from ..contents.layout import optimizer_namer
from ..errors import NotACheckpoint
from ..hookspecs import hookimpl
from ..model import Checkpoint
from ..pickling import structure
from ..storage.atomic import FolderLayout
from ..storage.fastcopy import SourceFiles
from ..storage.files import inside_folder, regular_file
from ..tree_keys import foreign_objects
from . import hub_folder, safetensors_file
from .base import Format, RankWrite, WriteOptions, guarded, hub_index_metadata, string_metadata
from .hub_folder import HubShards, assemble
from .safetensors_file import LAYOUT, header_bytes, read_file

RAW_DTYPES = frozenset(name for name, (_, code, _) in dtypes.DTYPES.items() if code is None)
RESERVED = frozenset({"__metadata__"})  # the header's own key: a tensor of that name is stored under another
SHARD_METADATA = {"format": "pt"}  # every shard's header, as huggingface_hub writes it


class SafetensorsFormat(Format):
    name = "safetensors"
    description = "safetensors files and sharded folders (model.safetensors.index.json)"
    extensions = (".safetensors",)
    shardable = True  # honours --max-shard-size
    carries_metadata = True  # every file's __metadata__ and the index's metadata (issue 23)

    def sniff(self, path: Path, head: bytes) -> bool:
        return safetensors_file.sniff(path, head)

    def read(self, path: Path) -> Checkpoint:
        return guarded(self._read, path)

    def _read(self, path: Path) -> Checkpoint:
        if path.is_dir() or path.name.endswith(".index.json"):
            return read_sharded(path)
        regular_file(path)  # a FIFO or a device never reaches open()
        return _read_one(path, path)

    def writes_directory(self, options: WriteOptions) -> bool:
        return options.max_shard_size is not None

    def folder_layout(self, options: WriteOptions) -> FolderLayout:
        return LAYOUT.folder_layout()

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        plan_output(checkpoint.root, options, 1, checkpoint.metadata).run_alone(path)

    def plan_ranks(self, checkpoint, options: WriteOptions, world: int) -> RankWrite:
        """The same files as :meth:`write`, byte for byte, written by ``world`` ranks together."""
        return plan_output(checkpoint.root, options, world, checkpoint.metadata)


def plan_output(root, options: WriteOptions, world: int, metadata: dict | None = None) -> RankWrite:
    """How ``world`` ranks write ``root``: one file, or a hub folder of this layout. ``metadata`` (the source's,
    :func:`ckconv.formats.base.user_metadata`) goes into every file's header (each shard's) and into a sharded
    folder's index metadata (issue 23)."""
    named, text = _encode(root)
    source = metadata
    metadata = string_metadata(source)
    if options.max_shard_size is None:
        if world == 1:
            return _FirstRank(named, _header_metadata(text, metadata), options.progress)
        return _OneFile(named, _header_metadata(text, metadata), options.progress, world)
    plan = hub_folder.split(named, options.max_shard_size, LAYOUT, storage_size=lambda ref: ref.nbytes)
    if not plan.is_sharded:  # model.safetensors alone, as huggingface_hub writes it
        return _FirstRank(named, _header_metadata(text, metadata), options.progress, LAYOUT.single)
    shard_metadata = _header_metadata(None, metadata)

    def write_shard(path, shard):
        safetensors_file.write_file(path, shard, shard_metadata, options.progress)

    index_metadata = {**hub_index_metadata(source), **({structure.KEY: text} if text is not None else {})}
    return HubShards(LAYOUT, plan, write_shard, index_metadata, world)


def _encode(root):
    """-> ([(name, TensorRef)] in file order, the ``ckconv.structure`` text or None when names say it all)."""
    named = structure.flat_state_dict(root, RAW_DTYPES, RESERVED)
    if named is not None:  # a plain state_dict: its names say it all (and it has no optimizer state to name)
        return named, None
    encoded, named, needs_structure = structure.encode(root, raw_dtypes=RAW_DTYPES, namer=optimizer_namer(root),
                                                        reserved=RESERVED)
    return named, structure.dumps(encoded) if needs_structure else None


def _header_metadata(text, metadata):
    """A file's ``__metadata__``: the source's own keys exactly, else ``format: pt``; and the structure record."""
    meta = dict(metadata) or dict(SHARD_METADATA)
    if text is not None:
        meta[structure.KEY] = text
    return meta


# --- reading -------------------------------------------------------------------------------------------------

def _read_one(file: Path, path: Path) -> Checkpoint:
    tensors, metadata = read_file(file)
    root = assemble(tensors, metadata.get(structure.KEY), str(file))
    return Checkpoint(root=root, format="safetensors", path=str(path), metadata=metadata, foreign=foreign_objects(root))


def _index_path(path: Path) -> Path:
    if path.is_dir():
        if (path / LAYOUT.index).is_file():
            return path / LAYOUT.index
        found = sorted(path.glob("*.safetensors.index.json"))
        if len(found) == 1:
            return found[0]
        if not found and (path / LAYOUT.single).is_file():
            return path / LAYOUT.single
        raise NotACheckpoint(f"{path}: folder has no single safetensors index ({LAYOUT.index})")
    return path




def read_sharded(path: Path) -> Checkpoint:
    index_path = _index_path(path)
    if index_path != path:  # found in the folder: a regular file that does not link out of it
        inside_folder(path, index_path)
        regular_file(index_path)
    if index_path.name == LAYOUT.single:
        return _read_one(index_path, path)
    headers: dict = {}  # the shards' own __metadata__ (ckconv repeats the source's keys in each)

    def read_shard(file: Path, fname: str):
        tensors, meta = read_file(file)
        headers.update((k, v) for k, v in meta.items() if k != structure.KEY)
        return tensors, []

    root, metadata, _ = hub_folder.read_index_folder(index_path, read_shard)
    return Checkpoint(root=root, format="safetensors", path=str(path), metadata={**headers, **metadata},
                      foreign=foreign_objects(root))


# --- writing across ranks ------------------------------------------------------------------------------------

class _OneFile(RankWrite):
    """One file laid out identically by every rank (same header): rank 0 creates it at full size, then each rank
    writes the bytes of a contiguous run of tensors, about total/world bytes, at their offsets."""

    def __init__(self, named, metadata, progress, world):
        self.named, self.progress, self.world = named, progress, world
        self.header = header_bytes(named, metadata)
        self.starts, pos = [], len(self.header)
        for _, ref in named:
            self.starts.append(pos)
            pos += ref.nbytes
        self.total = pos

    def setup(self, path):
        with open(path, "wb") as f:
            f.write(self.header)
            f.truncate(self.total)

    def write(self, path, rank):
        head, data = len(self.header), self.total - len(self.header)
        mine = [i for i, s in enumerate(self.starts)
                if min(self.world - 1, (s - head) * self.world // max(data, 1)) == rank]
        with open(path, "r+b", buffering=0) as f, SourceFiles() as files:
            for i in mine:
                self.named[i][1].copy_to(f.fileno(), self.starts[i], progress=self.progress, files=files)
            os.fsync(f.fileno())


class _FirstRank(RankWrite):
    """One file written front to back by rank 0 alone: ``path`` itself, or ``path/<name>`` in a folder output (a
    sharded output that fits in one shard: ``model.safetensors``)."""

    def __init__(self, named, metadata, progress, name=None):
        self.named, self.metadata, self.progress, self.name = named, metadata, progress, name

    def setup(self, path):
        if self.name:
            Path(path).mkdir(exist_ok=True)

    def write(self, path, rank):
        if rank == 0:
            file = Path(path) / self.name if self.name else path
            safetensors_file.write_file(file, self.named, self.metadata, self.progress)


@hookimpl
def ckconv_register_formats(register):
    register(SafetensorsFormat())
