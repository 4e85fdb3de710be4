"""``ckconv diff``: are two checkpoints the same, whatever their formats?

Tensors decide. Two checkpoints are equal when they hold the same tensor names with equal tensors (bit for bit in
the same dtype, or within ``atol``/``rtol`` across dtypes) and the same non-tensor values (epoch, lr: compared
exactly, tolerance never applies to them). How the values are held -- container types (dict vs OrderedDict, tuple
vs list), key order, the ``_metadata`` attribute torch's state_dicts carry (``@attrs``), parameter flags, dtypes
under a tolerance -- is reported as notes, which make checkpoints differ only with ``strict``.

Tensor bytes are streamed in blocks of :data:`ckconv.tensorvalues.BLOCK_ELEMENTS` elements, never materialised.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from . import dtypes, tensorvalues, tree
from .errors import UsageError
from .model import Checkpoint, Foreign, TensorRef

ATTRS = "@attrs"  # the path component tree.walk gives a dict's attributes (OrderedDict._metadata)


@dataclass
class TensorDiff:
    name: str
    dtype: str
    shape: list
    other_dtype: str
    other_shape: list
    max_abs_diff: float | int | None  # None when the shapes differ; NaN when one side has NaN where the other not
    mismatched: int | None = None  # elements that differ (bits in exact mode) or fall outside the tolerance
    numel: int = 0
    equal: bool = True  # counts towards the verdict: shapes, values and (in exact mode) dtypes agree
    identical: bool = True  # same dtype, same shape, same bytes


@dataclass
class Note:
    """A difference in how things are held, not in what: fails the comparison only with ``strict``."""

    path: str
    kind: str  # container, key-order, attrs, dtype, flags, structure
    detail: str


@dataclass
class DiffReport:
    a: str
    b: str
    atol: float | None = None
    rtol: float | None = None
    strict: bool = False
    tensors_only: bool = False
    only_in_a: list = field(default_factory=list)
    only_in_b: list = field(default_factory=list)
    tensors_differ: list = field(default_factory=list)  # [TensorDiff], the ones that count
    values_differ: list = field(default_factory=list)  # [{name, a, b}]
    notes: list = field(default_factory=list)  # [Note]
    tensors: list = field(default_factory=list)  # [TensorDiff] for every tensor compared
    tensors_compared: int = 0
    values_compared: int = 0

    @property
    def tolerant(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def equal(self) -> bool:
        differs = self.only_in_a or self.only_in_b or self.tensors_differ or self.values_differ
        return not differs and not (self.strict and self.notes)

    @property
    def max_abs_diff(self):
        """The largest max abs diff over tensors of equal shapes (NaN when any has a NaN mismatch); None if none."""
        values = [t.max_abs_diff for t in self.tensors if t.max_abs_diff is not None]
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            return math.nan
        return max(values, default=None)

    def to_dict(self):
        d = asdict(self)
        d.update(equal=self.equal, tensors_differing=len(self.tensors_differ), max_abs_diff=self.max_abs_diff,
                 values_differing=len(self.values_differ))
        for entry in (d, *d["tensors"], *d["tensors_differ"]):  # JSON has no NaN or infinity
            if isinstance(entry["max_abs_diff"], float) and not math.isfinite(entry["max_abs_diff"]):
                entry["max_abs_diff"] = str(entry["max_abs_diff"])
        return d


def diff(a, b, *, atol: float | None = None, rtol: float | None = None, strict: bool = False,
         tensors_only: bool = False) -> DiffReport:
    """Compare two checkpoints (paths in any format ckconv reads, :class:`Checkpoint` objects or torch objects).

    Without ``atol``/``rtol`` tensors must match bit for bit in the same dtype. With either (the other defaults to
    0), values are compared across dtypes, ``|a - b| <= atol + rtol * |b|`` elementwise like ``torch.allclose``
    except that NaN equals NaN; a dtype difference is then a note. ``tensors_only`` ignores every non-tensor value
    and all structure; ``strict`` makes notes count as differences.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{name} must be a finite number >= 0, not {value!r}")
    report = DiffReport(str(a), str(b), atol, rtol, strict, tensors_only)
    sa, sb = _Side(_checkpoint(a).root), _Side(_checkpoint(b).root)
    _compare_tensors(report, sa.tensors, sb.tensors)
    if not tensors_only:
        _compare_values(report, sa, sb)
        _compare_structure(report, sa, sb)
    return report


def _checkpoint(source) -> Checkpoint:
    if isinstance(source, Checkpoint):
        return source
    from .api import _as_checkpoint, read  # api sits above this module's readers; imported when diff runs

    return read(source) if isinstance(source, (str, os.PathLike)) else _as_checkpoint(source)


# --- flattening -------------------------------------------------------------------------------------------------

class _Side:
    """One checkpoint flattened to dotted names: tensors, values, containers and ``@attrs`` entries."""

    def __init__(self, root):
        self.tensors: dict = {}
        self.values: dict = {}
        self.containers: dict = {}  # name -> (type name, [child names] for dicts, parent name)
        self.attrs: dict = {}  # attribute group ("@attrs._metadata") -> {name: value or type name}
        tree.walk(root, self._visit)

    def _visit(self, path, node):
        path = tuple(path)  # the name spells the whole path anyway
        if path and path[-1] == ATTRS:
            return  # the attribute dict itself; its entries are grouped below
        name = self._unique(tree.format_path(path), path)
        if isinstance(node, TensorRef):
            self.tensors[name] = node
            return
        group = _attrs_group(path)
        container = isinstance(node, (*tree.CONTAINERS, Foreign))
        if group is not None:
            self.attrs.setdefault(group, {})[name] = _type_name(node) if container else _Value(node)
        elif container:
            keys = [tree.format_path(path + (k,)) for k in node] if isinstance(node, dict) else None
            parent = tree.format_path(path[:-1]) if path else None
            self.containers[name] = (_type_name(node), keys, parent)
        else:
            self.values[name] = node

    def _unique(self, name, path):
        # {"a.b": x} and {"a": {"b": y}} flatten to one name: the second keeps its full path.
        if name in self.tensors or name in self.values or name in self.containers:
            return repr(path)
        return name


def _attrs_group(path):
    if ATTRS not in path:
        return None
    i = path.index(ATTRS)
    return tree.format_path(path[:i + 2])


def _type_name(node):
    return node.class_name if isinstance(node, Foreign) else type(node).__name__


class _Value:
    """A non-tensor value compared by type and value, NaN equal to NaN."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __eq__(self, other):
        return isinstance(other, _Value) and _same(self.v, other.v)


def _same(x, y):
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and x != x:
        return y != y
    return x == y


# --- comparing --------------------------------------------------------------------------------------------------

def _compare_tensors(report, ta, tb):
    report.only_in_a += [k for k in ta if k not in tb]
    report.only_in_b += [k for k in tb if k not in ta]
    casts: dict = {}
    for name, ra in ta.items():
        if name not in tb:
            continue
        rb = tb[name]
        report.tensors_compared += 1
        d = compare_tensors(name, ra, rb, report.atol, report.rtol)
        report.tensors.append(d)
        if not d.equal:
            report.tensors_differ.append(d)
        elif d.dtype != d.other_dtype:
            casts.setdefault((d.dtype, d.other_dtype), []).append(name)
        flags_a, flags_b = _flags(ra), _flags(rb)
        if flags_a != flags_b:
            report.notes.append(Note(name, "flags", f"{flags_a} in A, {flags_b} in B"))
    for (dtype_a, dtype_b), names in casts.items():  # one note per cast, not one per tensor
        where = names[0] if len(names) == 1 else f"{len(names)} tensors ({names[0]}, ...)"
        report.notes.append(Note(where, "dtype", f"{dtype_a} in A, {dtype_b} in B (within tolerance)"))


def _flags(ref):
    kind = "Parameter" if ref.parameter else "tensor"
    return f"{kind}, requires_grad={ref.requires_grad}"


def compare_tensors(name, a: TensorRef, b: TensorRef, atol=None, rtol=None) -> TensorDiff:
    """Stream both tensors and compare them element by element; see :func:`diff` for the rules."""
    d = TensorDiff(name, a.dtype, list(a.shape), b.dtype, list(b.shape), None, numel=a.numel)
    if a.shape != b.shape:
        d.equal = d.identical = False
        return d
    tolerant = atol is not None or rtol is not None
    atol, rtol = atol or 0.0, rtol or 0.0
    same_dtype = a.dtype == b.dtype
    as_kind = tensorvalues.common_kind(a.dtype, b.dtype)
    tops, mismatched, bytes_differ = [], 0, False
    for block_a, block_b in zip(tensorvalues.blocks(a), tensorvalues.blocks(b)):
        if same_dtype and block_a == block_b:
            continue
        bytes_differ = True
        x = tensorvalues.decode(block_a, a.dtype, as_kind)
        y = tensorvalues.decode(block_b, b.dtype, as_kind)
        delta = tensorvalues.abs_diff(x, y, as_kind)
        if delta.size:
            tops.append(delta.max())
        if tolerant or not same_dtype:
            mismatched += int(np.count_nonzero(tensorvalues.outside(delta, y, atol, rtol, as_kind)))
        else:
            mismatched += _bit_mismatches(block_a, block_b, dtypes.itemsize(a.dtype))
    if as_kind == "int":
        d.max_abs_diff = int(max(tops, default=0))
    else:
        d.max_abs_diff = math.nan if any(math.isnan(t) for t in tops) else float(max(tops, default=0.0))
    d.mismatched = mismatched
    d.identical = same_dtype and not bytes_differ
    d.equal = mismatched == 0 and (same_dtype or tolerant)
    return d


def _bit_mismatches(x: bytes, y: bytes, itemsize: int) -> int:
    bx = np.frombuffer(x, np.uint8).reshape(-1, itemsize)
    by = np.frombuffer(y, np.uint8).reshape(-1, itemsize)
    return int(np.count_nonzero((bx != by).any(axis=1)))


def _compare_values(report, sa, sb):
    report.only_in_a += [k for k in sa.values if k not in sb.values]
    report.only_in_b += [k for k in sb.values if k not in sa.values]
    for name, va in sa.values.items():
        if name not in sb.values:
            continue
        vb = sb.values[name]
        report.values_compared += 1
        if not _same(va, vb):
            report.values_differ.append({"name": name, "a": _short(va), "b": _short(vb)})


def _short(value):
    text = tree.key_text(value) if type(value) is int else repr(value)  # str() refuses ints past 4,300 digits
    return text if len(text) <= 80 else text[:77] + "..."


def _compare_structure(report, sa, sb):
    ca, cb = sa.containers, sb.containers
    for name, (type_a, keys_a, parent) in ca.items():
        if name not in cb:
            if parent is None or parent in cb:  # the topmost container B lacks, not each one inside it
                report.notes.append(Note(name, "structure", f"{type_a} only in A"))
            continue
        type_b, keys_b, _ = cb[name]
        if type_a != type_b:
            report.notes.append(Note(name, "container", f"{type_a} in A, {type_b} in B"))
        if keys_a and keys_b:
            common = set(keys_a) & set(keys_b)
            if [k for k in keys_a if k in common] != [k for k in keys_b if k in common]:
                report.notes.append(Note(name, "key-order", "the same keys in a different order"))
    for name, (type_b, _, parent) in cb.items():
        if name not in ca and (parent is None or parent in ca):
            report.notes.append(Note(name, "structure", f"{type_b} only in B"))
    for group in {**sa.attrs, **sb.attrs}:
        ga, gb = sa.attrs.get(group), sb.attrs.get(group)
        if ga is None or gb is None:
            side, entries = ("A", ga) if gb is None else ("B", gb)
            values = sum(isinstance(v, _Value) for v in entries.values())
            report.notes.append(Note(group, "attrs", f"only in {side} ({values} values)"))
        elif ga != gb:
            changed = sum(1 for k in ga.keys() | gb.keys() if ga.get(k) != gb.get(k))
            report.notes.append(Note(group, "attrs", f"{changed} entries differ"))


def printable(text) -> str:
    """A name or value for the terminal: control characters and the like escaped (names come from files)."""
    text = str(text)
    return text if text.isprintable() else ascii(text)[1:-1]


# --- rendering --------------------------------------------------------------------------------------------------

SHOWN = 100  # lines per kind of difference in the text rendering; --json carries all


def render(report: DiffReport) -> str:
    """The text form of a report: differences, then the notes block, then one summary line."""
    lines = []

    def listing(items, line):
        for item in items[:SHOWN]:
            lines.append(line(item))
        if len(items) > SHOWN:
            lines.append(f"... and {len(items) - SHOWN} more (see --json)")

    listing(report.only_in_a, lambda k: f"only in A: {printable(k)}")
    listing(report.only_in_b, lambda k: f"only in B: {printable(k)}")
    listing(report.tensors_differ, lambda d: f"differs: {printable(d.name)}: {_tensor_text(d)}")
    listing(report.values_differ, lambda v: f"differs: {printable(v['name'])}: {printable(v['a'])} vs "
                                            f"{printable(v['b'])}")
    if report.notes:
        lines.append("notes (counted as differences: --strict):" if report.strict
                     else "notes (how things are held; they make a difference only with --strict):")
        listing(report.notes, lambda n: f"  {printable(n.path)}: {printable(n.detail)}")
    verdict = "equal" if report.equal else "different"
    if report.equal and report.tolerant:
        verdict += f" within atol={report.atol or 0:g}, rtol={report.rtol or 0:g}"
    parts = [f"{_count(report.tensors_compared, 'tensor')}, {_count(report.values_compared, 'value')} compared"]
    if report.tensors_differ:
        parts.append(_count(len(report.tensors_differ), "tensor") + " differ")
    not_identical = sum(1 for t in report.tensors if not t.identical)
    if not_identical:
        parts.append(f"{not_identical} not bit-identical, max abs diff {_number(report.max_abs_diff)}")
    if report.values_differ:
        parts.append(_count(len(report.values_differ), "value") + " differ")
    if report.only_in_a or report.only_in_b:
        parts.append(f"{len(report.only_in_a)} only in A, {len(report.only_in_b)} only in B")
    if report.notes:
        parts.append(_count(len(report.notes), "note"))
    lines.append(f"{verdict} ({'; '.join(parts)})")
    return "\n".join(lines)


def _tensor_text(d: TensorDiff) -> str:
    if d.max_abs_diff is None:
        return f"shape {d.shape} vs {d.other_shape}" + (f", dtype {d.dtype} vs {d.other_dtype}"
                                                        if d.dtype != d.other_dtype else "")
    text = f"max abs diff {_number(d.max_abs_diff)} ({d.mismatched} of {d.numel} elements differ)"
    return text if d.dtype == d.other_dtype else f"dtype {d.dtype} vs {d.other_dtype}, {text}"


def _number(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")
