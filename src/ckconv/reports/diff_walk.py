"""The lockstep walk behind ``ckconv diff``: both trees walked together, so the work is O(nodes) and names are
built only for what is reported.

Tensors go to :func:`ckconv.reports.diff_tensors.compare_tensors`; parts held differently on the two sides are
matched by dotted name (:class:`ckconv.reports.diff_names.Named`); findings go into a
:class:`ckconv.reports.diff_report.DiffReport`, each list bounded.
"""

from __future__ import annotations

import itertools

from .. import tensor_kinds, tree
from ..model import Foreign, TensorRef
from .diff_names import ATTRS, Named, Value, is_container, same_value, type_name
from .diff_report import DiffReport, Note, TensorDiff
from .diff_tensors import compare_tensors


def _name(path, rel=()) -> str:
    """The dotted name of ``path`` (a :class:`tree.TreePath` or tuple) followed by ``rel``, shortened in the
    middle past :data:`tree.MAX_NAME_CHARS`."""
    return tree.short_path((*path, *rel))


def _head(key) -> str:
    """The first dotted component of a key's name: only keys sharing it can spell the same dotted names."""
    return tree.key_text(key).split(".", 1)[0]


def _meta(node):
    """A dict's attributes (torch's ``_metadata``), shown by tree.walk as the child ``@attrs``; None if none."""
    return (getattr(node, "__dict__", None) or None) if isinstance(node, dict) else None


def _keyed(node) -> bool:
    return isinstance(node, dict) or isinstance(node, Foreign)


def _width(node) -> int:
    return len(node) if isinstance(node, tree.CONTAINERS) else 4


class Lockstep:
    """Walks A and B together: each container pair's children are paired by key (or index), tensors compared,
    values compared; what one side lacks is reported from that side alone; keys that differ but could spell the
    same dotted names are handed to :class:`Named`. Runs on an explicit stack of generators (no recursion)."""

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
        if tensor_kinds.is_special(a) or tensor_kinds.is_special(b):
            self.kind(path, a, b)
        elif isinstance(a, TensorRef) and isinstance(b, TensorRef):
            self.tensor(path, a, b)
        elif is_container(a) and is_container(b):
            yield from self._containers(path, a, b)
        elif not (is_container(a) or is_container(b) or isinstance(a, TensorRef) or isinstance(b, TensorRef)):
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

    def kind(self, path, a, b):
        """Quantized or sparse tensors (tensor_kinds), part by part: the tensors among the parts compared as
        tensors, the rest (qscheme, axis, layout, size) as values; a kind against another kind is one value."""
        if type(a) is not type(b) or len(tensor_kinds.parts(a)) != len(tensor_kinds.parts(b)):
            self.r.values_compared += 1
            what = (tensor_kinds.describe(a), tensor_kinds.describe(b))
            self.r.add("values_differ", lambda: {"name": _name(path), "a": what[0], "b": what[1]})
            return
        for (name, x), (_, y) in zip(tensor_kinds.parts(a), tensor_kinds.parts(b)):
            where = path if name is None else tree.TreePath(path, name)
            if isinstance(x, TensorRef) and isinstance(y, TensorRef):
                self.tensor(where, x, y)
            else:  # a scale or a size is part of the tensor's value: compared with --tensors-only too
                self.r.values_compared += 1
                if not same_value(x, y):
                    self.r.add("values_differ", lambda w=where, x=x, y=y: {"name": _name(w), "a": _short(x),
                                                                           "b": _short(y)})

    def value(self, path, a, b):
        if not self.values:
            return
        self.r.values_compared += 1
        if not same_value(a, b):
            self.r.add("values_differ", lambda: {"name": _name(path), "a": _short(a), "b": _short(b)})

    def _containers(self, path, a, b):
        if type_name(a) != type_name(b):
            self.note(path, "container", f"{type_name(a)} in A, {type_name(b)} in B")
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
        if tensor_kinds.is_special(x) or tensor_kinds.is_special(y):
            self.kind(tree.TreePath(path, key), x, y)
        elif isinstance(x, TensorRef) and isinstance(y, TensorRef):
            self.tensor(tree.TreePath(path, key), x, y)
        elif is_container(x) and is_container(y):
            return self._containers(tree.TreePath(path, key), x, y)
        elif is_container(x) or is_container(y) or isinstance(x, TensorRef) or isinstance(y, TensorRef):
            tangled[0].append((key, x))
            tangled[1].append((key, y))
        elif self.values:
            self.r.values_compared += 1
            if not same_value(x, y):
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
        if is_container(node):
            self.note(where, "structure", f"{type_name(node)} only in {'AB'[side]}")
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
                if g is not None and not is_container(n):
                    groups[g] = groups.get(g, 0) + 1
                elif g is None and not is_container(n) and self.values:
                    self.r.add(kind, lambda: _name(p))
            if is_container(n) and not (isinstance(n, Foreign) and id(n) in open_ids):
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
            elif is_container(x) and is_container(y):
                changed += type_name(x) != type_name(y)
                ia = id(x) if isinstance(x, Foreign) else None
                ib = id(y) if isinstance(y, Foreign) else None
                if ia in open_ids[0] or ib in open_ids[1]:
                    continue  # a back-reference: compared by class
                if ia is not None:
                    open_ids[0].add(ia)
                if ib is not None:
                    open_ids[1].add(ib)
                stack.append((ia, ib, _child_pairs(q, x, y)))
            elif is_container(x) or is_container(y) or isinstance(x, TensorRef) or isinstance(y, TensorRef):
                changed += self._alone(0, q, x, "", {}) + self._alone(1, q, y, "", {})
            elif not same_value(x, y):
                changed += 1
        return changed

    # parts held differently on the two sides: matched by dotted name

    def named(self, path, items_a, items_b):
        prefix = _name(path) if path else None
        sa, sb = Named(items_a, self), Named(items_b, self)

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
                if not same_value(va, vb):
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
                values = sum(isinstance(v, Value) for v in entries.values())
                self.note(full(group), "attrs", f"only in {side} ({values} values)")
            elif ga != gb:
                changed = sum(1 for k in ga.keys() | gb.keys() if ga.get(k) != gb.get(k))
                self.note(full(group), "attrs", f"{changed} entries differ")


_MISSING = object()
_PLAIN = frozenset((type(None), bool, int, str, bytes))  # leaves whose == is same_value when their types agree


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


def _flags(ref):
    kind = "Parameter" if ref.parameter else "tensor"
    return f"{kind}, requires_grad={ref.requires_grad}"


def _short(value):
    text = tree.key_text(value) if type(value) is int else repr(value)  # str() refuses ints past 4,300 digits
    return text if len(text) <= 80 else text[:77] + "..."
