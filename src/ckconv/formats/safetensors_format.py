"""Built-in format plugin: safetensors files and huggingface_hub-style sharded folders.

The file layout and the hub index are :mod:`ckconv.formats.safetensors_file` (format toolkit, shared with the
sharded torch format); this module decides what goes into which file, single-process and across torchrun ranks.
Non-tensor structure travels in ``__metadata__["ckconv.structure"]``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .. import dtypes
from ..contents.layout import optimizer_namer
from ..errors import CorruptCheckpoint, NotACheckpoint
from ..hookspecs import hookimpl
from ..model import Checkpoint
from ..pickling import structure
from ..pickling.unpickler import short_repr
from ..storage.atomic import FolderLayout
from ..storage.files import inside_folder, regular_file
from ..tree import foreign_objects
from . import safetensors_file
from .base import Format, RankWrite, WriteOptions, guarded
from .safetensors_file import (INDEX_NAME, MAX_HEADER, SHARD_NAME, SINGLE_NAME, assemble, header_bytes, load_index,
                               read_file)

RAW_DTYPES = frozenset(name for name, (_, code, _) in dtypes.DTYPES.items() if code is None)


class SafetensorsFormat(Format):
    name = "safetensors"
    description = "safetensors files and sharded folders (model.safetensors.index.json)"
    extensions = (".safetensors",)
    shardable = True  # honours --max-shard-size

    def sniff(self, path: Path, head: bytes) -> bool:
        return safetensors_file.sniff(path, head)

    def read(self, path: Path) -> Checkpoint:
        return guarded(self._read, path)

    def _read(self, path: Path) -> Checkpoint:
        if path.is_dir():
            return read_sharded(path)
        regular_file(path)  # a FIFO or a device never reaches open()
        if path.name.endswith(".index.json"):
            return read_sharded(path)
        tensors, metadata = read_file(path)
        root = assemble(tensors, metadata.get(structure.KEY), str(path))
        return Checkpoint(root=root, format="safetensors", path=str(path), metadata=metadata,
                          foreign=foreign_objects(root))

    def writes_directory(self, options: WriteOptions) -> bool:
        return options.max_shard_size is not None

    def folder_layout(self, options: WriteOptions) -> FolderLayout:
        return FolderLayout(index=(SINGLE_NAME, INDEX_NAME), earlier=earlier_output,
                            shards="model-{:05d}-of-{:05d}.safetensors")

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        named, text = _encode(checkpoint.root)
        if options.max_shard_size is None:
            safetensors_file.write_file(path, named, _metadata(text), options.progress)
            return
        path.mkdir(exist_ok=True)
        shards = plan_shards(named, options.max_shard_size)
        if len(shards) == 1:
            safetensors_file.write_file(path / SINGLE_NAME, named, _metadata(text), options.progress)
            return
        names = _shard_names(shards)
        for fname, shard in zip(names, shards):
            safetensors_file.write_file(path / fname, shard, {"format": "pt"}, options.progress)
        _write_index(path, named, shards, names, text)  # index last: a folder with an index is complete

    def plan_ranks(self, checkpoint, options: WriteOptions, world: int) -> RankWrite:
        """The same files as :meth:`write`, byte for byte, written by ``world`` ranks together."""
        named, text = _encode(checkpoint.root)
        if options.max_shard_size is None:
            return _OneFile(named, _metadata(text), options.progress, world)
        shards = plan_shards(named, options.max_shard_size)
        if len(shards) == 1:
            return _FirstRankWrites(named, _metadata(text), options.progress)
        return _Shards(named, shards, text, options.progress, world)


def _encode(root):
    """-> ([(name, TensorRef)] in file order, the ``ckconv.structure`` text or None when names say it all)."""
    encoded, named, needs_structure = structure.encode(root, raw_dtypes=RAW_DTYPES, namer=optimizer_namer(root))
    return named, structure.dumps(encoded) if needs_structure else None


def _metadata(text):
    meta = {"format": "pt"}
    if text is not None:
        meta[structure.KEY] = text
    return meta


# --- reading a sharded folder --------------------------------------------------------------------------------

def _index_path(path: Path) -> Path:
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return path / INDEX_NAME
        found = sorted(path.glob("*.safetensors.index.json"))
        if len(found) == 1:
            return found[0]
        if not found and (path / SINGLE_NAME).is_file():
            return path / SINGLE_NAME
        raise NotACheckpoint(f"{path}: folder has no single safetensors index (model.safetensors.index.json)")
    return path


def read_sharded(path: Path) -> Checkpoint:
    index_path = _index_path(path)
    if index_path != path:  # found in the folder: a regular file that does not link out of it
        inside_folder(path, index_path)
        regular_file(index_path)
    if index_path.name == SINGLE_NAME:
        tensors, metadata = read_file(index_path)
        root = assemble(tensors, metadata.get(structure.KEY), str(index_path))
        return Checkpoint(root=root, format="safetensors", path=str(path), metadata=metadata, foreign=foreign_objects(root))
    wmap, meta = load_index(index_path)
    folder = index_path.parent
    for fname in set(wmap.values()):
        if (not SHARD_NAME.match(fname) or fname in (".", "..") or os.path.isabs(fname)
                or Path(fname).name != fname or ".." in fname.split("/")):
            raise CorruptCheckpoint(
                f"{index_path}: weight_map entry {fname!r:.80} points outside the folder; refusing to read it")
        if not os.path.lexists(folder / fname):
            raise CorruptCheckpoint(f"{index_path}: shard {fname} is missing from the folder")
        inside_folder(folder, folder / fname, f"{index_path}: shard {fname}")
        regular_file(folder / fname, f"{index_path}: shard {fname}")
    by_shard: dict = {}
    for fname in dict.fromkeys(wmap.values()):
        tensors, _ = read_file(folder / fname)
        by_shard[fname] = tensors
        extra = [n for n in tensors if wmap.get(n) != fname]
        if extra:
            raise CorruptCheckpoint(f"{folder / fname}: holds tensor {extra[0]!r:.80} that the index does not map to it")
    tensors = {}
    for name, fname in wmap.items():
        if name not in by_shard[fname]:
            raise CorruptCheckpoint(f"{index_path}: tensor {name!r:.80} is missing from shard {fname}")
        tensors[name] = by_shard[fname][name]
    text = meta.get(structure.KEY)
    if text is not None and not isinstance(text, str):
        raise CorruptCheckpoint(f"{index_path}: {structure.KEY} must be a string")
    root = assemble(tensors, text, str(index_path))
    return Checkpoint(root=root, format="safetensors", path=str(path),
                      metadata={k: v if isinstance(v, str) else short_repr(v, 200) for k, v in meta.items()},
                      foreign=foreign_objects(root))


# --- writing -------------------------------------------------------------------------------------------------

def plan_shards(named, max_size):
    """huggingface_hub's plan (``split_state_dict_into_shards_factory``), so the same state_dict and limit give the
    same file names and weight_map: in order, a shard closes when the next tensor would push it past ``max_size``;
    a tensor over ``max_size`` gets a shard of its own, placed where it is met, and the open shard stays open."""
    shards, current, size = [], [], 0
    for name, ref in named:
        n = ref.nbytes
        if n > max_size:
            shards.append([(name, ref)])
            continue
        if current and size + n > max_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, ref))
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def _shard_names(shards) -> list:
    return [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]


def _write_index(folder: Path, named, shards, names, text):
    weight_map = {name: fname for fname, shard in zip(names, shards) for name, _ in shard}
    index = {"metadata": {"total_size": sum(ref.nbytes for _, ref in named)}, "weight_map": weight_map}
    if text is not None:
        index["metadata"][structure.KEY] = text
    safetensors_file.write_json(folder / INDEX_NAME, index)


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
        from ..storage.fastcopy import SourceFiles

        head, data = len(self.header), self.total - len(self.header)
        mine = [i for i, s in enumerate(self.starts)
                if min(self.world - 1, (s - head) * self.world // max(data, 1)) == rank]
        with open(path, "r+b", buffering=0) as f, SourceFiles() as files:
            for i in mine:
                self.named[i][1].copy_to(f.fileno(), self.starts[i], progress=self.progress, files=files)
            os.fsync(f.fileno())


class _FirstRankWrites(RankWrite):
    """A sharded output that fits in one shard: ``model.safetensors``, written by rank 0."""

    def __init__(self, named, metadata, progress):
        self.named, self.metadata, self.progress = named, metadata, progress

    def write(self, path, rank):
        if rank == 0:
            safetensors_file.write_file(path / SINGLE_NAME, self.named, self.metadata, self.progress)


class _Shards(RankWrite):
    """Shard i written by rank i mod world size; rank 0 writes the index last."""

    def __init__(self, named, shards, text, progress, world):
        self.named, self.shards, self.text, self.progress, self.world = named, shards, text, progress, world
        self.names = _shard_names(shards)

    def write(self, path, rank):
        for i, shard in enumerate(self.shards):
            if i % self.world == rank:
                safetensors_file.write_file(path / self.names[i], shard, {"format": "pt"}, self.progress)
                with open(path / self.names[i], "rb+") as f:
                    os.fsync(f.fileno())

    def finish(self, path, results):
        _write_index(path, self.named, self.shards, self.names, self.text)


def earlier_output(folder: Path) -> list:
    """The files of an earlier sharded output in ``folder`` that a new one replaces: the shards its
    ``model.safetensors.index.json`` names (plain ``*.safetensors`` names only; a missing, odd or unreadable
    index names none). ``model.safetensors`` and the index itself are the layout's ``index`` names."""
    index = folder / INDEX_NAME
    try:
        st = os.stat(index)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_HEADER:  # a FIFO or /dev/zero behind a link: skip
            return []
        wmap = json.loads(index.read_text("utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    if not isinstance(wmap, dict):
        return []
    return [n for n in dict.fromkeys(wmap.values()) if isinstance(n, str)]  # the layout replaces only its own


@hookimpl
def ckconv_register_formats(register):
    register(SafetensorsFormat())

