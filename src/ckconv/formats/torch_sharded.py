"""Built-in format plugin: sharded torch.save folders, the ``pytorch_model.bin.index.json`` layout.

transformers' ``save_pretrained(safe_serialization=False)`` and huggingface_hub's ``save_torch_state_dict(...,
safe_serialization=False)`` write ``pytorch_model-0000i-of-0000n.bin`` shards, each a torch.save'd dict of
name -> tensor, plus an index ``{"metadata": {"total_size": N}, "weight_map": {name: shard}}``.

The folder is :mod:`ckconv.formats.hub_folder` with this format's layout; this module keeps the one-shard reader
and writer. Reading: an index is ours when its shards are torch.save files by their bytes (a safetensors index
stays safetensors); every shard is read by the torch reader with all its checks. Tensors in different shards are
different tensors, since each shard file holds its own bytes.

Writing: shards are planned exactly as huggingface_hub's ``split_torch_state_dict_into_shards`` plans them (each
storage counted once, at its full size); what a plain flat dict cannot say (a bundle, OrderedDict attributes, the
key order) goes in the index metadata as a ``ckconv.structure`` record.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .. import tree, tree_keys
from ..contents.layout import optimizer_namer
from ..errors import CkconvError, CorruptCheckpoint, NotACheckpoint
from ..hookspecs import hookimpl
from ..model import Checkpoint, TensorRef
from ..pickling import structure
from ..pickling.unpickler import short_repr
from ..storage.files import inside_folder
from . import hub_folder, safetensors_file, torch_archive, torch_file
from .base import Format, WriteOptions, guarded, hub_index_metadata, user_metadata
from .hub_folder import HubLayout, HubShards, load_index, shard_path

LAYOUT = HubLayout(index="pytorch_model.bin.index.json", single="pytorch_model.bin",
                   shard="pytorch_model-{:05d}-of-{:05d}.bin")
DEFAULT_SHARD_SIZE = 5 * 10**9  # huggingface_hub's MAX_SHARD_SIZE, transformers' default
TORCH_INDEX_SUFFIXES = (".bin.index.json", ".pt.index.json", ".pth.index.json")


class TorchShardedFormat(Format):
    name = "torch-sharded"
    description = "sharded torch.save folders (pytorch_model.bin.index.json + .bin shards)"
    extensions = ()
    shardable = True  # honours --max-shard-size
    writes_pickles = True
    carries_metadata = True  # the index's metadata and each shard's metadata record (issue 23)
    shards_for = "torch"  # `--to torch --max-shard-size` writes this format

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir():
            return bool(_torch_indexes(path)) or _lone_single(path) is not None
        return path.name.endswith(".index.json") and head.lstrip()[:1] == b"{" and _is_torch_index(path)

    def read(self, path: Path) -> Checkpoint:
        return guarded(read_sharded, Path(path))

    def writes_directory(self, options: WriteOptions) -> bool:
        return True

    def folder_layout(self, options: WriteOptions):
        return LAYOUT.folder_layout()

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        write_sharded(checkpoint.root, Path(path), options, user_metadata(checkpoint.metadata))


# --- which folders and index files are ours -----------------------------------------------------------------

def _torch_indexes(folder: Path) -> list:
    """The index files of ``folder`` that describe torch shards; none when the folder holds safetensors."""
    if safetensors_file.sniff(folder, b""):
        return []  # both layouts in one folder (common on the hub): the safe one is read
    found = [p for p in sorted(folder.glob("*.index.json")) if p.is_file() and _is_torch_index(p)]
    usual = [p for p in found if p.name == LAYOUT.index]
    return usual or found


def _lone_single(folder: Path):
    """``folder/pytorch_model.bin`` when it is the whole checkpoint (a one-shard output has no index)."""
    path = folder / LAYOUT.single
    if safetensors_file.sniff(folder, b"") or not path.is_file():
        return None
    try:
        return path if _is_torch_file(shard_path(folder, LAYOUT.single, folder)) else None
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
            shard = shard_path(index_path.parent, fname, index_path)
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
        raise NotACheckpoint(f"{path}: folder has no torch index ({LAYOUT.index}) and no {LAYOUT.single}")
    return single


def read_shard(path: Path, fname: str, globals_: list | None = None) -> tuple:
    """-> ({name: TensorRef} in file order, notes) of one shard, read by the torch reader with all its checks; the
    globals its pickle names (with their roles) are added to ``globals_``: torch.load runs each shard's pickle,
    whatever of it the shard's dict keeps."""
    if not _is_torch_file(path):
        raise CorruptCheckpoint(f"{path}: is not a torch.save file; every shard of a torch index must be one "
                                "(a safetensors index is read as safetensors)")
    ckpt = torch_file.read(path)
    if globals_ is not None:
        globals_ += ckpt.globals
    root = ckpt.root
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
    names: list = []
    root, metadata, notes = hub_folder.read_index_folder(index_path, lambda p, f: read_shard(p, f, names))
    return Checkpoint(root=root, format="torch-sharded", path=str(path), notes=notes, metadata=metadata,
                      foreign=tree_keys.foreign_objects(root), globals=names)


# --- writing -------------------------------------------------------------------------------------------------

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


def write_sharded(root, path: Path, options: WriteOptions, metadata: dict | None = None):
    """``root`` as a hub folder of torch.save shards; ``metadata`` (the source's) joins the index metadata and
    every shard's metadata record."""
    limit = options.max_shard_size or DEFAULT_SHARD_SIZE
    path.mkdir(exist_ok=True)
    named, node = flatten(root)
    plan = hub_folder.split(named, limit, LAYOUT, storage_size=lambda ref: ref.storage.nbytes,
                            storage_id=lambda ref: id(ref.storage))
    if not plan.is_sharded:  # huggingface_hub writes one shard as pytorch_model.bin without an index; so do we
        torch_archive.write_zip(root, path / LAYOUT.single, options, metadata)  # the whole tree: no structure record
        return
    read_back = [name for shard in plan.shards for name, _ in shard]
    if node is None and read_back != [name for name, _ in named]:  # reading returns shard order
        node = {"$dict": [[name, {"$tensor": name}] for name, _ in named]}
    index_metadata = {**hub_index_metadata(metadata),
                      **({structure.KEY: structure.dumps(node)} if node is not None else {})}
    HubShards(LAYOUT, plan, lambda file, shard: torch_archive.write_zip(dict(shard), file, options, metadata),
              index_metadata).run_alone(path)


@hookimpl
def ckconv_register_formats(register):
    register(TorchShardedFormat())
