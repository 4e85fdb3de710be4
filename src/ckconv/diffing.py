"""``ckconv diff``: are two checkpoints the same, whatever their formats?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import tree
from .model import Foreign, TensorRef


@dataclass
class TensorDiff:
    name: str
    dtype: str
    shape: list
    other_dtype: str
    other_shape: list
    max_abs_diff: float | None  # None when dtypes or shapes differ


@dataclass
class DiffReport:
    a: str
    b: str
    only_in_a: list = field(default_factory=list)
    only_in_b: list = field(default_factory=list)
    tensors_differ: list = field(default_factory=list)  # [TensorDiff]
    values_differ: list = field(default_factory=list)  # [{name, a, b}]
    tensors_compared: int = 0
    values_compared: int = 0

    @property
    def equal(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.tensors_differ or self.values_differ)

    def to_dict(self):
        d = asdict(self)
        d["equal"] = self.equal
        return d


def leaves(root) -> dict:
    """{dotted path: leaf}, with container types recorded so dict-vs-list changes show up."""
    out = {}

    def visit(path, node):
        name = tree.format_path(path)
        if isinstance(node, TensorRef):
            out[name] = node
        elif isinstance(node, (dict, list, tuple, set, frozenset, Foreign)):
            out[name + "/type"] = _type_name(node)
        else:
            out[name] = node
    tree.walk(root, visit)
    return out


def _type_name(node):
    return node.class_name if isinstance(node, Foreign) else type(node).__name__


def diff(a, b) -> DiffReport:
    from .api import read

    ca, cb = read(a), read(b)
    la, lb = leaves(ca.root), leaves(cb.root)
    report = DiffReport(str(a), str(b))
    report.only_in_a = [k for k in la if k not in lb]
    report.only_in_b = [k for k in lb if k not in la]
    for key, va in la.items():
        if key not in lb:
            continue
        vb = lb[key]
        if isinstance(va, TensorRef) and isinstance(vb, TensorRef):
            report.tensors_compared += 1
            d = compare_tensors(key, va, vb)
            if d is not None:
                report.tensors_differ.append(d)
        else:
            report.values_compared += 1
            if type(va) is not type(vb) or not _same(va, vb):
                report.values_differ.append({"name": key, "a": repr(va)[:80], "b": repr(vb)[:80]})
    return report


def _same(x, y):
    if isinstance(x, float) and x != x:
        return y != y
    return x == y


def compare_tensors(name, a: TensorRef, b: TensorRef):
    if a.dtype != b.dtype or a.shape != b.shape:
        return TensorDiff(name, a.dtype, list(a.shape), b.dtype, list(b.shape), None)
    if _bytes(a) == _bytes(b):
        return None
    return TensorDiff(name, a.dtype, list(a.shape), b.dtype, list(b.shape), _max_abs_diff(a, b))


def _bytes(ref):
    return b"".join(bytes(c) for c in ref.chunks())


def _max_abs_diff(a, b):
    ta, tb = tree.materialize(a), tree.materialize(b)
    if ta.numel() == 0:
        return 0.0
    if ta.dtype.is_complex:
        return float((ta - tb).abs().max())
    if ta.dtype.is_floating_point:
        da, db = ta.double(), tb.double()
        diff = (da - db).abs()
        diff[da.isnan() & db.isnan()] = 0
        return float(diff.max())
    if ta.dtype == tb.dtype and str(ta.dtype) == "torch.bool":
        return float((ta != tb).any())
    return float((ta.long() - tb.long()).abs().max()) if ta.numel() else 0.0
