"""``convert --plain``: a checkpoint that ``torch.load(path, weights_only=True)`` loads with no allowlisting.

What people are told to load with ``weights_only=False`` usually needs it for data, not code: numpy arrays and
scalars, ``argparse.Namespace`` / Lightning's ``AttributeDict`` / omegaconf configs, a whole pickled model, class
references. :func:`plain` rewrites each into what ``weights_only`` accepts, and lists every change:

* a pickled ``nn.Module`` -> its state_dict (the same OrderedDict ``model.state_dict()`` gives, ``ckconv.contents.modules``);
* a numpy array -> a tensor of the same dtype and shape (bytes copied, little-endian); string and object arrays ->
  lists; a numpy scalar -> the Python number; a numpy dtype -> its name;
* an omegaconf ``DictConfig`` / ``ListConfig`` -> the dict / list it holds; other records -> a dict of their state
  (``Namespace(lr=0.1)`` -> ``{'lr': 0.1}``), their items (dict and list subclasses), or, when they carry neither,
  ``{'class': name, 'args': [...]}``;
* a class or function reference -> its dotted name as a string.

Nothing is imported or called: the records are read as data. Tensors, containers and plain values are untouched.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import PurePosixPath, PureWindowsPath

from .. import dtypes, numpy_values, tree
from . import modules
from ..errors import UsageError
from ..model import Foreign, Storage, TensorRef, is_reference

TORCH_OF_NUMPY = {"bool": "bool", "uint8": "uint8", "int8": "int8", "int16": "int16", "int32": "int32",
                  "int64": "int64", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
                  "float16": "float16", "float32": "float32", "float64": "float64", "complex64": "complex64",
                  "complex128": "complex128"}


PATH_CLASSES = {f"pathlib.{c}": c for c in ("Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath",
                                             "PureWindowsPath")}
MAX_LONG1_BITS = 255 * 8 - 1  # weights_only reads ints of up to 255 bytes (LONG1); longer ones need LONG4


def plain(root):
    """-> (new root, [one line per change]); the source tree is not modified."""
    tree.walk(root)  # refuse cycles and bombs before recursing
    rewrite = _Plain()
    return rewrite.conv(root, ()), rewrite.changes


class _Plain:
    """One rewrite: ``conv`` for values, ``key`` for what must stay hashable (dict keys, set elements)."""

    def __init__(self):
        self.changes: list = []
        self.memo: dict = {}
        self.active: set = set()  # records being converted: a reference back to one of them is a cycle

    def note(self, path, text):
        if len(self.changes) < 10_000:
            self.changes.append(f"{tree.format_path(path)}: {text}")

    def conv(self, node, path):
        if id(node) in self.memo:
            return self.memo[id(node)]
        out = self.value(node, path)
        self.memo[id(node)] = out
        return out

    def value(self, node, path):
        if is_reference(node):
            out = f"{node.module}.{node.qualname}"
            self.note(path, f"class reference {out} -> its name")
            return out
        if isinstance(node, Foreign):
            if id(node) in self.active:
                self.note(path, f"reference back to the enclosing {node.class_name} -> None")
                return None
            self.active.add(id(node))
            try:
                return self.record(node, path)
            finally:
                self.active.discard(id(node))
        if isinstance(node, dict):
            return self.mapping(node, path)
        if type(node) in (list, tuple):
            return type(node)(self.conv(v, path + (i,)) for i, v in enumerate(node))
        if type(node) in (set, frozenset):
            if type(node) is frozenset:
                self.note(path, "frozenset -> set")
            return {self.key(v, path) for v in node}
        if type(node) is int and node.bit_length() > MAX_LONG1_BITS:
            self.note(path, f"int of {node.bit_length()} bits -> its hex text (weights_only reads ints up to 255 bytes)")
            return hex(node)
        return node

    def mapping(self, node, path):
        out = type(node)() if type(node) in (dict, OrderedDict) else {}
        for k, v in node.items():
            key = self.key(k, path)
            if key in out:
                raise UsageError(f"--plain: two keys at {tree.format_path(path)} would both become {key!r}; "
                                 "the checkpoint cannot be made plain without losing one")
            out[key] = self.conv(v, path + (k,))
        if getattr(node, "__dict__", None):
            attrs = {k: self.conv(v, path + ("@attrs", k)) for k, v in node.__dict__.items()}
            if type(out) is OrderedDict:
                out.__dict__.update(attrs)
            else:
                self.note(path, "attributes of a dict subclass left out")
        return out

    def key(self, node, path):
        """A dict key or set element, converted and still hashable: records (an enum member, a namedtuple, a
        frozen dataclass) and containers that became unhashable are written as their text."""
        out = self.conv(node, path)
        try:
            hash(out)
            return out
        except TypeError:
            text = _key_text(node)
            self.note(path + (text,), f"key {_describe(node)} -> its text")
            return text

    def record(self, node, path):
        cls = node.class_name
        if modules.is_module(node):
            sd = modules.state_dict(node, where=tree.format_path(path))
            self.note(path, f"pickled module {cls} -> its state_dict ({len(sd)} tensors)")
            return sd
        value = numpy_values.value(node)
        if value is not numpy_values.NOT_NUMPY:
            return self.numpy_value(value, path)
        special = self.special_record(node, cls, path)
        if special is not NOT_SPECIAL:
            return special
        if node.dictitems:  # dict subclasses: defaultdict, AttributeDict, Counter
            self.note(path, f"{cls} -> dict")
            return self.mapping(dict(node.dictitems), path)
        if node.listitems:
            self.note(path, f"{cls} -> list")
            return [self.conv(v, path + (i,)) for i, v in enumerate(node.listitems)]
        if isinstance(node.state, dict) and all(type(k) is str for k in node.state):
            self.note(path, f"{cls} -> dict of its state")
            return {k: self.conv(v, path + (k,)) for k, v in node.state.items()}
        self.note(path, f"{cls} -> {{'class', 'args'}} description")
        out = {"class": cls, "args": [self.conv(a, path + ("args", i)) for i, a in enumerate(node.args)]}
        if node.state is not None:
            out["state"] = self.conv(node.state, path + ("state",))
        return out

    def special_record(self, node, cls, path):
        """omegaconf configs, paths, Counter-like records holding one dict: their content."""
        if cls in ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig") and isinstance(
                node.state, dict) and "_content" in node.state:
            self.note(path, f"{cls} -> its content")
            return self.conv(_omegaconf_content(node.state["_content"]), path)
        if cls.startswith("omegaconf.nodes.") and isinstance(node.state, dict) and "_val" in node.state:
            return self.conv(node.state["_val"], path)
        if cls in PATH_CLASSES and node.args and all(type(a) is str for a in node.args):
            pure = PurePosixPath if "Windows" not in cls else PureWindowsPath  # pure paths never touch the disk
            self.note(path, f"{cls} -> its text")
            return str(pure(*node.args))
        if (len(node.args) == 1 and isinstance(node.args[0], dict) and node.state is None and not node.dictitems
                and not node.listitems):  # collections.Counter(dict) and the like
            self.note(path, f"{cls} -> dict")
            return self.mapping(node.args[0], path)
        return NOT_SPECIAL

    def numpy_value(self, value, path):
        import numpy as np

        if isinstance(value, np.dtype):
            self.note(path, f"numpy dtype {value} -> its name")
            return str(value)
        if isinstance(value, np.generic):
            self.note(path, f"numpy {type(value).__name__} -> Python {type(value.item()).__name__}")
            return value.item()
        name = TORCH_OF_NUMPY.get(value.dtype.name)
        if name is None or name not in dtypes.DTYPES:
            self.note(path, f"numpy {value.dtype} array -> list")
            return self.conv(value.tolist(), path)
        data = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False)).tobytes()
        self.note(path, f"numpy {value.dtype} array {list(value.shape)} -> tensor")
        storage = Storage(f"numpy-{len(self.changes)}", name, len(data), buffer=bytearray(data))
        return TensorRef(storage, name, value.shape)


NOT_SPECIAL = object()


def _describe(node) -> str:
    return node.class_name if isinstance(node, Foreign) else type(node).__name__


def _key_text(node) -> str:
    """``pkg.Color(1)``, ``pkg.Point(1, 2)``, ``(pkg.Color(1), 2)``: a record as its class and arguments."""
    if isinstance(node, Foreign):
        parts = [_key_text(a) for a in node.args]
        if node.state is not None:
            parts.append(f"state={_key_text(node.state)}")
        return f"{node.class_name}({', '.join(parts)})"
    if type(node) in (tuple, list):
        inner = ", ".join(_key_text(v) for v in node)
        return f"({inner}{',' if len(node) == 1 else ''})" if type(node) is tuple else f"[{inner}]"
    if isinstance(node, dict):
        return "{" + ", ".join(f"{_key_text(k)}: {_key_text(v)}" for k, v in node.items()) + "}"
    if type(node) in (set, frozenset):
        return "{" + ", ".join(sorted(_key_text(v) for v in node)) + "}"
    if type(node) is int and node.bit_length() > MAX_LONG1_BITS:
        return hex(node)
    return repr(node)


def _omegaconf_content(content):
    """omegaconf keeps a config's values in ``_content`` (nodes hold ``_val``): take the values, not the nodes."""
    if isinstance(content, dict):
        return {k: _node_value(v) for k, v in content.items()}
    if isinstance(content, list):
        return [_node_value(v) for v in content]
    return content


def _node_value(v):
    if isinstance(v, Foreign) and isinstance(v.state, dict):
        if "_content" in v.state:
            return _omegaconf_content(v.state["_content"])
        if "_val" in v.state:
            return v.state["_val"]
    return v
