"""Records held in dict keys, which :func:`ckconv.tree.walk` (a dict's values only) never visits."""

from __future__ import annotations

from .model import Foreign
from .tree import ROOT, TreePath, _check_node, flat_tensors, format_path, walk

_TEXT_KEYS = frozenset({str, int})


def foreign_objects(root) -> list:
    """[(dotted path, class name)] of the records in ``root``, in file order, then those in its dicts' keys
    (``{PosixPath('x'): t}``, which torch loads): what :func:`ckconv.tree.foreign_objects` finds, and the keys'."""
    if flat_tensors(root) is not None:
        return []
    found: list = []
    keys: list = []

    def visit(p, n):
        if isinstance(n, Foreign):
            found.append((format_path(p), n.class_name))
        else:
            odd_keys(p, n, keys)

    count = walk(root, visit, kinds=(Foreign, dict))
    return found + foreign_in_keys(keys, count)


def odd_keys(path, node, into, prefix="") -> None:
    """Add (dotted path, key) to ``into`` for each key of dict ``node`` other than a str or an int."""
    if not _TEXT_KEYS.issuperset(map(type, node)):
        into.extend((prefix + format_path(TreePath(path, k)), k) for k in node if type(k) not in _TEXT_KEYS)


def foreign_in_keys(keys, count=0) -> list:
    """[(dotted path, class name)] of the records in dict keys ``keys`` ([(dotted path, key)], see :func:`odd_keys`),
    the keys of their own dicts included; each key object walked once, all of them within ``tree.MAX_NODES``
    together with the ``count`` nodes already walked (a part shared by many keys counts for each)."""
    found: list = []
    seen: set = set()
    keys.reverse()  # popped in file order
    while keys:
        where, key = keys.pop()
        if id(key) in seen:
            continue
        seen.add(id(key))

        def visit(p, n, where=where):
            if isinstance(n, Foreign):
                found.append((f"{where}.{format_path(p)}" if p else where, n.class_name))
            else:
                odd_keys(p, n, keys, where + ".")

        count += walk(key, visit, kinds=(Foreign, dict))
        _check_node(count, ROOT)
    return found
