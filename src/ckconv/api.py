"""The Python API: read, load, save, convert, inspect, diff. The CLI is a thin layer over these."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import dtypes, tree
from .storage.atomic import FolderLayout, check_destination, identities, staged
from .errors import NotACheckpoint, OutputExists, UsageError
from .formats.base import WriteOptions
from .storage.files import regular_file
from .model import Checkpoint, Storage, TensorRef
from .plugins import host

SNIFF_BYTES = 512
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
    name = format or detect_format(path)
    ckpt = host().format(name).read(path)
    ckpt.format = ckpt.format or name
    return ckpt


def load(path: PathLike, format: str | None = None) -> Any:
    """Read a checkpoint into real torch objects (tensors on the CPU; shared storages stay shared)."""
    return tree.materialize(read(path, format).root)


def _as_checkpoint(obj) -> Checkpoint:
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
        name = next((n for n, fmt in host().formats.items() if suffix in getattr(fmt, "extensions", ())), None)
        if name is None:
            raise UsageError(f"cannot tell the output format from {dst.name!r}; pass --to "
                             f"({', '.join(sorted(host().formats))})")
    if max_shard_size is None or getattr(host().format(name), "shardable", False):
        return name
    formats = host().formats.values()
    sharded = next((f.name for f in formats if getattr(f, "shards_for", None) == name), None)
    if sharded is None:
        able = ", ".join(sorted(f.name for f in formats if getattr(f, "shardable", False)))
        raise UsageError(f"--max-shard-size does not apply to format {name}: it is not sharded; drop "
                         f"--max-shard-size, or shard with --to {able}")
    return sharded


def save(obj: Any, path: PathLike, *, format: str | None = None, max_shard_size: int | str | None = None,
         force: bool = False, progress: Progress | None = None, allow_globals: Iterable[str] = ()) -> str:
    """Write ``obj`` (torch objects, or a Checkpoint from ``read``) atomically; returns the format name used.

    ``allow_globals``: dotted names or ``prefix.*`` patterns a pickle output may name beyond ckconv's allowlist
    of known-benign globals (:mod:`ckconv.pickling.policy`); anything else is refused before a byte is written."""
    from .pickling.policy import check_patterns

    allow_globals = check_patterns(allow_globals)
    path = Path(path)
    ckpt = _as_checkpoint(obj)
    shard = parse_size(max_shard_size)
    name = output_format(path, format, shard)
    fmt = host().format(name)
    options = WriteOptions(max_shard_size=shard, progress=progress, allow_globals=allow_globals)
    target = output_target(ckpt, path, format=name, max_shard_size=shard)
    if getattr(fmt, "writes_pickles", False):  # refuse unknown globals before anything is staged
        from .pickling.writer import check_writable

        check_writable(ckpt.root, allow_globals, f"the {name} checkpoint")
    with staged(target.path, directory=target.folder, force=force, protect=target.protect,
                layout=target.layout) as tmp:
        fmt.write(ckpt, tmp, options)
    return name


@dataclass
class OutputTarget:
    path: Path  # where the output goes (for a single file into an existing folder: DIR/<source stem><ext>)
    format: object  # the Format plugin
    folder: bool  # a multi-file output (sharded safetensors, dcp)
    protect: frozenset  # (device, inode) of the source's files: never overwritten or removed, even with force
    layout: FolderLayout | None  # for folder outputs: the files of the format's layout (ckconv.storage.atomic)


def output_target(obj, path, *, format: str | None = None, max_shard_size=None) -> OutputTarget:
    """Where ``save`` writes ``obj`` for ``path``, refusing what could only lose data; touches nothing.

    A folder output (``max_shard_size``, dcp) goes into ``path``, new or existing (only its own layout's files
    are replaced there: :func:`ckconv.storage.atomic.staged_folder`); a name with a file extension is refused for it
    (``out.safetensors`` -> use ``out``). A single-file output whose ``path`` is an existing folder takes ``cp``
    semantics: ``path/<source stem><ext>``.
    """
    ckpt = _as_checkpoint(obj)
    path = Path(path)
    shard = parse_size(max_shard_size)
    fmt = host().format(output_format(path, format, shard))
    options = WriteOptions(max_shard_size=shard)
    folder = fmt.writes_directory(options)
    layout = None
    if folder:
        suffix = path.suffix.lower()
        if suffix and suffix in _file_extensions() and not path.is_dir():
            why = ("--max-shard-size writes a folder of shards" if shard is not None
                   else f"a {fmt.name} checkpoint is a folder")
            raise UsageError(f"{path} names a file, but {why}; pass {path.with_suffix('')} instead")
        make_layout = getattr(fmt, "folder_layout", None)
        layout = make_layout(options) if make_layout is not None else None
    elif path.is_dir():
        path = path / _file_name_in_folder(ckpt, fmt, path)
        if path.is_dir():
            raise OutputExists(f"{path} is a folder; ckconv never replaces a folder with a file: name the "
                               "output file")
    return OutputTarget(path, fmt, folder, identities(_source_files(ckpt)), layout)


def _file_extensions() -> set:
    return {e.lower() for f in host().formats.values() for e in getattr(f, "extensions", ())}


def _file_name_in_folder(ckpt: Checkpoint, fmt, folder: Path) -> str:
    """``cp x.pth DIR`` names ``DIR/x.pth``: the source's stem with the output format's extension."""
    exts = tuple(getattr(fmt, "extensions", ()))
    if not ckpt.path or not exts:
        example = folder / ("model" + (exts[0] if exts else ""))
        raise UsageError(f"{folder} is a folder; name the output file inside it (e.g. {example})")
    src = Path(ckpt.path)
    name = src.name[: -len(".index.json")] if src.name.endswith(".index.json") else src.name
    stem, suffix = os.path.splitext(name)
    if not stem or (src.is_dir() and suffix.lower() not in _file_extensions()):
        stem, suffix = name, ""  # a folder "run.v2" keeps its whole name
    return stem + (suffix if suffix.lower() in exts else exts[0])  # x.bin stays x.bin as a torch output


def _source_files(ckpt: Checkpoint) -> set:
    """Every file (and folder) the checkpoint's bytes come from: what no output may overwrite."""
    paths = {ckpt.path} if ckpt.path else set()
    seen = set()
    for _, ref in tree.tensors(ckpt.root):
        st = ref.storage
        while st is not None and id(st) not in seen:  # a cast storage reads from another storage
            seen.add(id(st))
            paths.update(p for p in [getattr(st, "path", None)]
                         + [getattr(x, "path", None) for x in getattr(st, "pieces", ())] if p)
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


# --- convert ---------------------------------------------------------------------------------------------

@dataclass
class ConversionResult:
    source: str
    destination: str
    source_format: str
    destination_format: str
    tensors: int
    bytes: int
    model_only: bool = False
    dtype: str | None = None
    cast: int = 0  # tensors cast by --dtype
    notes: list = field(default_factory=list)
    match: dict | None = None  # the MatchReport (as a dict) when keys were remapped (--arch, --map, --rename, ...)
    changes: list = field(default_factory=list)  # what --plain rewrote, one line each

    def to_dict(self):
        return asdict(self)


def convert(src: PathLike, dst: PathLike, *, to: str | None = None, model_only: bool = False,
            dtype: str | None = None, max_shard_size: int | str | None = None, force: bool = False,
            progress: Progress | None = None, arch: str | None = None, arch_options: dict | list | None = None,
            map: PathLike | None = None, only: Iterable[str] = (), drop: Iterable[str] = (),
            rename: Iterable[str] = (), section: str | None = None, strict: bool = False,
            freeze: Iterable[str] = (), distributed: bool = False, allow_globals: Iterable[str] = (),
            optimizer: str = "remap", keep_layout: bool = False, dtype_optimizer: str | None = None,
            plain: bool = False) -> ConversionResult:
    """Convert ``src`` to ``dst`` losslessly (unless ``model_only`` or ``dtype`` ask otherwise).

    ``arch`` / ``map`` / ``rename`` / ``only`` / ``drop`` remap the model state_dict onto an architecture's names
    (see :func:`ckconv.match`); the other sections of a bundle are kept unless ``model_only``.
    ``freeze``: selectors (``features[:10]``; dotted names without ``arch``) whose parameters the written bundle
    lists under ``frozen``, for :func:`ckconv.load_bundle` to restore.
    ``allow_globals``: globals a pickle output may name beyond ckconv's allowlist (see :func:`save`).
    ``optimizer``: ``"remap"`` (optimizer state follows the remapped model; refused when it cannot be proven to fit)
    or ``"drop"`` (left out). With ``arch`` a bundle is written as ``{'model', 'optimizer', ...}`` unless
    ``keep_layout``. ``dtype`` casts the model (and EMA copies) only; ``dtype_optimizer`` casts optimizer state,
    never its ``step`` counters (docs/bundles.md).
    ``plain``: rewrite what only ``torch.load(weights_only=False)`` can load (pickled modules, numpy values,
    records, class references) into what ``weights_only=True`` loads (:mod:`ckconv.contents.plain`); the result lists each
    change in ``changes``.
    ``distributed``: when this process is one rank of a torchrun job, write only this rank's share of the output
    (:func:`ckconv.formats.dcp.save_distributed`; every rank must call convert). The CLI sets it.
    """
    from .contents.sections import model_state_dict

    from .pickling.policy import check_patterns

    src, dst = Path(src), Path(dst)
    allow_globals = check_patterns(allow_globals)  # a bad pattern is a usage error before anything is read
    if freeze and model_only:
        raise UsageError("--freeze records the frozen parameters in a bundle, but --model-only writes a bare "
                         "state_dict; drop one of the two")
    ckpt = read(src)
    early = output_target(ckpt, dst, format=to, max_shard_size=max_shard_size)
    if not early.folder:  # refuse an existing DST or a missing folder before any matching or casting
        check_destination(early.path, force, early.protect)
    notes = list(ckpt.notes)
    root = ckpt.root
    report = None
    if arch is not None or map is not None or rename or only or drop or section is not None:
        from .matching.remap import remap_checkpoint

        root, report, remap_notes = remap_checkpoint(
            ckpt, arch=arch, arch_options=arch_options, map=map, only=only, drop=drop, rename=rename,
            section=section, strict=strict, model_only=model_only, optimizer=optimizer, keep_layout=keep_layout)
        notes += remap_notes
    elif model_only:
        root, where = model_state_dict(root)
        notes.append(f"wrote only the model state_dict (found at {where})")
    elif optimizer == "drop":
        from .bundles import drop_optimizers

        root, dropped = drop_optimizers(root)
        notes.append(f"left out {dropped} optimizer state_dicts (--optimizer drop)")
    changes: list = []
    if plain:
        from .contents.plain import plain as make_plain

        root, changes = make_plain(root)
        notes.append(f"--plain: {len(changes)} values rewritten for torch.load(weights_only=True)" if changes else
                     "--plain: nothing to rewrite; the checkpoint already loads with weights_only=True")
    if freeze:
        from .bundles import record_freeze

        target = report.architecture if report is not None else None
        root, _, note = record_freeze(root, freeze, arch=target, arch_options=report.arch_options if target else None)
        notes.append(note)
    cast = 0
    if dtype or dtype_optimizer:
        from .bundles import cast_notes

        root, cast, cast_note = cast_notes(root, dtype, dtype_optimizer, model_only)
        notes += cast_note
    shard = parse_size(max_shard_size)
    over = [r for r in _unique_tensors(root) if shard is not None and r.nbytes > shard]
    if over:
        notes.append(f"the checkpoint's largest tensor ({max(r.nbytes for r in over)} bytes) exceeds --max-shard-size: "
                     f"{len(over)} tensor(s) over the limit each get a shard of their own, as huggingface_hub does")
    kept = tree.foreign_objects(root) if ckpt.foreign else []  # what the output holds, not the source
    if kept:
        classes = sorted({c for _, c in kept})
        notes.append(f"kept {len(kept)} foreign objects as inert records: " + ", ".join(classes[:12])
                     + (f" and {len(classes) - 12} more classes" if len(classes) > 12 else ""))
    out = Checkpoint(root=root, format=ckpt.format, path=str(src))
    refs = _unique_tensors(root)
    total = sum(r.nbytes for r in refs)
    if progress is not None and hasattr(progress, "start"):
        progress.start(total)
    dst = output_target(out, dst, format=to, max_shard_size=max_shard_size).path  # a folder DST takes DST/<name>
    saver = save
    if distributed:  # under torchrun each rank writes its share (issue 8)
        from .formats.dcp import save_distributed, world_from_env

        if world_from_env() is not None:
            saver = save_distributed
    name = saver(out, dst, format=to, max_shard_size=max_shard_size, force=force, progress=progress,
                 allow_globals=allow_globals)
    return ConversionResult(str(src), str(dst), ckpt.format, name, len(refs), total, model_only,
                            dtypes.CAST_NAMES.get(dtype) if dtype else None, cast, notes,
                            report.to_dict() if report is not None else None, changes)


def _unique_tensors(root):
    seen, out = set(), []
    for _, ref in tree.tensors(root):
        if ref.view_key() not in seen:
            seen.add(ref.view_key())
            out.append(ref)
    return out


def cast_floating(root, dtype, *, within=None, exclude=(), keep_keys=()):
    """Cast float16/bfloat16/float32/float64 tensors to ``dtype`` (storage by storage, views kept).

    -> (new root, tensors cast, float8/complex tensors left). ``within``: key paths (tuples) of the subtrees to
    cast (None: all of ``root``); ``exclude``: key paths left as they are; ``keep_keys``: dict keys whose values
    are never cast (an optimizer's ``step`` counters).
    """
    target = dtypes.CAST_NAMES.get(dtype)
    if target is None:
        raise UsageError(f"unknown --dtype {dtype!r}; use bf16, fp16 or fp32")
    new_storage: dict = {}
    counts = {"cast": 0, "skipped": 0}
    memo: dict = {}
    exclude = {tuple(p) for p in exclude}

    def storage_for(st: Storage):
        if id(st) not in new_storage:
            new_storage[id(st)] = _CastStorage(st, target)
        return new_storage[id(st)]

    def conv(node, path):
        if path in exclude:
            return node
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, TensorRef):
            if node.dtype in dtypes.FLOATING and node.storage.dtype == node.dtype:
                counts["cast"] += node.dtype != target
                out = TensorRef(storage_for(node.storage) if node.dtype != target else node.storage, target,
                                node.shape, node.stride, node.offset, node.requires_grad, node.parameter)
            else:
                counts["skipped"] += node.dtype.startswith(("float8", "complex"))
                out = node
        elif isinstance(node, dict):
            out = type(node)() if type(node) is not dict else {}
            for k, v in node.items():
                out[k] = v if k in keep_keys else conv(v, path + (k,))
            if getattr(node, "__dict__", None):
                out.__dict__.update(node.__dict__)
        elif type(node) is list:
            out = [conv(v, path + (i,)) for i, v in enumerate(node)]
        elif type(node) is tuple:
            out = tuple(conv(v, path + (i,)) for i, v in enumerate(node))
        else:
            out = node
        if not exclude:  # with exclusions a node's cast depends on the path it is reached by
            memo[id(node)] = out
        return out

    def at(node, path, prefix=()):
        if not path:
            return conv(node, prefix)
        key, rest = path[0], path[1:]
        if isinstance(node, list):
            return [at(v, rest, prefix + (i,)) if i == key else v for i, v in enumerate(node)]
        from .contents.unwrap import replace

        return replace(node, (key,), at(node[key], rest, prefix + (key,)))

    tree.walk(root)
    for path in [()] if within is None else within:
        root = at(root, tuple(path))
    return root, counts["cast"], counts["skipped"]


class _CastStorage(Storage):
    """A storage whose bytes are another storage's, cast to a new dtype when streamed (needs torch)."""

    def __init__(self, source: Storage, target: str):
        n = source.nbytes // dtypes.itemsize(source.dtype) * dtypes.itemsize(target)
        super().__init__(source.key, target, n, label=source.label)
        self.source = source
        self.verified = True

    def chunks(self, start=0, length=None, size=None):
        import torch

        src_size = dtypes.itemsize(self.source.dtype)
        dst_size = dtypes.itemsize(self.dtype)
        if length is None:
            length = self.nbytes - start
        step = (8 << 20) // max(src_size, dst_size) * dst_size
        for pos in range(start, start + length, step):
            n = min(step, start + length - pos)
            raw = bytearray(self.source.read(pos // dst_size * src_size, n // dst_size * src_size))
            t = torch.frombuffer(raw, dtype=dtypes.torch_dtype(self.source.dtype)) if raw else None
            yield b"" if t is None else t.to(dtypes.torch_dtype(self.dtype)).view(torch.uint8).numpy().tobytes()
