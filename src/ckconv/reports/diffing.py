"""``ckconv diff``: are two checkpoints the same, whatever their formats?

Tensors decide. Two checkpoints are equal when they hold the same tensor names with equal tensors (bit for bit in
the same dtype, or within ``atol``/``rtol`` across dtypes) and the same non-tensor values (epoch, lr: compared
exactly, tolerance never applies to them). How the values are held -- container types (dict vs OrderedDict, tuple
vs list), key order, the ``_metadata`` attribute torch's state_dicts carry (``@attrs``), parameter flags, dtypes
under a tolerance -- is reported as notes, which make checkpoints differ only with ``strict``.

Tensor bytes are streamed in blocks of :data:`ckconv.reports.tensorvalues.BLOCK_ELEMENTS` elements, never materialised.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import dtypes, tree
from . import tensorvalues
from ..errors import LimitExceeded, UsageError
from ..model import Checkpoint, Foreign, TensorRef

ATTRS = "@attrs"  # the path component tree.walk gives a dict's attributes (OrderedDict._metadata)

MAX_LISTED = int(os.environ.get("CKCONV_DIFF_MAX_LISTED", 100_000))  # entries per list of a report; more counted
MAX_NAMED_CHARS = 1 << 27  # names built to match differently-structured parts by dotted name, all together


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
    """What :func:`diff` found. Each list holds at most :data:`MAX_LISTED` entries; ``omitted`` counts the rest
    per list (``{"only_in_a": 12}``), so a file with millions of differences costs bounded memory."""

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
    omitted: dict = field(default_factory=dict)  # {list name: entries not listed}

    def __post_init__(self):
        self._top = None  # the largest max abs diff so far (NaN wins), over every tensor compared
        self.not_identical = 0

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
        return self._top

    def count(self, kind) -> int:
        """How many entries ``kind`` (``"only_in_a"``, ``"notes"``, ...) has, listed or not."""
        return len(getattr(self, kind)) + self.omitted.get(kind, 0)

    def add(self, kind, make):
        """Append ``make()`` to list ``kind`` while it has room; past that only count (``make`` never called)."""
        items = getattr(self, kind)
        if len(items) < MAX_LISTED:
            items.append(make())
        else:
            self.omitted[kind] = self.omitted.get(kind, 0) + 1

    def to_dict(self):
        d = asdict(self)
        d.update(equal=self.equal, tensors_differing=self.count("tensors_differ"), max_abs_diff=self.max_abs_diff,
                 values_differing=self.count("values_differ"))
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

    Tensors and values are matched by dotted name. Both trees are walked in lockstep, so the work is O(nodes) and
    names are built only for what is reported; parts held differently on the two sides (``{"a.b": t}`` against
    ``{"a": {"b": t}}``, a list against a dict) are matched by their dotted names.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{name} must be a finite number >= 0, not {value!r}")
    report = DiffReport(_label(a), _label(b), atol, rtol, strict, tensors_only)
    root_a, root_b = _checkpoint(a).root, _checkpoint(b).root
    for root in (root_a, root_b):
        tree.walk(root)  # cycles, depth and size bombs refused first, exactly as everywhere else
    _Lockstep(report).run(root_a, root_b)
    return report


def _label(source) -> str:
    """What the report calls a side: a path, never the repr of a whole tree."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Checkpoint):
        return str(source.path or "<checkpoint>")
    return f"<{type(source).__name__}>"


def _checkpoint(source) -> Checkpoint:
    if isinstance(source, Checkpoint):
        return source
    from ..api import _as_checkpoint, read  # api sits above this module's readers; imported when diff runs

    return read(source) if isinstance(source, (str, os.PathLike)) else _as_checkpoint(source)


# --- names, built only for what is reported ----------------------------------------------------------------------

def _name(path, rel=()) -> str:
    """The dotted name of ``path`` (a :class:`tree.TreePath` or tuple) followed by ``rel``, shortened in the
    middle past :data:`tree.MAX_NAME_CHARS`."""
    return tree.short_path((*path, *rel))


def _head(key) -> str:
    """The first dotted component of a key's name: only keys sharing it can spell the same dotted names."""
    return tree.key_text(key).split(".", 1)[0]


def _is_container(node) -> bool:
    return isinstance(node, tree.CONTAINERS) or isinstance(node, Foreign)


def _type_name(node):
    return node.class_name if isinstance(node, Foreign) else type(node).__name__


def _meta(node):
    """A dict's attributes (torch's ``_metadata``), shown by tree.walk as the child ``@attrs``; None if none."""
    return (getattr(node, "__dict__", None) or None) if isinstance(node, dict) else None


def _keyed(node) -> bool:
    return isinstance(node, dict) or isinstance(node, Foreign)


def _width(node) -> int:
    return len(node) if isinstance(node, tree.CONTAINERS) else 4


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


# --- the lockstep walk ---------------------------------------------------------------------------------------

class _Lockstep:
    """Walks A and B together: each container pair's children are paired by key (or index), tensors compared,
    values compared; what one side lacks is reported from that side alone; keys that differ but could spell the
    same dotted names are handed to :class:`_Named`. Runs on an explicit stack of generators (no recursion)."""

    def __init__(self, report: DiffReport):
        self.r = report
        self.values = not report.tensors_only
        self.compared: dict = {}  # (view key in A, view key in B) -> TensorDiff: a tensor referenced again is free
        self.casts: dict = {}  # (dtype in A, dtype in B) -> [count, first name]
        self.open = (set(), set())  # ids of foreign records open on each side: met again, a back-reference
        self.named_chars = 0

    def run(self, a, b):
        stack = [self._node(tree.ROOT, a, b)]
        while stack:
            task = next(stack[-1], None)
            if task is None:
                stack.pop()
            else:
                stack.append(task)
        for (dtype_a, dtype_b), (n, first) in self.casts.items():  # one note per cast, not one per tensor
            where = first if n == 1 else f"{n} tensors ({first}, ...)"
            self.note(where, "dtype", f"{dtype_a} in A, {dtype_b} in B (within tolerance)")

    def note(self, path, kind, detail):
        if self.values:
            self.r.add("notes", lambda: Note(path if isinstance(path, str) else _name(path), kind, detail))

    # one pair of nodes at the same path

    def _node(self, path, a, b):
        if isinstance(a, TensorRef) and isinstance(b, TensorRef):
            self.tensor(path, a, b)
        elif _is_container(a) and _is_container(b):
            yield from self._containers(path, a, b)
        elif not (_is_container(a) or _is_container(b) or isinstance(a, TensorRef) or isinstance(b, TensorRef)):
            self.value(path, a, b)
        else:  # a tensor against a value, a container against a leaf: by dotted name
            self.named(path, [(None, a)], [(None, b)])

    def tensor(self, path, a, b, name=None):
        r = self.r
        r.tensors_compared += 1
        key = (a.view_key(), b.view_key())
        d = self.compared.get(key)
        name = name if name is not None else _name(path)
        if d is None:
            d = self.compared[key] = compare_tensors(name, a, b, r.atol, r.rtol)
        elif d.name != name:
            d = TensorDiff(name, d.dtype, d.shape, d.other_dtype, d.other_shape, d.max_abs_diff, d.mismatched,
                           d.numel, d.equal, d.identical)
        r.add("tensors", lambda: d)
        if d.max_abs_diff is not None:
            top = r._top
            if top is None or (d.max_abs_diff != d.max_abs_diff) or (top == top and d.max_abs_diff > top):
                r._top = d.max_abs_diff
        r.not_identical += not d.identical
        if not d.equal:
            r.add("tensors_differ", lambda: d)
        elif d.dtype != d.other_dtype:
            self.casts.setdefault((d.dtype, d.other_dtype), [0, name])[0] += 1
        flags_a, flags_b = _flags(a), _flags(b)
        if flags_a != flags_b:
            self.note(name, "flags", f"{flags_a} in A, {flags_b} in B")

    def value(self, path, a, b):
        if not self.values:
            return
        self.r.values_compared += 1
        if not _same(a, b):
            self.r.add("values_differ", lambda: {"name": _name(path), "a": _short(a), "b": _short(b)})

    def _containers(self, path, a, b):
        if _type_name(a) != _type_name(b):
            self.note(path, "container", f"{_type_name(a)} in A, {_type_name(b)} in B")
        if isinstance(a, Foreign) or isinstance(b, Foreign):
            back = (isinstance(a, Foreign) and id(a) in self.open[0], isinstance(b, Foreign) and id(b) in self.open[1])
            if any(back):  # a record reached again inside its own state: compared by class, not descended into
                return
        for side, node in enumerate((a, b)):
            if isinstance(node, Foreign):
                self.open[side].add(id(node))
        try:
            self.attrs(path, _meta(a), _meta(b))
            if isinstance(a, dict) and isinstance(b, dict) and self.values:
                self._key_order(path, a, b)
            if _keyed(a) and _keyed(b):
                yield from self._by_key(path, a, b)
            elif not (_keyed(a) or _keyed(b)):
                yield from self._by_index(path, a, b)
            else:
                yield from self._unpaired(path, a, b)
        finally:
            for side, node in enumerate((a, b)):
                if isinstance(node, Foreign):
                    self.open[side].discard(id(node))

    def _key_order(self, path, a, b):
        common_a = (k for k in a if k in b)
        common_b = (k for k in b if k in a)
        if any(x != y for x, y in zip(common_a, common_b)):
            self.note(path, "key-order", "the same keys in a different order")

    def _pair(self, path, key, x, y, tangled):
        """Children of a pair under one key: compared here when both are leaves of one kind, else descended into;
        a tensor against a value (or a container against a leaf) joins the by-name ``tangled`` lists."""
        if isinstance(x, TensorRef) and isinstance(y, TensorRef):
            self.tensor(tree.TreePath(path, key), x, y)
        elif _is_container(x) and _is_container(y):
            return self._containers(tree.TreePath(path, key), x, y)
        elif _is_container(x) or _is_container(y) or isinstance(x, TensorRef) or isinstance(y, TensorRef):
            tangled[0].append((key, x))
            tangled[1].append((key, y))
        elif self.values:
            self.r.values_compared += 1
            if not _same(x, y):
                self.r.add("values_differ", lambda: {"name": _name(path, (key,)), "a": _short(x), "b": _short(y)})
        return None

    def _by_index(self, path, a, b):
        tangled = ([], [])
        same = 0  # equal plain values, counted at the end: the loop a wide list spends its time in
        for i, (x, y) in enumerate(itertools.zip_longest(a, b, fillvalue=_MISSING)):
            if (x is y or (type(x) is type(y) and x == y)) and type(x) in _PLAIN:
                same += 1
            elif x is _MISSING or y is _MISSING:  # a longer side's tail: only there (it spells no shared name)
                self.only(int(x is _MISSING), path, i, y if x is _MISSING else x)
            else:
                task = self._pair(path, i, x, y, tangled)
                if task is not None:
                    yield task
        if self.values:
            self.r.values_compared += same
        if tangled[0]:
            self.named(path, *tangled)

    def _by_key(self, path, a, b):
        tangled = ([], [])
        lookup_a = a if isinstance(a, dict) else dict(tree.entries(a))
        lookup_b = b if isinstance(b, dict) else dict(tree.entries(b))
        rest_b = [(k, y) for k, y in tree.entries(b) if k not in lookup_a]
        heads_b = {_head(k) for k, _ in rest_b}
        heads = set()
        for k, x in tree.entries(a):
            if k in lookup_b:
                task = self._pair(path, k, x, lookup_b[k], tangled)
                if task is not None:
                    yield task
            elif heads_b and _head(k) in heads_b:
                tangled[0].append((k, x))
                heads.add(_head(k))
            else:
                self.only(0, path, k, x)
        for k, y in rest_b:
            if heads and _head(k) in heads:
                tangled[1].append((k, y))
            else:
                self.only(1, path, k, y)
        if tangled[0] or tangled[1]:
            self.named(path, *tangled)

    def _unpaired(self, path, a, b):
        """A dict or record against a sequence: no key pairs, but ``0`` and ``"0"`` spell one name."""
        small, big = (0, 1) if _width(a) <= _width(b) else (1, 0)
        nodes = (a, b)
        kept = list(tree.entries(nodes[small]))
        heads = {_head(k) for k, _ in kept}
        tangled = ([], [])
        matched = set()
        for k, x in tree.entries(nodes[big]):
            h = _head(k)
            if h in heads:
                tangled[big].append((k, x))
                matched.add(h)
            else:
                self.only(big, path, k, x)
        for k, x in kept:
            if _head(k) in matched:
                tangled[small].append((k, x))
            else:
                self.only(small, path, k, x)
        if tangled[0] or tangled[1]:
            self.named(path, *tangled)
        return
        yield  # a generator like the other pairings

    # what one side alone holds

    def only(self, side, path, key, node):
        """``node`` (under ``key`` at ``path``) is on one side only: its tensors and values named as only there,
        its topmost container and each attribute group inside it noted."""
        where = tree.TreePath(path, key)
        if _is_container(node):
            self.note(where, "structure", f"{_type_name(node)} only in {'AB'[side]}")
        groups: dict = {}
        self._alone(side, where, node, None, groups)
        for group, values in groups.items():
            self.note(group, "attrs", f"only in {'AB'[side]} ({values} values)")

    def _alone(self, side, start, node, group, groups) -> int:
        """Walk a subtree that one side alone holds: tensors become only-in entries; values too, unless inside an
        attribute group (``groups`` counts them per group name). Returns the non-tensor nodes seen."""
        kind = ("only_in_a", "only_in_b")[side]
        seen = 0
        open_ids: set = set()
        frames: list = []  # (id of an open foreign record or None, its path, its group, is it an @attrs dict, pairs)
        cur = (start, node, group)
        while True:
            p, n, g = cur
            if isinstance(n, TensorRef):
                self.r.add(kind, lambda: _name(p))
            else:
                seen += 1
                if g is not None and not _is_container(n):
                    groups[g] = groups.get(g, 0) + 1
                elif g is None and not _is_container(n) and self.values:
                    self.r.add(kind, lambda: _name(p))
            if _is_container(n) and not (isinstance(n, Foreign) and id(n) in open_ids):
                fid = id(n) if isinstance(n, Foreign) else None
                if fid is not None:
                    open_ids.add(fid)
                frames.append((fid, p, g, False, tree.entries(n)))
                meta = _meta(n)
                if meta:
                    frames.append((None, tree.TreePath(p, ATTRS), g, True, iter(meta.items())))
            while frames:
                fid, fp, fg, is_meta, pairs = frames[-1]
                pair = next(pairs, None)
                if pair is None:
                    frames.pop()
                    open_ids.discard(fid)
                    continue
                cp = tree.TreePath(fp, pair[0])
                cg = fg
                if is_meta and fg is None:
                    cg = _name(cp)
                    groups.setdefault(cg, 0)
                cur = (cp, pair[1], cg)
                break
            else:
                return seen

    # attribute dicts (torch's _metadata): one note per group, never one line per entry

    def attrs(self, path, meta_a, meta_b):
        if meta_a is None and meta_b is None:
            return
        where = tree.TreePath(path, ATTRS)
        ma, mb = meta_a or {}, meta_b or {}
        for k in {**ma, **mb}:
            gp = tree.TreePath(where, k)
            if k in ma and k in mb:
                changed = self._attr_changes(gp, ma[k], mb[k])
                if changed:
                    self.note(gp, "attrs", f"{changed} entries differ")
            else:
                side = 0 if k in ma else 1
                groups = {_name(gp): 0}
                self._alone(side, gp, (ma if side == 0 else mb)[k], _name(gp), groups)
                for group, values in groups.items():
                    self.note(group, "attrs", f"only in {'AB'[side]} ({values} values)")

    def _attr_changes(self, start, x, y) -> int:
        """Entries that differ between two attribute values (order ignored); tensors inside are compared."""
        changed = 0
        open_ids = (set(), set())
        stack: list = [(None, None, iter([(start, x, y)]))]
        while stack:
            fa, fb, pairs = stack[-1]
            item = next(pairs, None)
            if item is None:
                stack.pop()
                open_ids[0].discard(fa)
                open_ids[1].discard(fb)
                continue
            q, x, y = item
            if x is _MISSING or y is _MISSING:
                side = 0 if y is _MISSING else 1
                changed += self._alone(side, q, x if side == 0 else y, "", {})
            elif isinstance(x, TensorRef) and isinstance(y, TensorRef):
                self.tensor(q, x, y)
            elif _is_container(x) and _is_container(y):
                changed += _type_name(x) != _type_name(y)
                ia = id(x) if isinstance(x, Foreign) else None
                ib = id(y) if isinstance(y, Foreign) else None
                if ia in open_ids[0] or ib in open_ids[1]:
                    continue  # a back-reference: compared by class
                if ia is not None:
                    open_ids[0].add(ia)
                if ib is not None:
                    open_ids[1].add(ib)
                stack.append((ia, ib, _child_pairs(q, x, y)))
            elif _is_container(x) or _is_container(y) or isinstance(x, TensorRef) or isinstance(y, TensorRef):
                changed += self._alone(0, q, x, "", {}) + self._alone(1, q, y, "", {})
            elif not _same(x, y):
                changed += 1
        return changed

    # parts held differently on the two sides: matched by dotted name

    def named(self, path, items_a, items_b):
        prefix = _name(path) if path else None
        sa, sb = _Named(items_a, self), _Named(items_b, self)

        def full(name):
            if not name:
                return prefix or "<root>"
            return name if prefix is None else f"{prefix}.{name}"

        r = self.r
        for side, (mine, other) in enumerate(((sa, sb), (sb, sa))):
            kind = ("only_in_a", "only_in_b")[side]
            for name in mine.tensors:
                if name not in other.tensors:
                    r.add(kind, lambda: full(name))
        for name, ra in sa.tensors.items():
            if name in sb.tensors:
                self.tensor(None, ra, sb.tensors[name], name=full(name))
        if not self.values:
            return
        for side, (mine, other) in enumerate(((sa, sb), (sb, sa))):
            kind = ("only_in_a", "only_in_b")[side]
            for name in mine.values:
                if name not in other.values:
                    r.add(kind, lambda: full(name))
        for name, va in sa.values.items():
            if name in sb.values:
                vb = sb.values[name]
                r.values_compared += 1
                if not _same(va, vb):
                    r.add("values_differ", lambda: {"name": full(name), "a": _short(va), "b": _short(vb)})
        ca, cb = sa.containers, sb.containers
        for name, (type_a, keys_a, parent) in ca.items():
            if name not in cb:
                if parent is None or parent in cb:  # the topmost container B lacks, not each one inside it
                    self.note(full(name), "structure", f"{type_a} only in A")
                continue
            type_b, keys_b, _ = cb[name]
            if type_a != type_b:
                self.note(full(name), "container", f"{type_a} in A, {type_b} in B")
            if keys_a and keys_b:
                common = set(keys_a) & set(keys_b)
                if [k for k in keys_a if k in common] != [k for k in keys_b if k in common]:
                    self.note(full(name), "key-order", "the same keys in a different order")
        for name, (type_b, _, parent) in cb.items():
            if name not in ca and (parent is None or parent in ca):
                self.note(full(name), "structure", f"{type_b} only in B")
        for group in {**sa.attrs, **sb.attrs}:
            ga, gb = sa.attrs.get(group), sb.attrs.get(group)
            if ga is None or gb is None:
                side, entries = ("A", ga) if gb is None else ("B", gb)
                values = sum(isinstance(v, _Value) for v in entries.values())
                self.note(full(group), "attrs", f"only in {side} ({values} values)")
            elif ga != gb:
                changed = sum(1 for k in ga.keys() | gb.keys() if ga.get(k) != gb.get(k))
                self.note(full(group), "attrs", f"{changed} entries differ")


_MISSING = object()
_PLAIN = frozenset((type(None), bool, int, str, bytes))  # leaves whose == is _same when their types agree


def _child_pairs(q, x, y):
    """(path, child of x or _MISSING, child of y or _MISSING) for two containers, attributes included."""
    ma, mb = _meta(x), _meta(y)
    if ma or mb:
        yield tree.TreePath(q, ATTRS), ma or _MISSING, mb or _MISSING
    if _keyed(x) and _keyed(y):
        la = x if isinstance(x, dict) else dict(tree.entries(x))
        lb = y if isinstance(y, dict) else dict(tree.entries(y))
        for k, v in tree.entries(x):
            yield tree.TreePath(q, k), v, lb.get(k, _MISSING)
        for k, v in tree.entries(y):
            if k not in la:
                yield tree.TreePath(q, k), _MISSING, v
    elif not (_keyed(x) or _keyed(y)):
        for i, (u, v) in enumerate(itertools.zip_longest(x, y, fillvalue=_MISSING)):
            yield tree.TreePath(q, i), u, v
    else:
        for k, v in tree.entries(x):
            yield tree.TreePath(q, k), v, _MISSING
        for k, v in tree.entries(y):
            yield tree.TreePath(q, k), _MISSING, v


class _Named:
    """Parts of one side flattened to dotted names (relative to where they lie), to match the other side's
    differently-held parts: tensors, values, containers and ``@attrs`` entries. Names cost characters from a
    budget shared by the whole diff (:data:`MAX_NAMED_CHARS`): past it the comparison is refused."""

    def __init__(self, items, owner):
        self.tensors: dict = {}
        self.values: dict = {}
        self.containers: dict = {}  # name -> (type name, [child names] for dicts, parent name)
        self.attrs: dict = {}  # attribute group ("@attrs._metadata") -> {name: value or type name}
        self.owner = owner
        for key, node in items:
            rel = () if key is None else (key,)
            tree.walk(node, lambda p, n: self._visit(rel + tuple(p), n, len(rel)))

    def _text(self, path):
        name = ".".join(tree.key_text(k) for k in path)
        self.owner.named_chars += len(name) + 1
        if self.owner.named_chars > MAX_NAMED_CHARS:
            raise LimitExceeded(f"diff: parts held differently on the two sides spell more than {MAX_NAMED_CHARS} "
                                "characters of names to match; compare the parts that matter (ckconv diff on "
                                "sections converted alone)")
        return name

    def _visit(self, path, node, base):
        if path and path[-1] == ATTRS:
            return  # the attribute dict itself; its entries are grouped below
        name = self._unique(self._text(path), path)
        if isinstance(node, TensorRef):
            self.tensors[name] = node
            return
        group = _attrs_group(path)
        container = _is_container(node)
        if group is not None:
            self.attrs.setdefault(group, {})[name] = _type_name(node) if container else _Value(node)
        elif container:
            keys = [self._text(path + (k,)) for k in node] if isinstance(node, dict) else None
            parent = self._text(path[:-1]) if len(path) > base else None  # the parts' own parent is shared
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
    return ".".join(tree.key_text(k) for k in path[:i + 2])


def _flags(ref):
    kind = "Parameter" if ref.parameter else "tensor"
    return f"{kind}, requires_grad={ref.requires_grad}"


# --- comparing tensors ------------------------------------------------------------------------------------

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


def _short(value):
    text = tree.key_text(value) if type(value) is int else repr(value)  # str() refuses ints past 4,300 digits
    return text if len(text) <= 80 else text[:77] + "..."


def printable(text) -> str:
    """A name or value for the terminal: control characters and the like escaped (names come from files)."""
    text = str(text)
    return text if text.isprintable() else ascii(text)[1:-1]


# --- rendering --------------------------------------------------------------------------------------------------

SHOWN = 100  # lines per kind of difference in the text rendering; --json carries up to MAX_LISTED


def render(report: DiffReport) -> str:
    """The text form of a report: differences, then the notes block, then one summary line."""
    lines = []

    def listing(kind, line):
        items = getattr(report, kind)
        for item in items[:SHOWN]:
            lines.append(line(item))
        if report.count(kind) > SHOWN:
            listed = "" if len(items) == report.count(kind) else f"; --json lists the first {len(items)}"
            lines.append(f"... and {report.count(kind) - SHOWN} more (see --json{listed})")

    listing("only_in_a", lambda k: f"only in A: {printable(k)}")
    listing("only_in_b", lambda k: f"only in B: {printable(k)}")
    listing("tensors_differ", lambda d: f"differs: {printable(d.name)}: {_tensor_text(d)}")
    listing("values_differ", lambda v: f"differs: {printable(v['name'])}: {printable(v['a'])} vs "
                                       f"{printable(v['b'])}")
    if report.notes:
        lines.append("notes (counted as differences: --strict):" if report.strict
                     else "notes (how things are held; they make a difference only with --strict):")
        listing("notes", lambda n: f"  {printable(n.path)}: {printable(n.detail)}")
    verdict = "equal" if report.equal else "different"
    if report.equal and report.tolerant:
        verdict += f" within atol={report.atol or 0:g}, rtol={report.rtol or 0:g}"
    parts = [f"{_count(report.tensors_compared, 'tensor')}, {_count(report.values_compared, 'value')} compared"]
    if report.tensors_differ:
        parts.append(_count(report.count("tensors_differ"), "tensor") + " differ")
    if report.not_identical:
        parts.append(f"{report.not_identical} not bit-identical, max abs diff {_number(report.max_abs_diff)}")
    if report.values_differ:
        parts.append(_count(report.count("values_differ"), "value") + " differ")
    if report.only_in_a or report.only_in_b:
        parts.append(f"{report.count('only_in_a')} only in A, {report.count('only_in_b')} only in B")
    if report.notes:
        parts.append(_count(report.count("notes"), "note"))
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
