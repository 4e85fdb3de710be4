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

from .. import dtypes
from . import policy
from ..errors import CorruptCheckpoint, UnsafeCheckpoint
from ..model import Foreign, TensorRef, TorchDevice, TorchDtype, TorchSize, foreign_class, is_reference
from ..tree import MAX_DEPTH, format_path, walk

KEY = "ckconv.structure"
BIG_INT_BITS = 13_000  # longer ints (about 3,900 digits) are written as {"$int": hex}: JSON's int->str limit is 4,300
HEX_DIGITS = frozenset("0123456789abcdef")


def tensor_name(path) -> str:
    return format_path(path) if path else "tensor"


def encode(root, raw_dtypes=frozenset(), namer=None):
    """-> (json-able structure, [(name, TensorRef)] of distinct tensors in order, needs_structure).

    ``raw_dtypes``: dtypes the target cannot name; their tensors are described in the structure (dtype, shape) so
    a format can store them as raw bytes. ``namer(path)`` may return a better name than the path (bundles name
    optimizer state by parameter name: ``optimizer.state.features.0.weight.exp_avg``).
    """
    walk(root)  # refuse cycles and bombs before recursing
    names: dict = {}  # view key -> name
    objects: dict = {}  # id of a foreign record -> its number, for "$ref"
    used: set = set()
    named: list = []

    def name_for(path, ref):
        key = ref.view_key()
        if key in names:
            return names[key], True
        base = _utf8_safe((namer(path) if namer else None) or tensor_name(path))
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}#{n}"
        used.add(name)
        names[key] = name
        named.append((name, ref))
        return name, False

    def enc(node, path):
        if type(node) is str:
            return node if _utf8_ok(node) else {"$str": base64.b64encode(node.encode("utf-8", "surrogatepass")).decode()}
        if node is None or type(node) is bool:
            return node
        if type(node) is int:
            return node if node.bit_length() <= BIG_INT_BITS else {"$int": format(node, "x")}
        if type(node) is float:
            return node if math.isfinite(node) else {"$float": repr(node)}
        if isinstance(node, TensorRef):
            name, _ = name_for(path, node)
            out = {"$tensor": name}
            if node.parameter:
                out["param"] = True
            if node.requires_grad:
                out["requires_grad"] = True
            if node.dtype in raw_dtypes:
                out["dtype"] = node.dtype
                out["shape"] = list(node.shape)
            return out
        if isinstance(node, TorchSize):
            return {"$size": list(node)}
        if isinstance(node, TorchDtype):
            return {"$dtype": str(node)}
        if isinstance(node, TorchDevice):
            return {"$device": str(node)}
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
        if type(node) in (bytes, bytearray):
            return {"$" + type(node).__name__: base64.b64encode(node).decode()}
        if type(node) is complex:
            return {"$complex": [node.real, node.imag]}
        if is_reference(node):
            return {"$class": f"{node.module}:{node.qualname}"}
        if isinstance(node, Foreign):
            if id(node) in objects:  # shared, or reached again inside its own state (a back-reference)
                return {"$ref": objects[id(node)]}
            objects[id(node)] = len(objects)
            out = {"$object": f"{node.module}:{node.qualname}", "id": objects[id(node)]}
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
        raise CorruptCheckpoint(f"cannot encode a value of type {type(node).__name__} at {format_path(path)}")

    structure = enc(root, ())
    plain = (type(root) is dict and len(named) == len(root) and bool(root)
             and all(type(k) is str and isinstance(v, TensorRef) and not v.parameter and not v.requires_grad
                     and v.dtype not in raw_dtypes and names[v.view_key()] == k for k, v in root.items()))
    return structure, named, not plain


def decode(structure, tensors: dict, where="", seen_globals=None):
    """Rebuild the tree from ``encode``'s JSON; ``tensors`` maps names to TensorRefs. Strict: any surprise is an error.

    Class names (``$object``, ``$class``) are untrusted: a name that is not dotted identifiers, or a dangerous one,
    is refused (:class:`UnsafeCheckpoint`); ``seen_globals`` (a list) receives the others, for verdicts."""
    used: set = set()
    objects: dict = {}  # "id" -> foreign record, for "$ref"
    seen_globals = [] if seen_globals is None else seen_globals

    def bad(msg):
        return CorruptCheckpoint(f"{where}: invalid {KEY} metadata ({msg}); the file was altered or written by a newer ckconv")

    def global_ref(val):
        """A class name from the metadata: untrusted input, checked exactly like a pickle's GLOBAL opcode."""
        if type(val) is not str or ":" not in val:
            raise bad("bad object class")
        module, qualname = val.split(":", 1)
        if not policy.valid_name(module, qualname):
            raise UnsafeCheckpoint(f"refusing to load {where}: its {KEY} metadata names {policy.dotted(module, qualname)}, "
                                   "which is not a Python name (an opcode injection attempt); the file is hostile",
                                   globals_=[policy.dotted(module, qualname)])
        if policy.is_dangerous(module, qualname):
            raise UnsafeCheckpoint(f"refusing to load {where}: its {KEY} metadata names {module}.{qualname}, which "
                                   "would run code if a converter wrote it into a pickle; do not use this file unless "
                                   "you trust its source", globals_=[f"{module}.{qualname}"])
        if len(seen_globals) < 10_000 and (module, qualname) not in seen_globals:
            seen_globals.append((module, qualname))
        return foreign_class(module, qualname)

    def dec(node, depth):
        if depth > MAX_DEPTH:
            raise bad("nesting too deep")
        if node is None or type(node) in (bool, str, int, float):
            return node
        if type(node) is list:
            return [dec(v, depth + 1) for v in node]
        if type(node) is not dict:
            raise bad(f"unexpected {type(node).__name__}")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: dec(v, depth + 1) for k, v in node.items()}
        tag = tags[0]
        val = node[tag]
        if tag == "$tensor":
            if val not in tensors:
                raise bad(f"refers to missing tensor {val!r}")
            ref = tensors[val]
            used.add(val)
            if "dtype" in node:
                dt, shape = node["dtype"], node.get("shape")
                if dt not in dtypes.DTYPES or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                    raise bad(f"bad raw tensor description for {val!r}")
                n = 1
                for s in shape:
                    n *= s
                if n * dtypes.itemsize(dt) != ref.storage.nbytes:
                    raise bad(f"raw tensor {val!r} holds {ref.storage.nbytes} bytes, not {n} x {dt}")
                ref = TensorRef(ref.storage, dt, shape)
                ref.storage.dtype = dt
            if node.get("param") or node.get("requires_grad"):
                ref = TensorRef(ref.storage, ref.dtype, ref.shape, ref.stride, ref.offset,
                                bool(node.get("requires_grad")), bool(node.get("param")))
                tensors[val] = ref
            return ref
        if tag in ("$odict", "$dict"):
            out = OrderedDict() if tag == "$odict" else {}
            if type(val) is not list or not all(type(p) is list and len(p) == 2 for p in val):
                raise bad(f"{tag} must be a list of pairs")
            for k, v in val:
                key = dec(k, depth + 1)
                try:
                    out[key] = dec(v, depth + 1)
                except TypeError:
                    raise bad("unhashable key") from None
            if "$attrs" in node:
                if tag != "$odict":
                    raise bad("$attrs outside $odict")
                attrs = dec(node["$attrs"], depth + 1)
                if type(attrs) is not dict:
                    raise bad("$attrs must be a mapping")
                out.__dict__.update(attrs)
            return out
        if tag == "$tuple":
            return tuple(dec(v, depth + 1) for v in _list(val, bad))
        if tag in ("$set", "$frozenset"):
            try:
                return (set if tag == "$set" else frozenset)(dec(v, depth + 1) for v in _list(val, bad))
            except TypeError:
                raise bad("unhashable set member") from None
        if tag in ("$bytes", "$bytearray", "$str"):
            try:
                data = base64.b64decode(val, validate=True)
            except (ValueError, TypeError):
                raise bad(f"bad base64 in {tag}") from None
            if tag == "$bytes":
                return data
            if tag == "$bytearray":
                return bytearray(data)
            try:
                return data.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise bad("$str is not UTF-8") from None
        if tag == "$int":
            digits = val[1:] if type(val) is str and val.startswith("-") else val
            if type(digits) is not str or not digits or not set(digits) <= HEX_DIGITS:
                raise bad("bad $int")
            return int(val, 16)  # base 16 has no digit limit
        if tag == "$float":
            if val not in ("nan", "inf", "-inf"):
                raise bad("bad float")
            return float(val)
        if tag == "$complex":
            v = _list(val, bad)
            if len(v) != 2 or not all(type(x) in (int, float) for x in v):
                raise bad("bad complex")
            return complex(*v)
        if tag == "$size":
            if not all(type(x) is int for x in _list(val, bad)):
                raise bad("bad size")
            return TorchSize(val)
        if tag == "$dtype":
            if val not in dtypes.DTYPES:
                raise bad("unknown dtype")
            return TorchDtype(val)
        if tag == "$device":
            if type(val) is not str:
                raise bad("bad device")
            return TorchDevice(val)
        if tag == "$class":
            return global_ref(val)
        if tag == "$ref":
            if type(val) is not int or val not in objects:
                raise bad("$ref to an object not defined before it")
            return objects[val]
        if tag == "$object":
            if val == "builtins:getattr":  # only as the unpickler allows it: a method of torch.compile's wrapper
                args = [dec(a, depth + 1) for a in _list(node.get("args", []), bad)]
                if not (len(args) == 2 and isinstance(args[0], Foreign) and args[0].class_name in policy.COMPILE_RECORDS
                        and type(args[1]) is str and args[1].isidentifier() and not args[1].startswith("__")):
                    global_ref(val)  # refused as dangerous
                return foreign_class("builtins", "getattr")(*args)
            cls = global_ref(val)
            args = [dec(a, depth + 1) for a in _list(node.get("args", []), bad)]
            kwargs = {}
            for pair in _list(node.get("kwargs", []), bad):
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                    raise bad("bad kwargs")
                kwargs[pair[0]] = dec(pair[1], depth + 1)
            obj = cls.__new__(cls, *args, **kwargs) if node.get("new") is True else cls(*args, **kwargs)
            if "id" in node:
                if type(node["id"]) is not int or node["id"] in objects:
                    raise bad("bad object id")
                objects[node["id"]] = obj  # before its state, which may refer back to it
            if "reconstructor" in node:
                rec = _list(node["reconstructor"], bad)
                if len(rec) != 2:
                    raise bad("bad reconstructor")
                object.__setattr__(obj, "reconstructor", (dec(rec[0], depth + 1), dec(rec[1], depth + 1)))
            if "state" in node:
                obj.__setstate__(dec(node["state"], depth + 1))
            for item in _list(node.get("listitems", []), bad):
                obj.append(dec(item, depth + 1))
            for pair in _list(node.get("dictitems", []), bad):
                if type(pair) is not list or len(pair) != 2:
                    raise bad("bad dictitems")
                obj[dec(pair[0], depth + 1)] = dec(pair[1], depth + 1)
            return obj
        raise bad(f"unknown tag {tag}")

    try:
        root = dec(structure, 0)
    except RecursionError:
        raise bad("nesting too deep") from None
    unused = set(tensors) - used
    if unused:
        raise bad(f"{len(unused)} tensors are not referenced, e.g. {sorted(unused)[0]!r}")
    return root


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
