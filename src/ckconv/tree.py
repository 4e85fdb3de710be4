"""Walking checkpoint trees safely, and moving them between ckconv's model and real torch objects."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
from collections import OrderedDict

from . import dtypes, numpy_values, tensor_kinds
from .errors import LimitExceeded, UnsupportedContent, UsageError, import_torch
from .model import Foreign, Storage, TensorRef, TorchDevice, TorchDtype, TorchSize, foreign_class, memory_budget

__all__ = ["foreign_objects", "format_path", "from_torch", "is_flat_state_dict", "materialize", "tensors", "walk"]

MAX_DEPTH = int(os.environ.get("CKCONV_MAX_DEPTH", 200))
MAX_NODES = int(os.environ.get("CKCONV_MAX_NODES", 5_000_000))
CONTAINERS = (dict, list, tuple, set, frozenset)


@contextlib.contextmanager
def gc_paused():
    """The cycle collector off while a checkpoint's records are built or written: a collection pass every few
    thousand new objects would rescan all the earlier ones (a fifth of the time for 100k tensors), and ckconv's
    records hold no cycles. Nests; the collector is back on after the outermost one if it was on before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def children(node):
    """(key, child) pairs of a container or foreign object; keys become path components."""
    if isinstance(node, CONTAINERS) or isinstance(node, Foreign):
        return list(_iter_children(node))
    return []


def _iter_children(node):
    if isinstance(node, dict):
        meta = getattr(node, "__dict__", None)
        if meta:  # an OrderedDict's attributes (torch's ``_metadata``) come first, as a child named "@attrs"
            return itertools.chain((("@attrs", meta),), node.items())
    return entries(node)


def entries(node):
    """(key, child) pairs of a container or foreign object, without an OrderedDict's ``@attrs``: an iterator."""
    if isinstance(node, dict):
        return iter(node.items())
    if isinstance(node, (list, tuple, set, frozenset)):
        return enumerate(node)
    out = [("args", node.args)]
    if node.state is not None:
        out.append(("state", node.state))
    if node.listitems:
        out.append(("items", node.listitems))
    if node.dictitems:
        out.append(("dictitems", node.dictitems))
    return iter(out)


class TreePath:
    """Where a node lies: a link to its parent's path plus one key, so a walk costs O(1) memory per node.

    Behaves as the tuple of keys from the root (iterate, ``len``, index, compare with tuples, ``+``); the tuple
    is built only when asked for, so a wide tree 200 levels deep never holds 200 keys per node.
    """

    __slots__ = ("parent", "key", "depth", "_name")

    def __init__(self, parent, key):
        self.parent, self.key = parent, key
        self.depth = 0 if parent is None else parent.depth + 1
        self._name = None

    def name(self) -> str:
        """:func:`short_path` of this path, remembered: a node's name is its parent's remembered name, a dot and its
        key, so naming every tensor of a container costs one join each, not a walk to the root. A name over
        :data:`MAX_NAME_CHARS` is not remembered: it and its descendants' are shortened by :func:`short_path`."""
        if self._name is not None:
            return self._name
        parent, key = self.parent, self.key
        if type(key) is str and parent is not None:  # the common cases first: a key under a named parent or the root
            if parent._name is not None and len(parent._name) + len(key) < MAX_NAME_CHARS:
                self._name = parent._name + "." + key
                return self._name
            if parent.parent is None and len(key) <= MAX_NAME_CHARS:
                self._name = key
                return key
        chain = []  # this path and its ancestors without a remembered name, nearest first
        p = self
        while p.parent is not None and p._name is None:
            chain.append(p)
            p = p.parent
        if not chain:
            return "<root>"
        head = p._name  # None: the chain starts at the root
        for p in reversed(chain):
            key = key_text(p.key)
            if head is not None and len(head) + 1 + len(key) > MAX_NAME_CHARS or len(key) > MAX_NAME_CHARS:
                return short_path(self.as_tuple())
            head = p._name = key if head is None else head + "." + key
        return head

    def as_tuple(self) -> tuple:
        keys = []
        p = self
        while p.parent is not None:
            keys.append(p.key)
            p = p.parent
        return tuple(reversed(keys))

    def __iter__(self):
        return iter(self.as_tuple())

    def __len__(self):
        return self.depth

    def __bool__(self):
        return self.depth > 0

    def __getitem__(self, index):
        return self.as_tuple()[index]

    def __contains__(self, key):
        return key in self.as_tuple()

    def index(self, key):
        return self.as_tuple().index(key)

    def count(self, key):
        return self.as_tuple().count(key)

    def __eq__(self, other):
        if isinstance(other, (TreePath, tuple)):
            return self.as_tuple() == tuple(other)
        return NotImplemented

    def __hash__(self):
        return hash(self.as_tuple())

    def __add__(self, other):
        return self.as_tuple() + tuple(other)

    def __radd__(self, other):
        return tuple(other) + self.as_tuple()

    def __repr__(self):
        return repr(self.as_tuple())


ROOT = TreePath(None, None)


def walk(root, visit=None, kinds=None, paths=True):
    """Visit every node depth-first as ``visit(path, node)``; refuse container cycles, depth and size bombs.

    Returns the number of nodes visited. Runs iteratively, so hostile nesting cannot overflow the C stack, and
    holds only the current branch: memory is O(depth) beyond what ``visit`` keeps. ``path`` is a
    :class:`TreePath` (a tuple of keys on demand); keep it, not ``tuple(path)``, to stay O(1) per node.
    ``kinds``: a type or tuple of types: ``visit`` is called only for nodes of those types (the walk, its count
    and its limits are the same; only the containers' paths are built for the others). ``paths=False``: ``visit``
    is called as ``visit(node)``.
    """
    _check_node(1, ROOT)
    if visit is not None and (kinds is None or isinstance(root, kinds)):
        visit(ROOT, root) if paths else visit(root)
    if not (isinstance(root, CONTAINERS) or isinstance(root, Foreign)):
        return 1
    count = 1
    on_path = {id(root)}
    frames = [(id(root), ROOT, _iter_children(root))]  # (id of an open container, its path, its (key, child) pairs)
    while frames:
        parent_id, parent, pairs = frames[-1]
        depth = parent.depth + 1
        for key, node in pairs:
            count += 1
            if count > MAX_NODES or depth > MAX_DEPTH:
                _check_node(count, TreePath(parent, key))
            path = None
            if visit is not None and (kinds is None or isinstance(node, kinds)):
                if paths:
                    path = TreePath(parent, key)
                    visit(path, node)
                else:
                    visit(node)
            if isinstance(node, CONTAINERS) or isinstance(node, Foreign):
                if id(node) not in on_path:
                    on_path.add(id(node))
                    frames.append((id(node), path or TreePath(parent, key), _iter_children(node)))
                    break  # descend; this frame's iterator resumes after the child's subtree
                if not isinstance(node, Foreign):
                    raise LimitExceeded(f"self-referencing structure at {format_path(TreePath(parent, key))}: a "
                                        "container contains itself")
                # an object reached again inside its own state (omegaconf's ``_parent``, a module's back-reference)
                # is a back-reference, as in pickle's memo: visited, not descended into; writers keep it shared
        else:
            frames.pop()
            on_path.discard(parent_id)
    return count


def _check_node(count, path):
    if count > MAX_NODES:
        raise LimitExceeded(
            f"structure too large: more than {MAX_NODES} objects (shared references can expand "
            "exponentially); raise CKCONV_MAX_NODES if you trust this file")
    if path.depth > MAX_DEPTH:
        raise LimitExceeded(f"structure too deep: nesting exceeds {MAX_DEPTH} levels at "
                            f"{format_path(path.as_tuple()[:5])}...")


def format_path(path) -> str:
    return ".".join(key_text(p) for p in path) if path else "<root>"


MAX_NAME_CHARS = 65_536


def short_path(path, limit=MAX_NAME_CHARS) -> str:
    """:func:`format_path` for a report, at most about ``limit`` characters: a path that repeats a long key at every
    level (one string, shared through the pickle memo) is shortened in the middle instead of built whole."""
    if type(path) is TreePath and limit == MAX_NAME_CHARS:
        return path.name()
    texts = [key_text(k) for k in path]
    total = sum(map(len, texts)) + len(texts) - 1
    if total <= limit:
        return ".".join(texts) if texts else "<root>"

    def joined(parts, room):
        out, n = [], 0
        for t in parts:
            out.append(t[:room - n])
            n += len(out[-1]) + 1
            if n >= room:
                break
        return ".".join(out)[:room]

    half = limit // 2
    return (joined(texts, half) + f"...<{total} characters>..."
            + joined([t[::-1] for t in reversed(texts)], half)[::-1])


def key_text(key) -> str:
    """A path component as text; an int too long for ``str`` (Python's 4,300-digit limit) is shown by size."""
    if type(key) is int and key.bit_length() > MAX_INT_TEXT_BITS:
        digits = format(abs(key), "x")  # base 16 has no length limit
        return f"<{key.bit_length()}-bit int {'-' if key < 0 else ''}0x{digits[:8]}...{digits[-8:]}>"
    return str(key)


MAX_INT_TEXT_BITS = 13_000  # about 3,900 decimal digits: under sys.get_int_max_str_digits()'s default 4,300


def json_safe(obj):
    """``obj`` (a report's dicts, lists and scalars) with ints too long for ``json.dumps`` shown as text."""
    if type(obj) is int:
        return obj if obj.bit_length() <= MAX_INT_TEXT_BITS else key_text(obj)
    if isinstance(obj, dict):
        return {json_safe(k) if type(k) is int else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def tensors(root):
    """[(path, TensorRef)] in file order."""
    found = []
    add = found.append
    walk(root, lambda p, n: add((p, n)), kinds=TensorRef)
    return found


def instances(root, kinds) -> list:
    """[node] of every node of ``kinds`` (a type or tuple) in walk order, a shared one once per place; no paths."""
    found: list = []
    walk(root, found.append, kinds=kinds, paths=False)
    return found


def foreign_objects(root):
    """[(dotted path, class name)] of the records in ``root``, in file order."""
    if flat_tensors(root) is not None:
        return []
    found = []
    walk(root, lambda p, n: found.append((format_path(p), n.class_name)), kinds=Foreign)
    return found


def flat_tensors(root):
    """What :func:`walk` would visit below ``root`` when it is a dict of tensors under string keys and nothing else
    (no attributes) that the walk would not refuse: its values, found without a walk; otherwise None."""
    if is_flat_state_dict(root) and not getattr(root, "__dict__", None) and len(root) < MAX_NODES and MAX_DEPTH >= 1:
        return list(root.values())
    return None


def is_flat_state_dict(root) -> bool:
    """Whether ``root`` is a non-empty dict of tensors under string keys (checked in C: ``map``, not a generator)."""
    return isinstance(root, dict) and bool(root) and all(map(isinstance, root, itertools.repeat(str))) and all(
        map(isinstance, root.values(), itertools.repeat(TensorRef)))


# --- materialising into torch -------------------------------------------------------------------------------

def materialize(root, budget=None, device=None):
    """Turn a ckconv tree into real torch objects, tensors on ``device`` (default the CPU); storages shared in the
    file stay shared."""
    torch = import_torch("reading into torch tensors (ckconv.load)")
    target = _device(torch, device)
    storages: dict = {}

    def storage_of(ref: TensorRef):
        st = ref.storage
        if id(st) not in storages:
            if st.nbytes == 0:
                data = torch.empty(0, dtype=torch.uint8)
            else:
                data = torch.frombuffer(bytearray(st.read()), dtype=torch.uint8)
            if target is not None:
                data = data.to(target)
            storages[id(st)] = data.untyped_storage()
        return storages[id(st)]

    memo: dict = {}

    def convert(node):
        if id(node) in memo:
            return memo[id(node)]
        if tensor_kinds.is_special(node) or isinstance(node, (tensor_kinds.TorchQScheme, tensor_kinds.TorchLayout)):
            out = tensor_kinds.to_torch(node, storage_of, convert)
        elif isinstance(node, TensorRef):
            t = torch.empty(0, dtype=dtypes.torch_dtype(node.dtype), device=target)
            t.set_(storage_of(node), node.offset, node.shape, node.stride)
            if node.parameter:
                t = torch.nn.Parameter(t, requires_grad=node.requires_grad)
            elif node.requires_grad:
                t.requires_grad_(True)
            out = t
        elif isinstance(node, TorchSize):
            out = torch.Size(node)
        elif isinstance(node, TorchDtype):
            out = dtypes.torch_dtype(str(node))
        elif isinstance(node, TorchDevice):
            out = torch.device(str(node))
        elif isinstance(node, dict):
            out = type(node)() if type(node) in (dict, OrderedDict) else dict()
            for k, v in node.items():
                out[convert(k)] = convert(v)
            if getattr(node, "__dict__", None):
                out.__dict__.update({k: convert(v) for k, v in node.__dict__.items()})
        elif isinstance(node, list):
            out = [convert(v) for v in node]
        elif isinstance(node, tuple):
            out = tuple(convert(v) for v in node)
            if type(node) is not tuple and not isinstance(node, TorchSize):
                out = tuple(out)
        elif isinstance(node, (set, frozenset)):
            out = type(node)(convert(v) for v in node)
        elif isinstance(node, Foreign):  # numpy arrays, scalars, dtypes: real numpy objects, built from bytes
            out = numpy_values.value(node)
            out = node if out is numpy_values.NOT_NUMPY else out
        else:
            out = node
        memo[id(node)] = out
        return out

    _check_view_budget(root, budget)
    return convert(root)


def _device(torch, device):
    """``device`` as a torch.device (None: the CPU, where tensors are built); a name torch does not know, or a
    ``map_location`` dict or function, is a UsageError."""
    if device is None or (isinstance(device, str) and device == "cpu"):
        return None
    if not isinstance(device, (str, torch.device)):
        raise UsageError(f"device must be a torch.device or its name ('cuda:0', 'cpu'), not {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {device!r}: {' '.join(str(exc).splitlines())}") from None


def _check_view_budget(root, budget=None):
    """Refuse views that ask for more memory than their storages hold (a stride-0 ``expand`` of 40 GB) when the
    total would exceed the memory budget: a caller that makes them contiguous would allocate it."""
    seen, excess = set(), 0

    for node in instances(root, TensorRef):
        key = node.view_key()
        if key not in seen:
            seen.add(key)
            excess += max(0, node.nbytes - node.storage.nbytes)
    budget = memory_budget() if budget is None else budget
    if excess > budget:
        raise LimitExceeded(f"tensor views would need {excess} bytes beyond their storages, over the memory budget "
                            f"of {budget} bytes; set CKCONV_MEMORY_BUDGET if you trust this file")


# --- importing in-memory torch objects -------------------------------------------------------------------------

def from_torch(obj):
    """Describe an in-memory object (tensors, state_dicts, bundles) as a ckconv tree without copying tensor bytes."""
    import ctypes

    import torch

    storages: dict = {}
    memo: dict = {}
    alive: list = []  # tensors made while converting (a quantized tensor's int view): their ids must stay unique

    def storage_of(t):
        us = t.untyped_storage()
        key = (us.data_ptr(), us.nbytes())
        if key not in storages:
            if us.device.type != "cpu":
                us = us.cpu()
            n = us.nbytes()
            buf = (ctypes.c_char * n).from_address(us.data_ptr()) if n else b""
            st = Storage(str(len(storages)), dtypes.dtype_name(t.dtype), n, buffer=buf)
            st.buffer = buf
            storages[key] = (st, us)  # keep the torch storage alive as long as the buffer is used
        return storages[key][0]

    def convert(node):
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, torch.Tensor):
            alive.append(node)
        if isinstance(node, torch.Tensor) and (node.layout != torch.strided or node.is_quantized):
            out = tensor_kinds.from_torch(node, convert)
        elif isinstance(node, (torch.qscheme, torch.layout)):
            out = (tensor_kinds.TorchQScheme if isinstance(node, torch.qscheme) else tensor_kinds.TorchLayout)(
                str(node)[6:])
        elif isinstance(node, torch.Tensor):
            out = TensorRef(storage_of(node), dtypes.dtype_name(node.dtype), tuple(node.shape), node.stride(),
                            node.storage_offset(), node.requires_grad, isinstance(node, torch.nn.Parameter))
        elif isinstance(node, torch.Size):
            out = TorchSize(node)
        elif isinstance(node, torch.dtype):
            out = TorchDtype(dtypes.dtype_name(node))
        elif isinstance(node, torch.device):
            out = TorchDevice(str(node))
        elif isinstance(node, dict):
            out = OrderedDict() if isinstance(node, OrderedDict) else {}
            for k, v in node.items():
                out[convert(k)] = convert(v)
            if isinstance(node, OrderedDict) and getattr(node, "__dict__", None):
                out.__dict__.update({k: convert(v) for k, v in node.__dict__.items()})
        elif isinstance(node, list):
            out = [convert(v) for v in node]
        elif isinstance(node, tuple) and type(node) is tuple:
            out = tuple(convert(v) for v in node)
        elif isinstance(node, (set, frozenset)):
            out = type(node)(convert(v) for v in node)
        elif node is None or isinstance(node, (bool, int, float, complex, str, bytes, Foreign)):
            out = node
        elif isinstance(node, type) or type(node).__name__ in ("function", "builtin_function_or_method"):
            out = foreign_class(node.__module__, node.__qualname__)  # a class or function: an inert reference
        else:
            out = _reduce_foreign(node, convert)
        memo[id(node)] = out
        return out

    return convert(obj)


def _reduce_foreign(obj, convert):
    """Record an in-memory object of another class the way pickle would, as an inert Foreign."""
    cls = type(obj)
    try:
        reduced = obj.__reduce_ex__(2)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot describe it
        raise UnsupportedContent(f"cannot store object of type {cls.__module__}.{cls.__qualname__}: {exc}") from None
    if isinstance(reduced, str):
        return foreign_class(cls.__module__, reduced)()
    func, args, *rest = reduced + (None,) * (5 - len(reduced))
    state, listitems, dictitems = rest[:3]
    if getattr(func, "__name__", "") == "__newobj__":
        target, args = args[0], args[1:]
    else:
        target = func
    out = foreign_class(target.__module__, target.__qualname__)(*[convert(a) for a in args])
    if state is not None:
        out.__setstate__(convert(state))
    if listitems is not None:
        out.extend(convert(list(listitems)))
    if dictitems is not None:
        for k, v in dictitems:
            out[convert(k)] = convert(v)
    return out
