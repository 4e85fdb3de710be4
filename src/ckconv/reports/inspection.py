"""``ckconv inspect``: what a checkpoint holds, read from headers and pickles, never from tensor data."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..contents import modules
from ..pickling import policy
from .. import numpy_values, tensor_kinds, tree
from ..contents.layout import describe
from ..errors import UnsafeCheckpoint
from ..io import detect_format, read
from ..model import Checkpoint, Foreign, GlobalRef, TensorRef, is_reference
from ..contents.sections import sections
from ..pickling.allowlist import Role
from ..pickling.verdicts import FINDINGS, Verdict, worst
from ..pickling.writer import dry_run
from ..plugins import host


MAX_TENSOR_ROWS = int(os.environ.get("CKCONV_INSPECT_MAX_ROWS", 100_000))  # table rows; counts cover every tensor


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
    modules: list = field(default_factory=list)  # pickled nn.Modules: [{path, class, tensors, error}]
    values: list = field(default_factory=list)  # [{path, kind, text}]: numpy values and class references, at a glance
    verdict: Verdict = Verdict.SAFE  # ckconv.pickling.verdicts
    globals: dict = field(default_factory=dict)  # {verdict: [dotted names]}
    tensors_omitted: int = 0  # references past the first MAX_TENSOR_ROWS, counted in tensor_count but not listed

    def to_dict(self):
        return asdict(self)


def inspect(path, allow_globals=()) -> Inspection:
    """What ``path`` holds, with a safety verdict (:mod:`ckconv.pickling.policy`): a dangerous file is still described
    (read with every global inert), and ``verdict``/``globals`` say what ``torch.load`` would call."""
    path = Path(path)
    fmt = detect_format(path)
    error = None
    try:
        ckpt = read(path, fmt)
    except UnsafeCheckpoint as exc:
        error = str(exc)
        ckpt = _read_dangerous(path, fmt, exc)
    count, total, kinds, infos = _tensor_rows(ckpt.root)
    # a pickled module's tensors under the names model.state_dict() gives them, not the record's inner path
    named = modules.with_state_dicts(ckpt.root)
    if named is not ckpt.root:  # the same tree when it holds no module: its rows are those just made
        infos = _tensor_rows(named)[3]
    meta = {k: (v if not isinstance(v, str) or len(v) < 200 else v[:200] + "...") for k, v in ckpt.metadata.items()}
    found = verdicts(ckpt, allow_globals)
    return Inspection(str(path), ckpt.format or fmt, sections(ckpt.root), count, total, kinds, infos,
                      [{"path": p, "class": c} for p, c in ckpt.foreign], found[Verdict.DANGEROUS], meta,
                      describe(ckpt.root).to_dict(), error=error, modules=modules.describe(ckpt.root),
                      values=glance(ckpt.root),
                      verdict=worst(v for v in found if found[v]), globals=found,
                      tensors_omitted=count - len(infos))


def _tensor_rows(root, limit=None):
    """(references, bytes of distinct tensors, {dtype: references}, [TensorInfo]) in file order: one row per
    reference, tied names included, the first ``limit`` (:data:`MAX_TENSOR_ROWS`) of them; the counts cover all.
    A tensor referenced millions of times deep in a tree costs a row each only up to the cap."""
    limit = MAX_TENSOR_ROWS if limit is None else limit
    seen: set = set()
    infos: list = []
    kinds: Counter = Counter()
    count = total = 0

    def visit(p, ref):
        nonlocal count, total
        count += 1
        kind = ref.dtype
        if type(ref) is not TensorRef:  # qint8 per_channel_affine axis 0, sparse_csr float32 nnz 5 (tensor_kinds)
            kind = tensor_kinds.describe(ref)
            kinds[kind.split(" per_")[0].split(" nnz")[0]] += 1
        else:
            kinds[kind] += 1
        nbytes = ref.nbytes
        if len(infos) < limit:
            infos.append(TensorInfo(tree.short_path(p), kind, list(ref.shape), nbytes))
        key = ref.view_key()
        if key not in seen:
            seen.add(key)
            total += nbytes

    tree.walk(root, visit, kinds=(TensorRef, tensor_kinds.SparseTensor))
    return count, total, dict(kinds), infos


def _read_dangerous(path, fmt, exc) -> Checkpoint:
    """Re-read a refused file with dangerous globals recorded instead of refused (everything stays inert), where
    its format can (``Format.read_dangerous``); where that cannot build the tree either (a payload that breaks the
    stand-ins), or the format cannot re-read, only the names are reported."""
    if Path(path).is_file():
        try:
            again = host().format(fmt).read_dangerous(Path(path))  # None: the format cannot re-read
        except UnsafeCheckpoint as refused:
            again, exc = None, refused
        if again is not None:
            return again
    return Checkpoint(root={}, format=fmt, path=str(path), dangerous=list(exc.globals))


def glance(root, limit=1000) -> list:
    """[{path, kind, text}] for the numpy values and class references in a tree (never looking inside a numpy
    value's own records), the first ``limit`` of them."""
    found: list = []

    def visit(path, node):
        if len(found) >= limit:
            return
        if is_reference(node):
            kind, text = "reference", f"{node.module}.{node.qualname}"
        elif isinstance(node, Foreign):
            value = numpy_values.value(node)
            if value is numpy_values.NOT_NUMPY:
                return
            import numpy as np  # value() built a numpy object, so numpy is imported already

            kind = "numpy"
            if isinstance(value, np.ndarray):
                text = f"{value.dtype} array {list(value.shape)}"
            elif isinstance(value, np.dtype):
                text = f"dtype {value}"
            else:
                text = f"{value.dtype} scalar {value.item()!r:.40}"
        else:
            return
        where = tree.short_path(path)  # named only when shown: a wide tree's other nodes cost no name
        if found and where.startswith(found[-1]["path"] + ".") and found[-1]["kind"] == "numpy":
            return  # a record inside the last numpy value (its dtype, the ndarray class)
        found.append({"path": where, "kind": kind, "text": text})

    tree.walk(root, visit, kinds=(Foreign, GlobalRef, type))  # records and references only (is_reference)
    return found


GETATTR = ("builtins", "getattr")


def verdicts(ckpt, allow_globals=()) -> dict:
    """{safe|unknown|dangerous: [dotted names]} for a checkpoint read by any format, each name judged in the roles
    the file gives it: from the pickle's opcodes (``ckpt.globals``), and from the records and references of the tree
    as ckconv would write them (the only roles formats without pickle opcodes have: safetensors structure, DCP);
    and {code: [record names]} for one that holds code (a TorchScript archive, an exported program's graph)."""
    written = dry_run(ckpt.root, allow_globals)
    roles: dict = {}  # pickle opcodes, answered by ckconv's unpickler: every role any of its pickles gives a name
    for g in ckpt.globals:  # (a folder's files are many pickles: a name called in one and referenced in another
        key = (g[0], g[1])  # is called)
        roles[key] = roles.get(key, Role.REFERENCED) | (g[2] if len(g) > 2 else Role.REFERENCED)
    for key, role in written.named.items():  # calls and instantiations the tree records, however deep
        if key in roles:
            roles[key] |= role
    found = policy.classify([(m, q, r) for (m, q), r in roles.items()], allow_globals)
    # records no pickle named (safetensors structure, DCP's structure record): judged as ckconv would write them
    names = [(m, q, r) for (m, q), r in written.named.items() if (m, q) not in roles and (m, q) != GETATTR]
    described = policy.classify(names, allow_globals, pickled=False)
    if GETATTR in written.named and GETATTR not in roles:  # reading let it through: a method of torch.compile's wrapper
        described[Verdict.UNKNOWN].append("builtins.getattr")
    for bucket, listed in described.items():
        found[bucket] += [n for n in listed if n not in found[bucket]]
    for v in (Verdict.SAFE, Verdict.UNKNOWN):  # a name judged two ways is judged by its worst
        found[v] = [n for n in found[v] if not any(n in found[w] for w in FINDINGS if w > v)]
    for name in ckpt.dangerous:  # what the reader itself judged dangerous (a getattr on a module, DCP metadata)
        if name not in found[Verdict.DANGEROUS]:
            found[Verdict.DANGEROUS].append(name)
        for bucket in (Verdict.SAFE, Verdict.UNKNOWN):
            if name in found[bucket]:
                found[bucket].remove(name)
    for problem in written.problems:
        if problem not in found[Verdict.UNKNOWN]:
            found[Verdict.UNKNOWN].append(problem)
    if ckpt.code:  # records its own loader would compile and run: a verdict of their own, never "safe"
        found[Verdict.CODE] = list(ckpt.code)
    return found


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


