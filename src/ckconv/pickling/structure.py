"""Carrying a whole checkpoint tree through formats that only store named tensors (safetensors, npz).

``encode`` gives every distinct tensor a readable name (its path: ``model.features.0.weight``,
``optimizer.state.0.exp_avg``) and turns everything else into JSON that refers to tensors by name.
``decode`` reverses it exactly: same containers (dict vs OrderedDict, tuple vs list), same keys (int keys stay
int), same scalars, tied tensors tied again. The JSON vocabulary is documented in docs/formats.md.
"""

from __future__ import annotations

import base64
import json
import math
from collections import OrderedDict

from .. import dtypes, tensor_kinds, tree
from . import policy
from ..errors import CorruptCheckpoint, LimitExceeded, UnsafeCheckpoint
from ..model import Foreign, TensorRef, TorchDevice, TorchDtype, TorchSize, foreign_class, is_reference
from ..tree import MAX_DEPTH, format_path, walk

KEY = "ckconv.structure"
BIG_INT_BITS = 13_000  # longer ints (about 3,900 digits) are written as {"$int": hex}: JSON's int->str limit is 4,300
HEX_DIGITS = frozenset("0123456789abcdef")


def tensor_name(path) -> str:
    return format_path(path) if path else "tensor"


def encode(root, raw_dtypes=frozenset(), namer=None, reserved=frozenset()):
    """-> (json-able structure, [(name, TensorRef)] of distinct tensors in order, needs_structure).

    ``raw_dtypes``: dtypes the target cannot name; their tensors are described in the structure (dtype, shape) so
    a format can store them as raw bytes. ``namer(path)`` may return a better name than the path (bundles name
    optimizer state by parameter name: ``optimizer.state.features.0.weight.exp_avg``). ``reserved``: names the
    target keeps for itself (safetensors' ``__metadata__``): a tensor under such a key gets another name.
    """
    named = flat_state_dict(root, raw_dtypes, reserved)
    if named is not None:  # the same answer as below, in one pass: names are the keys, the structure says nothing
        return {name: {"$tensor": name} for name, _ in named}, named, False
    walk(root)  # refuse cycles and bombs before recursing
    encoder = _Encoder(raw_dtypes, namer, reserved)
    structure = encoder.enc(root, ())
    names, named = encoder.names, encoder.named
    plain = (type(root) is dict and len(named) == len(root) and bool(root)
             and all(type(k) is str and type(v) is TensorRef and not v.parameter and not v.requires_grad
                     and v.dtype not in raw_dtypes and names[v.view_key()] == k for k, v in root.items()))
    return structure, named, not plain


def flat_state_dict(root, raw_dtypes=frozenset(), reserved=frozenset()):
    """[(key, TensorRef)] when ``root`` is a state_dict whose keys say all a structure record would (a dict of
    distinct plain tensors under str keys that are their own names: no ``$`` prefix, valid UTF-8, none
    ``reserved``, no dtype of ``raw_dtypes``); None for anything else, which :func:`encode` describes. No namer
    renames such a dict: it holds no optimizer state."""
    if type(root) is not dict or not root or len(root) >= tree.MAX_NODES:  # the walk's count, refused by encode
        return None
    named = list(root.items())
    views = set()
    for key, ref in named:
        if (type(key) is not str or type(ref) is not TensorRef or ref.parameter or ref.requires_grad
                or ref.dtype in raw_dtypes or key[:1] == "$"):
            return None
        views.add(ref.view_key())
    if len(views) != len(named) or not _utf8_ok("".join(root)) or any(k in root for k in reserved):
        return None  # a tied tensor; a lone surrogate in a key; a name the target keeps for itself
    return named


class _Encoder:
    """One encoding pass: tensors named once each (tied views share a name), records numbered for ``$ref``."""

    def __init__(self, raw_dtypes, namer, reserved=frozenset()):
        self.raw_dtypes, self.namer = raw_dtypes, namer
        self.names: dict = {}  # view key -> name
        self.objects: dict = {}  # id of a foreign record -> its number, for "$ref"
        self.used: set = set(reserved)
        self.named: list = []

    def name_for(self, path, ref):
        key = ref.view_key()
        if key in self.names:
            return self.names[key]
        base = _utf8_safe((self.namer(path) if self.namer else None) or tensor_name(path))
        name, n = base, 1
        while name in self.used:
            n += 1
            name = f"{base}#{n}"
        self.used.add(name)
        self.names[key] = name
        self.named.append((name, ref))
        return name

    def enc(self, node, path):
        if type(node) is str:
            return node if _utf8_ok(node) else {"$str": base64.b64encode(node.encode("utf-8", "surrogatepass")).decode()}
        if node is None or type(node) is bool:
            return node
        if type(node) is int:
            return node if node.bit_length() <= BIG_INT_BITS else {"$int": format(node, "x")}
        if type(node) is float:
            return node if math.isfinite(node) else {"$float": repr(node)}
        if isinstance(node, tensor_kinds.KINDS):  # quantized and sparse tensors, qschemes, layouts
            return tensor_kinds.encode_record(node, path, self.enc, self.name_for)
        if isinstance(node, TensorRef):
            return self.tensor(node, path)
        if isinstance(node, TorchSize):
            return {"$size": list(node)}
        if isinstance(node, TorchDtype):
            return {"$dtype": str(node)}
        if isinstance(node, TorchDevice):
            return {"$device": str(node)}
        if isinstance(node, OrderedDict) or type(node) in (dict, list, tuple, set, frozenset):
            return self.container(node, path)
        if type(node) in (bytes, bytearray):
            return {"$" + type(node).__name__: base64.b64encode(node).decode()}
        if type(node) is complex:
            return {"$complex": [node.real, node.imag]}
        if is_reference(node):
            return {"$class": f"{node.module}:{node.qualname}"}
        if isinstance(node, Foreign):
            return self.record(node, path)
        raise CorruptCheckpoint(f"cannot encode a value of type {type(node).__name__} at {format_path(path)}")

    def tensor(self, node, path):
        out = {"$tensor": self.name_for(path, node)}
        if node.parameter:
            out["param"] = True
        if node.requires_grad:
            out["requires_grad"] = True
        if node.dtype in self.raw_dtypes:
            out["dtype"] = node.dtype
            out["shape"] = list(node.shape)
        return out

    def container(self, node, path):
        enc = self.enc
        if isinstance(node, OrderedDict):
            out = {"$odict": [[enc(k, path), enc(v, path + (k,))] for k, v in node.items()]}
            if getattr(node, "__dict__", None):
                out["$attrs"] = enc(dict(node.__dict__), path + ("@attrs",))
            return out
        if type(node) is dict:
            if all(type(k) is str and not k.startswith("$") and _utf8_ok(k) for k in node):
                return {k: enc(v, path + (k,)) for k, v in node.items()}
            return {"$dict": [[enc(k, path), enc(v, path + (k,))] for k, v in node.items()]}
        if type(node) is list:
            return [enc(v, path + (i,)) for i, v in enumerate(node)]
        if type(node) is tuple:
            return {"$tuple": [enc(v, path + (i,)) for i, v in enumerate(node)]}
        if type(node) in (set, frozenset):
            return {"$" + type(node).__name__: [enc(v, path + (i,)) for i, v in enumerate(node)]}
        raise CorruptCheckpoint(f"cannot encode a value of type {type(node).__name__} at {format_path(path)}")

    def record(self, node, path):
        enc = self.enc
        if id(node) in self.objects:  # shared, or reached again inside its own state (a back-reference)
            return {"$ref": self.objects[id(node)]}
        self.objects[id(node)] = len(self.objects)
        out = {"$object": f"{node.module}:{node.qualname}", "id": self.objects[id(node)]}
        out["args"] = [enc(a, path + ("args", i)) for i, a in enumerate(node.args)]
        if node.newobj:
            out["new"] = True
        if node.kwargs:
            out["kwargs"] = [[enc(k, path), enc(v, path + ("kwargs", k))] for k, v in node.kwargs.items()]
        if node.reconstructor is not None:
            out["reconstructor"] = [enc(v, path + ("reconstructor", i)) for i, v in enumerate(node.reconstructor)]
        if node.state is not None:
            out["state"] = enc(node.state, path + ("state",))
        if node.listitems:
            out["listitems"] = [enc(v, path + ("items", i)) for i, v in enumerate(node.listitems)]
        if node.dictitems:
            out["dictitems"] = [[enc(k, path), enc(v, path + (k,))] for k, v in node.dictitems]
        return out


def decode(structure, tensors: dict, where="", seen_globals=None):
    """Rebuild the tree from ``encode``'s JSON; ``tensors`` maps names to TensorRefs. Strict: any surprise is an error.

    Class names (``$object``, ``$class``) are untrusted: a name that is not dotted identifiers, or a dangerous one,
    is refused (:class:`UnsafeCheckpoint`); ``seen_globals`` (a list) receives the others, for verdicts.

    A ``$ref`` shares an object instead of copying it, so a few kilobytes of references to references can stand
    for a tree of 2**60 nodes. The size and depth of the tree as a walk expands it are counted as each node is
    decoded (a shared object counted once per place it is referenced, from the size recorded when it was
    decoded), and refused past ``CKCONV_MAX_NODES`` / ``CKCONV_MAX_DEPTH``: time proportional to the record, not
    to its expansion."""
    decoder = _Decoder(tensors, where, [] if seen_globals is None else seen_globals)
    try:
        root = decoder.dec(structure, 0)
    except RecursionError:
        raise decoder.bad("nesting too deep") from None
    unused = set(tensors) - decoder.used
    if unused:
        raise decoder.bad(f"{len(unused)} tensors are not referenced, e.g. {sorted(unused)[0]!r}")
    return root


class _Decoder:
    """One decode: the tensors used, the objects defined so far (for ``$ref``) and the expanded size counted."""

    def __init__(self, tensors, where, seen_globals):
        self.tensors, self.where, self.seen_globals = tensors, where, seen_globals
        self.used: set = set()
        self.objects: dict = {}  # "id" -> foreign record, for "$ref"
        self.expanded: dict = {}  # "id" -> (nodes, height) of a completely decoded object, as a walk expands it
        self.nodes = 0  # nodes of the tree as a walk expands it (keys are not nodes)
        self.reach = 0  # the deepest level the expanded tree reaches so far

    def bad(self, msg):
        return CorruptCheckpoint(f"{self.where}: invalid {KEY} metadata ({msg}); the file was altered or written by "
                                 "a newer ckconv")

    def count(self, nodes, depth):
        self.nodes += nodes
        if self.nodes > tree.MAX_NODES:
            raise LimitExceeded(f"{self.where}: {KEY} metadata: structure too large: more than {tree.MAX_NODES} objects "
                                "(shared references can expand exponentially); raise CKCONV_MAX_NODES if you trust "
                                "this file")
        if depth > self.reach:
            self.reach = depth
            if depth > tree.MAX_DEPTH:
                raise LimitExceeded(f"{self.where}: {KEY} metadata: structure too deep: nesting exceeds {tree.MAX_DEPTH} "
                                    "levels (shared references included); raise CKCONV_MAX_DEPTH if you trust this file")

    def dec(self, node, depth):
        if depth > MAX_DEPTH:
            raise self.bad("nesting too deep")
        self.count(1, depth)
        if node is None or type(node) in (bool, str, int, float):
            return node
        if type(node) is list:
            return [self.dec(v, depth + 1) for v in node]
        if type(node) is not dict:
            raise self.bad(f"unexpected {type(node).__name__}")
        tag = next((k for k in node if k.startswith("$")), None)
        if tag is None:
            return {k: self.dec(v, depth + 1) for k, v in node.items()}
        handler = _TAGS.get(tag)
        if handler is None:
            raise self.bad(f"unknown tag {tag}")
        return handler(self, node, node[tag], depth)

    def key(self, node, depth):
        """A dict key or set member's key: decoded like any value, but not a node of the walked tree."""
        before = self.nodes
        out = self.dec(node, depth)
        self.nodes = before
        return out

    def pairs(self, val, what):
        if type(val) is not list or not all(type(p) is list and len(p) == 2 for p in val):
            raise self.bad(f"{what} must be a list of pairs")
        return val

    def global_ref(self, val):
        """A class name from the metadata: untrusted input, checked exactly like a pickle's GLOBAL opcode."""
        if type(val) is not str or ":" not in val:
            raise self.bad("bad object class")
        module, qualname = val.split(":", 1)
        where = self.where
        if not policy.valid_name(module, qualname):
            raise UnsafeCheckpoint(f"refusing to load {where}: its {KEY} metadata names {policy.dotted(module, qualname)}, "
                                   "which is not a Python name (an opcode injection attempt); the file is hostile",
                                   globals_=[policy.dotted(module, qualname)])
        if policy.is_dangerous(module, qualname):
            raise UnsafeCheckpoint(f"refusing to load {where}: its {KEY} metadata names {module}.{qualname}, which "
                                   "would run code if a converter wrote it into a pickle; do not use this file unless "
                                   "you trust its source", globals_=[f"{module}.{qualname}"])
        if len(self.seen_globals) < 10_000 and (module, qualname) not in self.seen_globals:
            self.seen_globals.append((module, qualname))
        return foreign_class(module, qualname)


def _dec_tensor(d, node, val, depth):
    if val not in d.tensors:
        raise d.bad(f"refers to missing tensor {val!r}")
    ref = d.tensors[val]
    d.used.add(val)
    if "dtype" in node:
        dt, shape = node["dtype"], node.get("shape")
        if dt not in dtypes.DTYPES or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise d.bad(f"bad raw tensor description for {val!r}")
        n = math.prod(shape)
        if n * dtypes.itemsize(dt) != ref.storage.nbytes:
            raise d.bad(f"raw tensor {val!r} holds {ref.storage.nbytes} bytes, not {n} x {dt}")
        ref = TensorRef(ref.storage, dt, shape)
        ref.storage.dtype = dt
    if node.get("param") or node.get("requires_grad"):
        ref = TensorRef(ref.storage, ref.dtype, ref.shape, ref.stride, ref.offset,
                        bool(node.get("requires_grad")), bool(node.get("param")))
        d.tensors[val] = ref
    return ref


def _dec_mapping(d, node, val, depth, tag):
    out = OrderedDict() if tag == "$odict" else {}
    for k, v in d.pairs(val, tag):
        key = d.key(k, depth + 1)
        try:
            out[key] = d.dec(v, depth + 1)
        except TypeError:
            raise d.bad("unhashable key") from None
    if "$attrs" in node:
        if tag != "$odict":
            raise d.bad("$attrs outside $odict")
        attrs = d.dec(node["$attrs"], depth + 1)
        if type(attrs) is not dict:
            raise d.bad("$attrs must be a mapping")
        out.__dict__.update(attrs)
    return out


def _dec_set(kind):
    def dec(d, node, val, depth):
        try:
            return kind(d.dec(v, depth + 1) for v in _list(val, d.bad))
        except TypeError:
            raise d.bad("unhashable set member") from None
    return dec


def _dec_base64(d, node, val, depth, tag):
    try:
        data = base64.b64decode(val, validate=True)
    except (ValueError, TypeError):
        raise d.bad(f"bad base64 in {tag}") from None
    if tag == "$bytes":
        return data
    if tag == "$bytearray":
        return bytearray(data)
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise d.bad("$str is not UTF-8") from None


def _dec_int(d, node, val, depth):
    digits = val[1:] if type(val) is str and val.startswith("-") else val
    if type(digits) is not str or not digits or not set(digits) <= HEX_DIGITS:
        raise d.bad("bad $int")
    return int(val, 16)  # base 16 has no digit limit


def _dec_float(d, node, val, depth):
    if val not in ("nan", "inf", "-inf"):
        raise d.bad("bad float")
    return float(val)


def _dec_complex(d, node, val, depth):
    v = _list(val, d.bad)
    if len(v) != 2 or not all(type(x) in (int, float) for x in v):
        raise d.bad("bad complex")
    return complex(*v)


def _dec_size(d, node, val, depth):
    if not all(type(x) is int for x in _list(val, d.bad)):
        raise d.bad("bad size")
    return TorchSize(val)


def _dec_dtype(d, node, val, depth):
    if val not in dtypes.DTYPES and val not in dtypes.QUANTIZED:
        raise d.bad("unknown dtype")
    return TorchDtype(val)


def _dec_device(d, node, val, depth):
    if type(val) is not str:
        raise d.bad("bad device")
    return TorchDevice(val)


def _dec_ref(d, node, val, depth):
    if type(val) is not int or val not in d.objects:
        raise d.bad("$ref to an object not defined before it")
    if val in d.expanded:  # a walk descends into the shared object again here: count its whole tree once more
        nodes, height = d.expanded[val]
        d.count(nodes - 1, depth + height)
    # else a back-reference from inside the object's own state: a walk visits it and goes no further
    return d.objects[val]


def _dec_object(d, node, val, depth):
    if val == "builtins:getattr":  # only as the unpickler allows it: a method of torch.compile's wrapper
        args = [d.dec(a, depth + 1) for a in _list(node.get("args", []), d.bad)]
        if not (len(args) == 2 and isinstance(args[0], Foreign) and args[0].class_name in policy.COMPILE_RECORDS
                and type(args[1]) is str and args[1].isidentifier() and not args[1].startswith("__")):
            d.global_ref(val)  # refused as dangerous
        return foreign_class("builtins", "getattr")(*args)
    cls = d.global_ref(val)
    nodes_before, reach_before = d.nodes, d.reach
    d.reach = depth
    args = [d.dec(a, depth + 1) for a in _list(node.get("args", []), d.bad)]
    d.count(1, depth + 1)  # a walk visits the record's args as a tuple of their own; kwargs and reconstructor not
    kwargs = {}
    for pair in _list(node.get("kwargs", []), d.bad):
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
            raise d.bad("bad kwargs")
        kwargs[pair[0]] = d.key(pair[1], depth + 1)
    obj = cls.__new__(cls, *args, **kwargs) if node.get("new") is True else cls(*args, **kwargs)
    oid = node.get("id")
    if "id" in node:
        if type(oid) is not int or oid in d.objects:
            raise d.bad("bad object id")
        d.objects[oid] = obj  # before its state, which may refer back to it
    if "reconstructor" in node:
        rec = _list(node["reconstructor"], d.bad)
        if len(rec) != 2:
            raise d.bad("bad reconstructor")
        object.__setattr__(obj, "reconstructor", (d.key(rec[0], depth + 1), d.key(rec[1], depth + 1)))
    if "state" in node:
        obj.__setstate__(d.dec(node["state"], depth + 1))
    items, pairs = _list(node.get("listitems", []), d.bad), _list(node.get("dictitems", []), d.bad)
    d.count(bool(items) + bool(pairs) + len(pairs), depth + 1)  # the lists and the (key, value) tuples a walk visits
    for item in items:
        obj.append(d.dec(item, depth + 1))
    for pair in pairs:
        if type(pair) is not list or len(pair) != 2:
            raise d.bad("bad dictitems")
        obj[d.dec(pair[0], depth + 1)] = d.dec(pair[1], depth + 1)
    if "id" in node:
        d.expanded[oid] = (d.nodes - nodes_before + 1, d.reach - depth)
    d.reach = max(d.reach, reach_before)
    return obj


_TAGS = {
    "$tensor": _dec_tensor,
    "$odict": lambda d, node, val, depth: _dec_mapping(d, node, val, depth, "$odict"),
    "$dict": lambda d, node, val, depth: _dec_mapping(d, node, val, depth, "$dict"),
    "$tuple": lambda d, node, val, depth: tuple(d.dec(v, depth + 1) for v in _list(val, d.bad)),
    "$set": _dec_set(set), "$frozenset": _dec_set(frozenset),
    "$bytes": lambda d, node, val, depth: _dec_base64(d, node, val, depth, "$bytes"),
    "$bytearray": lambda d, node, val, depth: _dec_base64(d, node, val, depth, "$bytearray"),
    "$str": lambda d, node, val, depth: _dec_base64(d, node, val, depth, "$str"),
    "$int": _dec_int, "$float": _dec_float, "$complex": _dec_complex, "$size": _dec_size, "$dtype": _dec_dtype,
    "$device": _dec_device, "$class": lambda d, node, val, depth: d.global_ref(val), "$ref": _dec_ref,
    "$object": _dec_object,
}


def _dec_kind(tag):
    """Quantized and sparse tensors, qschemes and layouts: :func:`ckconv.tensor_kinds.decode_record`."""
    def dec(d, node, val, depth):
        return tensor_kinds.decode_record(tag, node, lambda v: d.dec(v, depth + 1),
                                          lambda name: _dec_tensor(d, {"$tensor": name}, name, depth), d.bad)
    return dec


_TAGS.update((tag, _dec_kind(tag)) for tag in tensor_kinds.TAGS)


def _utf8_ok(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a Python str may hold lone surrogates; JSON parsers refuse them)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _utf8_safe(name: str) -> str:
    return name if _utf8_ok(name) else name.encode("utf-8", "backslashreplace").decode("utf-8")


def _list(val, bad):
    if type(val) is not list:
        raise bad("expected a list")
    return val


def dumps(structure) -> str:
    return json.dumps(structure, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def loads(text: str, where=""):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{where}: invalid {KEY} metadata (not JSON: {exc})") from None
