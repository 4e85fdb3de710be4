"""``ckconv inspect``: what a checkpoint holds, read from headers and pickles, never from tensor data."""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from itertools import repeat
from dataclasses import asdict, dataclass, field, replace
from operator import attrgetter, methodcaller
from pathlib import Path
from types import SimpleNamespace

from ..contents import modules
from ..pickling import policy
from .. import numpy_values, tensor_kinds, tree
from ..contents.layout import describe
from ..errors import UnsafeCheckpoint
from ..tree import TreePath
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
        out = asdict(replace(self, tensors=[]))  # asdict's deep copy costs ~5 us a row: rows copied as dicts here
        out["tensors"] = [dict(vars(t), shape=list(t.shape)) for t in self.tensors]
        return out


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
    with tree.gc_paused():  # a row per tensor, no cycles: a collection pass per few thousand would rescan them all
        return _inspect(path, fmt, ckpt, error, allow_globals)


def _inspect(path, fmt, ckpt, error, allow_globals) -> Inspection:
    found = _Survey(ckpt.root)  # the one walk of the whole tree: tensors, records, references
    count, total, kinds, infos = _tensor_rows(found.tensors)
    # a pickled module's tensors under the names model.state_dict() gives them, not the record's inner path
    pickled = modules.find_modules(ckpt.root) if found.records else []  # a module is a record
    named = modules.with_state_dicts(ckpt.root, pickled)
    if named is not ckpt.root:  # the same tree when it holds no module: its rows are those just made
        infos = _tensor_rows(_tensors_of(named))[3]
    meta = {k: (v if not isinstance(v, str) or len(v) < 200 else v[:200] + "...") for k, v in ckpt.metadata.items()}
    judged = verdicts(ckpt, allow_globals, plain=found.plain)
    return Inspection(str(path), ckpt.format or fmt, sections(ckpt.root), count, total, kinds, infos,
                      [{"path": p, "class": c} for p, c in ckpt.foreign], judged[Verdict.DANGEROUS], meta,
                      describe(ckpt.root).to_dict(), error=error, modules=modules.describe(ckpt.root, pickled),
                      values=found.values, verdict=worst(v for v in judged if judged[v]), globals=judged,
                      tensors_omitted=count - len(infos))


TENSOR_KINDS = (TensorRef, tensor_kinds.SparseTensor)  # a row each
_RECORDS = (Foreign, GlobalRef, type)  # records and references (is_reference): shown at a glance
# Values the pickle writer writes without naming a global taken from the tree and without a problem (see
# pickling.writer.PickleWriter.save: only records and references name one; a tensor is written as None in a dry run),
# and dict keys that are such values. Exact types: a subclass (TorchSize, TorchDtype) is left to the writer.
_PLAIN = frozenset({TensorRef, dict, OrderedDict, list, tuple, set, frozenset, str, int, float, complex, bool,
                    type(None), bytes, bytearray})
_PLAIN_KEYS = frozenset({str, int})


class _Survey:
    """One walk of a checkpoint tree, collecting what every part of the report needs: ``tensors`` ([TreePath],
    [tensor]) of every kind in file order; ``values``, the numpy values and class references at a glance (the first
    ``limit``, see :meth:`_glance`); ``records``, whether any node is a record (pickled modules are records);
    ``plain``, whether every node and dict key is of a type in :data:`_PLAIN` (then the pickle writer's dry run names
    no global and finds no problem, and :func:`verdicts` need not run it)."""

    def __init__(self, root, limit=1000):
        self.tensors: tuple = ([], [])  # ([TreePath], [tensor])
        self.values: list = []
        self.records = False
        self.plain = True
        self.limit = limit
        flat = tree.flat_tensors(root)
        if flat is not None and type(root) in (dict, OrderedDict) and set(map(type, flat)) == {TensorRef}:
            self.tensors = (list(map(TreePath, repeat(tree.ROOT), root)), flat)  # a state_dict: the walk's finds
            return
        add_path, add_tensor = self.tensors[0].append, self.tensors[1].append
        plain, plain_keys = _PLAIN, _PLAIN_KEYS

        def visit(path, node):
            kind = type(node)
            if kind is TensorRef:  # the common case first: a hundred thousand tensors under their names
                add_path(path)
                add_tensor(node)
            elif kind not in plain:
                self._other(path, node)
            elif (kind is dict or kind is OrderedDict) and self.plain and not plain_keys.issuperset(map(type, node)):
                self.plain = False

        tree.walk(root, visit)

    def _other(self, path, node):
        self.plain = False
        if isinstance(node, TENSOR_KINDS):
            self.tensors[0].append(path)
            self.tensors[1].append(node)
        if isinstance(node, Foreign):
            self.records = True
        if isinstance(node, _RECORDS):
            self._glance(path, node)

    def _glance(self, path, node):
        """{path, kind, text} for a numpy value or a class reference (never looking inside a numpy value's own
        records), the first ``limit`` of them."""
        found = self.values
        if len(found) >= self.limit:
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


def _tensor_rows(tensors, limit=None):
    """(references, bytes of distinct tensors, {dtype: references}, [TensorInfo]) for ``tensors``, ([TreePath],
    [tensor]) in file order: one row per reference, tied names included, the first ``limit``
    (:data:`MAX_TENSOR_ROWS`) of them; the counts cover all. A tensor referenced millions of times deep in a tree
    costs a row each only up to the cap. Column by column (``map`` runs the loops in C): 100k rows in ~0.1 s."""
    limit = MAX_TENSOR_ROWS if limit is None else limit
    paths, refs = tensors
    shapes = list(map(attrgetter("shape"), refs))
    plain = set(map(type, refs)) == {TensorRef}
    sizes = list(map(attrgetter("nbytes"), refs))
    if plain:  # the common case: plain tensors, their kind is their dtype
        text = list(map(attrgetter("dtype"), refs))
        kinds = Counter(text)
    else:  # qint8 per_channel_affine axis 0, sparse_csr float32 nnz 5 (tensor_kinds), counted as qint8, sparse_csr...
        text = [r.dtype if type(r) is TensorRef else tensor_kinds.describe(r) for r in refs]
        kinds = Counter(t if type(r) is TensorRef else t.split(" per_")[0].split(" nnz")[0] for t, r in zip(text, refs))
    if plain and len(set(map(id, map(attrgetter("storage"), refs)))) == len(refs):
        total = sum(sizes)  # each tensor its own storage: no two share a view key (its first part), none is tied
    else:
        total = sum(dict(zip(map(methodcaller("view_key"), refs), sizes)).values())  # tied names: one tensor
    rows = list(map(TensorInfo, map(TreePath.name, paths[:limit]), text, map(list, shapes), sizes))
    return len(refs), total, dict(kinds), rows


def _tensors_of(root) -> tuple:
    """([TreePath], [tensor]) of every kind, in file order."""
    paths: list = []
    refs: list = []
    tree.walk(root, lambda path, node: (paths.append(path), refs.append(node)), kinds=TENSOR_KINDS)
    return paths, refs


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


GETATTR = ("builtins", "getattr")
_NOTHING_WRITTEN = SimpleNamespace(named={}, problems=[])  # a dry run's findings on a tree of plain values


def verdicts(ckpt, allow_globals=(), plain=False) -> dict:
    """{safe|unknown|dangerous: [dotted names]} for a checkpoint read by any format, each name judged in the roles
    the file gives it: from the pickle's opcodes (``ckpt.globals``), and from the records and references of the tree
    as ckconv would write them (the only roles formats without pickle opcodes have: safetensors structure, DCP);
    and {code: [record names]} for one that holds code (a TorchScript archive, an exported program's graph).
    ``plain``: the caller found only :data:`_PLAIN` values in the tree (:class:`_Survey`), which the writer's dry run
    would write naming no global and finding no problem: it is not run."""
    written = _NOTHING_WRITTEN if plain else dry_run(ckpt.root, allow_globals)
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


