"""Optimizer state in a DCP folder keyed by parameter name, as ``torch.distributed.checkpoint.state_dict`` keys it.

``torch.optim.Optimizer.state_dict()`` numbers its slots: ``state`` is ``{0: {...}, 1: {...}}`` and each param
group lists slot numbers. torch's distributed state_dict API (``get_state_dict`` / ``set_state_dict``, the way FSDP2,
DDP and plain modules save to and resume from DCP) keys ``state`` by the parameter's fully qualified name and lists
names in each group's ``params``; ``dcp.load`` of ``get_state_dict(model, optimizer)`` looks the entries up as
``optimizer.state.<name>.exp_avg``. So ckconv's DCP writer writes every optimizer whose slots it can name (each
slot proven to be one parameter of the model state_dict: :mod:`ckconv.contents.optimizer_slots`) in that form,
and records which slot each name was (``$slots`` in ckconv's structure record), so that ckconv reads the numbered
optimizer back exactly. An optimizer whose slots cannot be named is written as it is.
"""

from __future__ import annotations

from collections import OrderedDict

from ...contents.layout import describe, is_optimizer_state
from ...errors import CorruptCheckpoint


def _numbered(osd) -> set | None:
    """The slot numbers of a numbered optimizer state_dict (every ``params`` entry and ``state`` key an int, no
    slot in two groups, no state without a slot), or None for anything else (an FQN-keyed one included)."""
    slots: set = set()
    for group in osd["param_groups"]:
        for slot in group["params"]:
            if type(slot) is not int or slot in slots:
                return None
            slots.add(slot)
    if not all(type(k) is int and k in slots for k in osd["state"]):
        return None
    return slots


def name_slots(root):
    """-> (root with every nameable optimizer keyed by parameter name, {key path: [[slot, name], ...]}).

    The other optimizers, and everything else, are left as they are (the same objects)."""
    if not isinstance(root, dict):
        return root, {}
    found = {}
    for path, info in zip(_optimizer_paths(root), describe(root).optimizers):
        osd = _at(root, path)
        slots = _numbered(osd)
        names = info.names
        if not slots or not _named(slots, names):
            continue
        found[path] = [[slot, names[slot]] for slot in sorted(slots)]
    if not found:
        return root, {}
    out = _copy_spine(root, found)
    for path, pairs in found.items():
        parent = _at(out, path[:-1])
        parent[path[-1]] = by_name(_at(root, path), dict(pairs))
    return out, found


def unnamed_optimizers(root) -> list:
    """[(where, why)] for each numbered optimizer :func:`name_slots` leaves numbered."""
    if not isinstance(root, dict):
        return []
    out = []
    for path, info in zip(_optimizer_paths(root), describe(root).optimizers):
        osd = _at(root, path)
        slots = _numbered(osd)
        if slots is None and not _keyed_by_name(osd):
            out.append((".".join(map(str, path)), "its slots are neither all numbers nor all names"))
        elif slots and not _named(slots, info.names):
            out.append((".".join(map(str, path)), info.problem or "ckconv cannot tell which parameter each slot is"))
    return out


def _keyed_by_name(osd) -> bool:
    """Already as ``get_state_dict`` keys it: every ``params`` entry and ``state`` key a name."""
    names = [n for g in osd["param_groups"] for n in g["params"]]
    known = {n for n in names if isinstance(n, str)}
    return len(known) == len(names) and all(isinstance(k, str) and k in known for k in osd["state"])


def _named(slots, names) -> bool:
    return not slots - set(names) and len({names[s] for s in slots}) == len(slots)


def by_name(osd, names: dict):
    """``osd`` with ``state`` keyed and ``params`` listed by ``names[slot]``; containers keep their types."""
    state = _like(osd["state"])
    for slot, entry in osd["state"].items():
        state[names[slot]] = entry
    groups = []
    for group in osd["param_groups"]:
        new = _like(group)
        for key, value in group.items():
            new[key] = [names[s] for s in value] if key == "params" else value
        groups.append(new)
    out = _like(osd)
    for key, value in osd.items():
        out[key] = state if key == "state" else groups if key == "param_groups" else value
    return out


def by_slot(osd, pairs, where):
    """The inverse of :func:`by_name` for a ``$slots`` record read back: names -> slot numbers, checked."""
    if (type(pairs) is not list or not all(type(p) is list and len(p) == 2 and type(p[0]) is int
                                           and isinstance(p[1], str) for p in pairs)):
        raise CorruptCheckpoint(f"{where}: invalid $slots record (not a list of [slot, name] pairs)")
    slot_of = {name: slot for slot, name in pairs}
    if len(slot_of) != len(pairs) or len({s for s, _ in pairs}) != len(pairs):
        raise CorruptCheckpoint(f"{where}: invalid $slots record (a slot or a name twice)")
    if not (isinstance(osd, dict) and isinstance(osd.get("state"), dict) and isinstance(osd.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in osd["param_groups"])):
        raise CorruptCheckpoint(f"{where}: a $slots record on something that is not an optimizer state_dict")
    known = set(slot_of)
    used = list(osd["state"]) + [n for g in osd["param_groups"] for n in g["params"]]
    if not all(isinstance(n, str) and n in known for n in used):
        raise CorruptCheckpoint(f"{where}: the optimizer names a parameter its $slots record does not number")
    return by_name(osd, slot_of)


def _optimizer_paths(root) -> list:
    """Key paths of the optimizers :func:`ckconv.contents.layout.describe` lists, in its order (keys as they are)."""
    paths = []
    for key, value in root.items():
        if is_optimizer_state(value):
            paths.append((key,))
        elif isinstance(value, list):
            paths += [(key, i) for i, v in enumerate(value) if is_optimizer_state(v)]
    return paths


def _like(container):
    """An empty container of the same kind (OrderedDict keeps its ``__dict__``, e.g. ``_metadata``)."""
    if isinstance(container, OrderedDict):
        new = OrderedDict()
        if getattr(container, "__dict__", None):
            new.__dict__.update(container.__dict__)
        return new
    return {}


def _at(root, path):
    node = root
    for key in path:
        node = node[key]
    return node


def _copy_spine(root, paths):
    """A copy of the containers on the way to ``paths`` (so the caller's tree is never modified)."""
    def copy(node, depth, wanted):
        heads = {p[depth] for p in wanted if len(p) > depth + 1}
        if isinstance(node, list):
            return [copy(v, depth + 1, [p for p in wanted if p[depth] == i]) if i in heads else v
                    for i, v in enumerate(node)]
        new = _like(node) if isinstance(node, dict) else node
        for key, value in node.items():
            new[key] = copy(value, depth + 1, [p for p in wanted if p[depth] == key]) if key in heads else value
        return new

    return copy(root, 0, list(paths))
