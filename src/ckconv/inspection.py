"""``ckconv inspect``: what a checkpoint holds, read from headers and pickles, never from tensor data."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import tree
from .bundles import describe
from .errors import UnsafeCheckpoint
from .sections import sections


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list
    bytes: int


@dataclass
class Inspection:
    path: str
    format: str
    sections: dict
    tensor_count: int
    bytes: int
    dtypes: dict
    tensors: list = field(default_factory=list)
    foreign: list = field(default_factory=list)  # [{path, class}]
    dangerous: list = field(default_factory=list)  # globals that would run code
    metadata: dict = field(default_factory=dict)
    bundle: dict = field(default_factory=dict)  # layout, model section, optimizers (kind, hyper-parameters, names)
    error: str | None = None

    def to_dict(self):
        return asdict(self)


def inspect(path) -> Inspection:
    from .api import detect_format, read

    path = Path(path)
    fmt = detect_format(path)
    try:
        ckpt = read(path, fmt)
    except UnsafeCheckpoint as exc:
        return _inspect_dangerous(path, fmt, str(exc))
    refs = tree.tensors(ckpt.root)
    seen, infos, total = set(), [], 0
    for p, ref in refs:
        infos.append(TensorInfo(tree.format_path(p), ref.dtype, list(ref.shape), ref.nbytes))
        if ref.view_key() not in seen:
            seen.add(ref.view_key())
            total += ref.nbytes
    meta = {k: (v if len(v) < 200 else v[:200] + "...") for k, v in ckpt.metadata.items()}
    return Inspection(str(path), ckpt.format, sections(ckpt.root), len(infos), total,
                      dict(Counter(i.dtype for i in infos)), infos,
                      [{"path": p, "class": c} for p, c in ckpt.foreign], list(ckpt.dangerous), meta,
                      describe(ckpt.root).to_dict())


def _inspect_dangerous(path, fmt, message) -> Inspection:
    """Re-read with dangerous globals recorded instead of refused (everything stays inert)."""
    from .formats.torch_pickle import guarded, read_legacy, read_zip

    if Path(path).is_dir():  # a DCP folder: the refusal already names the globals
        return Inspection(str(path), fmt, {}, 0, 0, {}, [], [], [], {}, error=message)
    with open(path, "rb") as f:
        head = f.read(4)
    reader = read_zip if head == b"PK\x03\x04" else read_legacy
    ckpt = guarded(reader, path, allow_dangerous=True)
    return Inspection(str(path), fmt, sections(ckpt.root), 0, 0, {}, [],
                      [{"path": p, "class": c} for p, c in ckpt.foreign], list(ckpt.dangerous), {}, error=message)


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


