"""Parts of a checkpoint spelled as dotted names for ``ckconv diff``, and the node rules the walk shares with them.

Two trees that hold the same tensors differently (``{"a.b": t}`` against ``{"a": {"b": t}}``, a list against a
dict) cannot be paired key by key; :class:`Named` spells each such part's contents as dotted names so that
:class:`ckconv.reports.diff_walk.Lockstep` can match them by name instead.
"""

from __future__ import annotations

from .. import tree
from ..errors import LimitExceeded
from ..model import Foreign, TensorRef

ATTRS = "@attrs"  # the path component tree.walk gives a dict's attributes (OrderedDict._metadata)
MAX_NAMED_CHARS = 1 << 27  # names built to match differently-structured parts by dotted name, all together


def is_container(node) -> bool:
    return isinstance(node, tree.CONTAINERS) or isinstance(node, Foreign)


def type_name(node):
    return node.class_name if isinstance(node, Foreign) else type(node).__name__


class Value:
    """A non-tensor value compared by type and value, NaN equal to NaN."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __eq__(self, other):
        return isinstance(other, Value) and same_value(self.v, other.v)


def same_value(x, y):
    """Equal in type and value, NaN equal to NaN: ``1``, ``1.0`` and ``True`` are three different values."""
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and x != x:
        return y != y
    return x == y


class Named:
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
        container = is_container(node)
        if group is not None:
            self.attrs.setdefault(group, {})[name] = type_name(node) if container else Value(node)
        elif container:
            keys = [self._text(path + (k,)) for k in node] if isinstance(node, dict) else None
            parent = self._text(path[:-1]) if len(path) > base else None  # the parts' own parent is shared
            self.containers[name] = (type_name(node), keys, parent)
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
