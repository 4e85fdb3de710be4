"""Built-in format plugin: sharded torch.save folders, the ``pytorch_model.bin.index.json`` layout.

transformers' ``save_pretrained(safe_serialization=False)`` and huggingface_hub's ``save_torch_state_dict(...,
safe_serialization=False)`` write ``pytorch_model-0000i-of-0000n.bin`` shards, each a torch.save'd dict of
name -> tensor, plus an index ``{"metadata": {"total_size": N}, "weight_map": {name: shard}}``.

Reading: an index is ours when its shards are torch.save files by their bytes (a safetensors index stays
safetensors). Shard names follow the sharded-safetensors rules, must be regular files inside the folder, and every
shard is read by the torch reader with all its checks. Each name must be in exactly the shard the index maps it to.
Tensors in different shards are different tensors, since each shard file holds its own bytes.

Writing: shards are planned exactly as huggingface_hub's ``split_torch_state_dict_into_shards`` plans them; what a
plain flat dict cannot say (a bundle, OrderedDict attributes, the key order) goes in the index metadata as a
``ckconv.structure`` record.
"""

from __future__ import annotations

import os
import re
import stat
from collections import OrderedDict
from pathlib import Path

from .. import tree
from ..contents.layout import optimizer_namer
from ..errors import CkconvError, CorruptCheckpoint, NotACheckpoint
from ..hookspecs import hookimpl
from ..model import Checkpoint, TensorRef
from ..pickling import structure
from ..pickling.unpickler import short_repr
from ..storage.atomic import FolderLayout
from ..storage.files import inside_folder, regular_file
from . import safetensors_file, torch_archive, torch_file
from .base import Format, WriteOptions, guarded
from .safetensors_file import SHARD_NAME, assemble, load_index

INDEX_NAME = "pytorch_model.bin.index.json"
SINGLE_NAME = "pytorch_model.bin"
DEFAULT_SHARD_SIZE = 5 * 10**9  # huggingface_hub's MAX_SHARD_SIZE, transformers' default
TORCH_INDEX_SUFFIXES = (".bin.index.json", ".pt.index.json", ".pth.index.json")
SHARD_NUMBER = re.compile(r"-(\d{1,9})-of-\d{1,9}\.[A-Za-z0-9]+$")


class TorchShardedFormat(Format):
    name = "torch-sharded"
    description = "sharded torch.save folders (pytorch_model.bin.index.json + .bin shards)"
    extensions = ()
    shardable = True  # honours --max-shard-size
    writes_pickles = True
    shards_for = "torch"  # `--to torch --max-shard-size` writes this format

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            return bool(_torch_indexes(path)) or _lone_single(path) is not None
        return path.name.endswith(".index.json") and head.lstrip()[:1] == b"{" and _is_torch_index(path)

    def read(self, path: Path) -> Checkpoint:
        return guarded(read_sharded, Path(path))

    def writes_directory(self, options: WriteOptions) -> bool:
        return True

    def folder_layout(self, options: WriteOptions) -> FolderLayout:
        return FolderLayout(index=(SINGLE_NAME, INDEX_NAME), earlier=earlier_output,
                            shards="pytorch_model-{:05d}-of-{:05d}.bin")

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        write_sharded(checkpoint.root, Path(path), options)


# --- which folders and index files are ours -----------------------------------------------------------------

def _torch_indexes(folder: Path) -> list:
    """The index files of ``folder`` that describe torch shards; none when the folder holds safetensors."""
    if safetensors_file.sniff(folder, b""):
        return []  # both layouts in one folder (common on the hub): the safe one is read
    found = [p for p in sorted(folder.glob("*.index.json")) if p.is_file() and _is_torch_index(p)]
    usual = [p for p in found if p.name == INDEX_NAME]
    return usual or found


def _lone_single(folder: Path):
    """``folder/pytorch_model.bin`` when it is the whole checkpoint (a one-shard output has no index)."""
    path = folder / SINGLE_NAME
    if safetensors_file.sniff(folder, b"") or not path.is_file():
        return None
    try:
        return path if _is_torch_file(_shard_path(folder, SINGLE_NAME, folder)) else None
    except CkconvError:
        return None


def _is_torch_index(index_path: Path) -> bool:
    """Decided by the bytes of the first shard that can be opened safely: torch.save or safetensors. By the index
    name when no shard can be opened or the first is neither (then reading says what is wrong with the shards)."""
    by_name = index_path.name.endswith(TORCH_INDEX_SUFFIXES)
    try:
        wmap, _ = load_index(index_path)
    except CkconvError:
        return by_name
    for fname in dict.fromkeys(wmap.values()):
        try:
            shard = _shard_path(index_path.parent, fname, index_path)
        except CkconvError:
            continue
        if _is_torch_file(shard):
            return True
        return by_name and not _is_safetensors_file(shard)
    return by_name


def _is_safetensors_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return safetensors_file.sniff(path, f.read(512))
    except OSError:
        return False


def _is_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        return bool(head) and torch_file.sniff(path, head)
    except OSError:
        return False


# --- reading -------------------------------------------------------------------------------------------------

def _shard_path(folder: Path, fname: str, where) -> Path:
    """A shard named by the index: a plain name of a regular file inside ``folder`` (symlinks may not leave it)."""
    if (not SHARD_NAME.match(fname) or fname in (".", "..") or os.path.isabs(fname)
            or Path(fname).name != fname):
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


def _index_of(path: Path) -> Path:
    if not path.is_dir():
        return path
    found = _torch_indexes(path)
    if len(found) == 1:
        inside_folder(path, found[0], f"{found[0]}: index file")  # found in the folder: it must lie inside it
        return found[0]
    if found:
        raise NotACheckpoint(f"{path}: folder holds {len(found)} torch index files ({found[0].name}, "
                             f"{found[1].name}{', ...' if len(found) > 2 else ''}); pass the one to read as SRC")
    single = _lone_single(path)
    if single is None:
        raise NotACheckpoint(f"{path}: folder has no torch index ({INDEX_NAME}) and no {SINGLE_NAME}")
    return single


def _shard_order(names: list):
    """Shards in their numbered order (``-00002-of-00005``), else in the order the index names them first."""
    numbers = [SHARD_NUMBER.search(n) for n in names]
    if all(numbers):
        order = sorted(range(len(names)), key=lambda i: (int(numbers[i].group(1)), i))
        return [names[i] for i in order]
    return names


def read_shard(path: Path, fname: str, where) -> tuple:
    """-> ({name: TensorRef} in file order, notes) of one shard, read by the torch reader with all its checks."""
    if not _is_torch_file(path):
        raise CorruptCheckpoint(f"{where}: shard {fname} is not a torch.save file; every shard of a torch index "
                                "must be one (a safetensors index is read as safetensors)")
    root = torch_file.read(path).root
    if not isinstance(root, dict):
        raise CorruptCheckpoint(f"{path}: shard holds {short_repr(root, 60)}, not a dict of name -> tensor")
    for key, value in root.items():
        if type(key) is not str or not isinstance(value, TensorRef):
            raise CorruptCheckpoint(f"{path}: shard holds {short_repr(value, 60)} under {short_repr(key, 80)}, "
                                    "not a tensor; a shard maps names to tensors")
    attrs = getattr(root, "__dict__", None)
    notes = [f"{fname}: left out the shard's own OrderedDict attributes ({', '.join(map(str, attrs))[:80]})"] \
        if attrs else []
    return root, notes


def read_sharded(path: Path) -> Checkpoint:
    index_path = _index_of(path)
    if not index_path.name.endswith(".index.json"):  # a lone pytorch_model.bin: the whole checkpoint
        ckpt = torch_file.read(index_path)
        ckpt.format, ckpt.path = "torch-sharded", str(path)
        return ckpt
    wmap, meta = load_index(index_path)
    folder = index_path.parent
    # Every shard name is checked before any shard is opened.
    paths = {fname: _shard_path(folder, fname, index_path) for fname in dict.fromkeys(wmap.values())}
    tensors: dict = {}
    notes: list = []
    for fname in _shard_order(list(paths)):
        held, shard_notes = read_shard(paths[fname], fname, index_path)
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
    root = tensors if text is None else assemble(tensors, text, str(index_path))
    return Checkpoint(root=root, format="torch-sharded", path=str(path), notes=notes,
                      metadata={k: v if isinstance(v, str) else short_repr(v, 200) for k, v in meta.items()},
                      foreign=tree.foreign_objects(root))


# --- writing -------------------------------------------------------------------------------------------------

def split_like_hub(named, max_size):
    """Shards of ``[(name, TensorRef)]`` exactly as huggingface_hub's ``split_state_dict_into_shards_factory``.

    In order, each distinct storage counted once at its full size; a shard closes when the next storage would
    push it past ``max_size``; a storage over ``max_size`` gets a shard of its own (the open shard stays open);
    tensors sharing a storage join the shard of its first tensor. Within a shard, names keep their input order.
    -> ([[(name, ref)]], total bytes).
    """
    position = {name: i for i, (name, _) in enumerate(named)}
    groups: dict = {}  # id(storage) -> names sharing it, first one placed
    shards, current, size, total = [], [], 0, 0
    for name, ref in named:
        key = id(ref.storage)
        if key in groups:
            groups[key].append((name, ref))
            continue
        groups[key] = [(name, ref)]
        n = ref.storage.nbytes
        total += n
        if n > max_size:
            shards.append([(name, ref)])
            continue
        if size + n > max_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, ref))
        size += n
    if current:
        shards.append(current)
    shard_of = {name: i for i, shard in enumerate(shards) for name, _ in shard}
    for members in groups.values():
        shards[shard_of[members[0][0]]].extend(members[1:])
    return [sorted(shard, key=lambda item: position[item[0]]) for shard in shards], total


def _utf8(text) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def flatten(root):
    """-> ([(name, TensorRef)] to shard, JSON structure or None when the shards alone say everything).

    A flat state_dict keeps its own keys, every one of them (tied keys share a storage in one shard, as torch.save
    writes them); anything else -- a bundle -- gets ``structure.encode``'s names and a structure record.
    """
    attrs = getattr(root, "__dict__", None) or {}
    if tree.is_flat_state_dict(root) and type(root) in (dict, OrderedDict) and all(_utf8(k) for k in root):
        encoded_attrs, attr_tensors, _ = structure.encode(dict(attrs)) if attrs else (None, [], False)
        if not attr_tensors:
            node = None
            if type(root) is OrderedDict:
                node = {"$odict": [[k, {"$tensor": k}] for k in root]}
                if attrs:
                    node["$attrs"] = encoded_attrs
            return list(root.items()), node
    encoded, named, _ = structure.encode(root, namer=optimizer_namer(root))
    return named, encoded


def write_sharded(root, path: Path, options: WriteOptions):
    limit = options.max_shard_size or DEFAULT_SHARD_SIZE
    path.mkdir(exist_ok=True)
    named, node = flatten(root)
    shards, total = split_like_hub(named, limit)
    if len(shards) <= 1:  # huggingface_hub writes one shard as pytorch_model.bin without an index; so do we
        torch_archive.write_zip(root, path / SINGLE_NAME, options)  # the whole tree: a bundle needs no record here
        return
    read_back = [name for shard in shards for name, _ in shard]
    if node is None and read_back != [name for name, _ in named]:  # reading returns shard order
        node = {"$dict": [[name, {"$tensor": name}] for name, _ in named]}
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch_archive.write_zip(dict(shard), path / fname, options)
        weight_map.update((name, fname) for name, _ in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if node is not None:
        index["metadata"][structure.KEY] = structure.dumps(node)
    safetensors_file.write_json(path / INDEX_NAME, index)  # index last: a folder with an index is complete


def earlier_output(folder: Path) -> list:
    """The shards an earlier output's ``pytorch_model.bin.index.json`` names in ``folder`` (plain ``*.bin``
    names only; a missing, odd or unreadable index names none): what a new output into the folder replaces."""
    index = folder / INDEX_NAME
    try:
        if not stat.S_ISREG(os.stat(index).st_mode):  # a FIFO or /dev/zero behind a link: skip
            return []
        wmap, _ = load_index(index)
    except (OSError, CkconvError):
        return []
    return list(dict.fromkeys(wmap.values()))  # the layout replaces only its own names among them


@hookimpl
def ckconv_register_formats(register):
    register(TorchShardedFormat())
