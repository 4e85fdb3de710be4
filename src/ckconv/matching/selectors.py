"""Selectors: naming part of a model the way Python would, ``features[:10]``, ``classifier[-1]``, ``layer4.0``.

Grammar: dotted names (``layer4.0.conv1``), each optionally followed by ``[index]``, ``[start:stop:step]`` or
``['key']``. An index or slice picks among a module's children in order (like ``nn.Sequential``), so
``features[24:]`` is ``print(vgg.features[24:])``; an index right after a slice picks within that slice. The last
name may also be a parameter or buffer (``fc.weight``). The same syntax serves ``--only``, ``--drop``, ``--select``
and :func:`freeze`.
"""

from __future__ import annotations

import re

from ..errors import UsageError

_TOKEN = re.compile(r"""
    (?P<name>[A-Za-z_][A-Za-z0-9_]*|[0-9]+)
  | \[\s*(?P<bracket>[^\]]*?)\s*\]
  | (?P<dot>\.)
""", re.VERBOSE)
_INT = re.compile(r"^[+-]?\d+$")


def parse(selector: str) -> list:
    """-> [("name", str) | ("index", int) | ("slice", slice) | ("key", str)]; raises UsageError when malformed."""
    text = str(selector).strip()
    steps: list = []
    pos = 0
    expect_name = True  # after a dot, or at the start
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise UsageError(f"invalid selector {selector!r} at {text[pos:]!r}: use dotted names with optional "
                             "[index] or [start:stop], e.g. 'features[:10]' or 'layer4.0'")
        if m.group("name") is not None:
            if not expect_name:
                raise UsageError(f"invalid selector {selector!r}: missing '.' before {m.group('name')!r}")
            steps.append(("name", m.group("name")))
            expect_name = False
        elif m.group("dot"):
            if expect_name:
                raise UsageError(f"invalid selector {selector!r}: empty name before '.'")
            expect_name = True
        else:
            if expect_name and steps:
                raise UsageError(f"invalid selector {selector!r}: '[' right after '.'")
            steps.append(_bracket(selector, m.group("bracket")))
            expect_name = False
        pos = m.end()
    if expect_name and steps:
        raise UsageError(f"invalid selector {selector!r}: it ends with '.'")
    return steps


def _bracket(selector, inner):
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
        return ("key", inner[1:-1])
    if _INT.match(inner):
        return ("index", int(inner))
    parts = inner.split(":")
    if 2 <= len(parts) <= 3 and all(p.strip() == "" or _INT.match(p.strip()) for p in parts):
        return ("slice", slice(*(int(p) if p.strip() else None for p in parts)))
    raise UsageError(f"invalid selector {selector!r}: [{inner}] is not an index, a slice or a quoted name")


def select(model, selector: str) -> list:
    """-> [(qualified name, module or tensor)] that ``selector`` names in ``model`` (empty selector: the model)."""
    steps = parse(selector)
    current = [("", model)]
    from_slice = False
    for kind, arg in steps:
        if kind in ("name", "key"):
            current = [_child(selector, qual, mod, arg) for qual, mod in current]
            from_slice = False
        elif from_slice:
            current = _pick(selector, current, kind, arg, "the slice")
            from_slice = kind == "slice"
        else:
            picked = []
            for qual, mod in current:
                picked += _pick(selector, _children(mod, qual), kind, arg, qual or "the model")
            current, from_slice = picked, kind == "slice"
    return current


def _children(module, qual):
    modules = getattr(module, "_modules", None)
    if modules is None:
        return []
    return [(_join(qual, n), m) for n, m in modules.items() if m is not None]


def _join(qual, name):
    return f"{qual}.{name}" if qual else str(name)


def _child(selector, qual, module, name):
    modules = getattr(module, "_modules", None) or {}
    if name in modules and modules[name] is not None:
        return _join(qual, name), modules[name]
    for table in ("_parameters", "_buffers"):
        tensors = getattr(module, table, None) or {}
        if tensors.get(name) is not None:
            return _join(qual, name), tensors[name]
    known = ", ".join(list(modules)[:12]) or "none"
    where = qual or "the model"
    raise UsageError(f"selector {selector!r}: {where} has no submodule {name!r} (its children: {known})")


def _pick(selector, items, kind, arg, where):
    if kind == "slice":
        return items[arg]
    try:
        return [items[arg]]
    except IndexError:
        raise UsageError(f"selector {selector!r}: index {arg} is out of range ({where} has {len(items)} "
                         "children)") from None


def prefixes(model, selectors) -> list:
    """Qualified names selected by any of ``selectors`` (a string or a list of strings)."""
    if isinstance(selectors, str):
        selectors = [selectors]
    out: list = []
    for sel in selectors:
        for qual, _ in select(model, sel):
            if qual not in out:
                out.append(qual)
    return out


def under(key: str, names) -> bool:
    """Whether ``key`` is, or lies inside, one of the qualified ``names`` ('' means everything)."""
    return any(n == "" or key == n or key.startswith(n + ".") for n in names)


def filter_keys(keys, *, only=(), drop=(), model=None) -> list:
    """Keys kept by ``--only`` selectors (none: all) minus those under ``--drop`` selectors.

    With ``model`` the selectors resolve against its module tree; without one only plain dotted names work,
    because an index counts modules that hold no tensors (``features[2]`` may be a ReLU).
    """
    keys = list(keys)
    only_names = _names(only, model) if only else None
    drop_names = _names(drop, model) if drop else []
    return [k for k in keys
            if (only_names is None or under(k, only_names)) and not (drop_names and under(k, drop_names))]


def _names(selectors, model):
    if isinstance(selectors, str):
        selectors = [selectors]
    if model is not None:
        return prefixes(model, selectors)
    names = []
    for sel in selectors:
        steps = parse(sel)
        if any(kind != "name" for kind, _ in steps):
            raise UsageError(f"selector {sel!r} needs the architecture (--arch) to count modules; without one use "
                             "dotted names such as 'features.0'")
        names.append(".".join(arg for _, arg in steps))
    return names


def freeze(model, selector, requires_grad: bool = False) -> list:
    """Set ``requires_grad`` (False: freeze) on every parameter under ``selector``; -> their qualified names."""
    import torch

    changed = []
    for qual, obj in select(model, selector) if isinstance(selector, str) else \
            [item for sel in selector for item in select(model, sel)]:
        if isinstance(obj, torch.Tensor):
            params = [(qual, obj)] if isinstance(obj, torch.nn.Parameter) else []
        else:
            params = [(_join(qual, n), p) for n, p in obj.named_parameters()]
        for name, p in params:
            p.requires_grad_(requires_grad)
            if name not in changed:
                changed.append(name)
    return changed
