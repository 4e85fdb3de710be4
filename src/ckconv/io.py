"""Reading and writing checkpoints through the format plugins: detect, read, load, save.

Every command reads through :func:`read` and writes through :func:`save`: :func:`output_target` plans the
output once and :func:`write` writes it (under torchrun :func:`ckconv.torchrun.write_distributed` takes the same
plan). Formats are reached only by name through
the plugin host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import tree
from .errors import NotACheckpoint, OutputExists, UsageError
from .formats.base import SNIFF_BYTES, WriteOptions
from .model import Checkpoint, Storage, TensorRef
from .pickling.policy import check_patterns
from .pickling.writer import check_writable
from .plugins import host
from .storage.atomic import FolderLayout, identities, staged
from .storage.files import regular_file

PathLike = str | os.PathLike
Progress = Callable[[int], None]  # called with each count of bytes written; an optional start(total) first


def detect_format(path: PathLike) -> str:
    """The name of the format plugin that recognises ``path`` by its bytes (never by its extension)."""
    path = Path(path)
    if not path.exists():
        raise NotACheckpoint(f"{path}: no such file or folder")
    head = b""
    if not path.is_dir():
        regular_file(path)  # a FIFO would block open() forever, a link to /dev/zero read without end
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as exc:
            raise NotACheckpoint(f"{path}: cannot read it ({exc.strerror})") from None
        if not head:
            raise NotACheckpoint(f"{path}: not a readable checkpoint (the file is empty)")
    for name, fmt in host().formats.items():
        try:
            if fmt.sniff(path, head):
                return name
        except OSError:
            continue
    what = "folder" if path.is_dir() else f"file starting with {head[:8]!r}"
    raise NotACheckpoint(f"{path}: not a readable checkpoint (unknown format: {what}); "
                         "ckconv reads torch.save files and safetensors, see `ckconv plugins`")


def read(path: PathLike, format: str | None = None) -> Checkpoint:
    """Describe a checkpoint without loading tensor data. Never runs code from the file."""
    path = Path(path)
    if format and not path.is_dir():
        regular_file(path)
    with tree.gc_paused():
        name = format or detect_format(path)
        ckpt = host().format(name).read(path)
    ckpt.format = ckpt.format or name
    return ckpt


def load(path: PathLike, format: str | None = None, *, device=None, map_location=None) -> Any:
    """Read a checkpoint into real torch objects: tensors on ``device`` (a ``torch.device`` or its name, "cuda:0";
    default the CPU), shared storages staying shared. ``map_location`` is the same, spelt as for ``torch.load``."""
    if device is not None and map_location is not None and str(device) != str(map_location):
        raise UsageError(f"device={device!r} and map_location={map_location!r} disagree; pass one")
    return tree.materialize(read(path, format).root, device=device if device is not None else map_location)


def as_checkpoint(obj) -> Checkpoint:
    """``obj`` as a Checkpoint: itself, or the tree of live torch objects described without copying."""
    if isinstance(obj, Checkpoint):
        return obj
    return Checkpoint(root=tree.from_torch(obj))


def output_format(dst: Path, to: str | None, max_shard_size) -> str:
    """The output format's name: ``to``, else from ``dst``'s extension; with ``max_shard_size``, the sharded
    variant (``torch`` -> ``torch-sharded``), refused for a format that cannot shard (never silently ignored)."""
    if to:
        name = host().format(to).name
    elif max_shard_size is not None:
        return "safetensors"
    else:
        suffix = dst.suffix.lower()
        name = next((n for n, fmt in host().formats.items() if suffix in fmt.extensions), None)
        if name is None:
            raise UsageError(f"cannot tell the output format from {dst.name!r}; pass --to "
                             f"({', '.join(sorted(host().formats))})")
    if max_shard_size is None or host().format(name).shardable:
        return name
    formats = host().formats.values()
    sharded = next((f.name for f in formats if f.shards_for == name), None)
    if sharded is None:
        able = ", ".join(sorted(f.name for f in formats if f.shardable))
        raise UsageError(f"--max-shard-size does not apply to format {name}: it is not sharded; drop "
                         f"--max-shard-size, or shard with --to {able}")
    return sharded


def check_extension(dst: Path, to: str | None):
    """``convert``'s explicit format that contradicts DST's extension (``out.safetensors --to torch``) is refused: a
    file whose name says one format and whose bytes another is a trap for the next reader (issue 23)."""
    if not to:
        return
    dst, name = Path(dst), host().format(to).name
    if dst.is_dir():
        return  # cp semantics: the file in the folder takes the format's own extension
    suffix = dst.suffix.lower()
    named = [n for n, fmt in host().formats.items() if suffix in fmt.extensions]
    fmt = host().format(name)
    own = {name, fmt.shards_for}  # torch-sharded writes torch files
    if named and not own.intersection(named):
        exts = tuple(fmt.extensions)
        better = f"name it {dst.with_suffix(exts[0]).name}" if exts else f"pass {dst.with_suffix('')} instead"
        raise UsageError(f"{dst.name} names a {named[0]} file, but --to {name} writes a {name} checkpoint; {better}, "
                         "or drop --to to write what the name says")


def save(obj: Any, path: PathLike, *, format: str | None = None, max_shard_size: int | str | None = None,
         force: bool = False, progress: Progress | None = None, allow_globals: Iterable[str] = ()) -> str:
    """Write ``obj`` (torch objects, or a Checkpoint from ``read``) atomically; returns the format name used.

    ``allow_globals``: dotted names or ``prefix.*`` patterns a pickle output may name beyond ckconv's allowlist
    of known-benign globals (:mod:`ckconv.pickling.policy`); anything else is refused before a byte is written."""
    ckpt = as_checkpoint(obj)
    target = output_target(ckpt, path, format=format, max_shard_size=max_shard_size, progress=progress,
                           allow_globals=allow_globals)
    return write(ckpt, target, force=force)


def write(ckpt: Checkpoint, target: "OutputTarget", *, force: bool = False) -> str:
    """Write ``ckpt`` where :func:`output_target` planned it, atomically; returns the format name used."""
    fmt = target.format
    if fmt.writes_pickles:  # refuse unknown globals before anything is staged
        check_writable(ckpt.root, target.options.allow_globals, f"the {fmt.name} checkpoint")
    with tree.gc_paused(), staged(target.path, directory=target.folder, force=force, protect=target.protect,
                                  layout=target.layout) as tmp:
        fmt.write(ckpt, tmp, target.options)
    return fmt.name


@dataclass
class OutputTarget:
    """An output planned once: where it goes, in which format, with which options, and what it must not touch.

    :func:`write` and :func:`ckconv.torchrun.write_distributed` take it as it is."""

    path: Path  # where the output goes (for a single file into an existing folder: DIR/<source stem><ext>)
    format: object  # the Format plugin
    folder: bool  # a multi-file output (sharded safetensors, dcp)
    protect: frozenset  # (device, inode) of the source's files: never overwritten or removed, even with force
    layout: FolderLayout | None  # for folder outputs: the files of the format's layout (ckconv.storage.atomic)
    options: WriteOptions = field(default_factory=WriteOptions)  # what the format's writer is handed


def output_target(obj, path, *, format: str | None = None, max_shard_size=None, progress: Progress | None = None,
                  allow_globals: Iterable[str] = ()) -> OutputTarget:
    """Where ``save`` writes ``obj`` for ``path``, refusing what could only lose data; touches nothing.

    A folder output (``max_shard_size``, dcp) goes into ``path``, new or existing (only its own layout's files
    are replaced there: :func:`ckconv.storage.atomic.staged_folder`); a name with a file extension is refused for it
    (``out.safetensors`` -> use ``out``). A single-file output whose ``path`` is an existing folder takes ``cp``
    semantics: ``path/<source stem><ext>``. The source's files (``protect``) are those of ``obj``: plan with the
    checkpoint as read, whose files are a superset of any output made from it.
    """
    ckpt = as_checkpoint(obj)
    path = Path(path)
    shard = parse_size(max_shard_size)
    fmt = host().format(output_format(path, format, shard))
    options = WriteOptions(max_shard_size=shard, progress=progress, allow_globals=check_patterns(allow_globals))
    folder = fmt.writes_directory(options)
    layout = None
    if folder:
        suffix = path.suffix.lower()
        if suffix and suffix in _file_extensions() and not path.is_dir():
            why = ("--max-shard-size writes a folder of shards" if shard is not None
                   else f"a {fmt.name} checkpoint is a folder")
            raise UsageError(f"{path} names a file, but {why}; pass {path.with_suffix('')} instead")
        layout = fmt.folder_layout(options)
    elif path.is_dir():
        path = path / _file_name_in_folder(ckpt, fmt, path)
        if path.is_dir():
            raise OutputExists(f"{path} is a folder; ckconv never replaces a folder with a file: name the "
                               "output file")
    return OutputTarget(path, fmt, folder, identities(source_files(ckpt)), layout, options)


def _file_extensions() -> set:
    return {e.lower() for f in host().formats.values() for e in f.extensions}


def _file_name_in_folder(ckpt: Checkpoint, fmt, folder: Path) -> str:
    """``cp x.pth DIR`` names ``DIR/x.pth``: the source's stem with the output format's extension."""
    exts = tuple(fmt.extensions)
    if not ckpt.path or not exts:
        example = folder / ("model" + (exts[0] if exts else ""))
        raise UsageError(f"{folder} is a folder; name the output file inside it (e.g. {example})")
    src = Path(ckpt.path)
    name = src.name[: -len(".index.json")] if src.name.endswith(".index.json") else src.name
    stem, suffix = os.path.splitext(name)
    if not stem or (src.is_dir() and suffix.lower() not in _file_extensions()):
        stem, suffix = name, ""  # a folder "run.v2" keeps its whole name
    return stem + (suffix if suffix.lower() in exts else exts[0])  # x.bin stays x.bin as a torch output


def source_files(ckpt: Checkpoint) -> set:
    """Every file (and folder) the checkpoint was read from, its path and each storage's: what no output may
    overwrite, and what ``scan`` need not read again."""
    paths = {ckpt.path} if ckpt.path else set()
    others = []  # storages that may read from others; a plain Storage is a byte range of one file (or memory)
    for ref in tree.instances(ckpt.root, TensorRef):  # no id() or set slot per storage: a million cost nothing
        st = ref.storage
        if type(st) is not Storage:
            others.append(st)
        elif st.path:
            paths.add(st.path)
    seen = set()
    for st in others:
        while st is not None and id(st) not in seen:  # a cast storage reads from another storage
            seen.add(id(st))
            path = getattr(st, "path", None)
            if path:
                paths.add(path)
            paths.update(p for p in [getattr(x, "path", None) for x in getattr(st, "pieces", ())] if p)
            st = getattr(st, "source", None)
    return paths


def parse_size(value: int | str | None) -> int | None:
    """``5GB`` -> 5_000_000_000 (decimal units, as huggingface_hub); ``2GiB`` binary; plain ints are bytes."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1, "": 1}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: len(text) - len(unit)]
            try:
                size = float(number) * units[unit]
            except ValueError:
                break
            if size <= 0:
                break
            return int(size)
    raise UsageError(f"invalid size {value!r}: use a number with a unit, like 5GB, 500MB or 2GiB")
