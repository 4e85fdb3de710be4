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

from .. import dtypes, numpy_values, tree
from . import modules
from ..model import Foreign, Storage, TensorRef, is_reference

TORCH_OF_NUMPY = {"bool": "bool", "uint8": "uint8", "int8": "int8", "int16": "int16", "int32": "int32",
                  "int64": "int64", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
                  "float16": "float16", "float32": "float32", "float64": "float64", "complex64": "complex64",
                  "complex128": "complex128"}


def plain(root):
    """-> (new root, [one line per change]); the source tree is not modified."""
    tree.walk(root)  # refuse cycles and bombs before recursing
    changes: list = []
    memo: dict = {}
    active: set = set()  # records being converted: a reference back to one of them is a cycle

    def note(path, text):
        if len(changes) < 10_000:
            changes.append(f"{tree.format_path(path)}: {text}")

    def conv(node, path):
        if id(node) in memo:
            return memo[id(node)]
        out = node
        if is_reference(node):
            out = f"{node.module}.{node.qualname}"
            note(path, f"class reference {out} -> its name")
        elif isinstance(node, Foreign):
            if id(node) in active:
                note(path, f"reference back to the enclosing {node.class_name} -> None")
                return None
            active.add(id(node))
            out = record(node, path)
            active.discard(id(node))
        elif isinstance(node, dict):
            out = type(node)() if type(node) in (dict, OrderedDict) else {}
            for k, v in node.items():
                out[conv(k, path)] = conv(v, path + (k,))
            if getattr(node, "__dict__", None):
                out.__dict__.update({k: conv(v, path + ("@attrs", k)) for k, v in node.__dict__.items()})
        elif type(node) is list:
            out = [conv(v, path + (i,)) for i, v in enumerate(node)]
        elif type(node) is tuple:
            out = tuple(conv(v, path + (i,)) for i, v in enumerate(node))
        elif type(node) in (set, frozenset):
            out = type(node)(conv(v, path + (i,)) for i, v in enumerate(node))
        memo[id(node)] = out
        return out

    def record(node, path):
        cls = node.class_name
        if modules.is_module(node):
            sd = modules.state_dict(node, where=tree.format_path(path))
            note(path, f"pickled module {cls} -> its state_dict ({len(sd)} tensors)")
            return sd
        value = numpy_values.value(node)
        if value is not numpy_values.NOT_NUMPY:
            return numpy_value(value, path)
        if cls in ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig") and isinstance(
                node.state, dict) and "_content" in node.state:
            note(path, f"{cls} -> its content")
            return conv(_omegaconf_content(node.state["_content"]), path)
        if cls.startswith("omegaconf.nodes.") and isinstance(node.state, dict) and "_val" in node.state:
            return conv(node.state["_val"], path)
        if node.dictitems:  # dict subclasses: defaultdict, AttributeDict, Counter
            note(path, f"{cls} -> dict")
            return {conv(k, path): conv(v, path + (k,)) for k, v in node.dictitems}
        if node.listitems:
            note(path, f"{cls} -> list")
            return [conv(v, path + (i,)) for i, v in enumerate(node.listitems)]
        if isinstance(node.state, dict) and all(type(k) is str for k in node.state):
            note(path, f"{cls} -> dict of its state")
            return {k: conv(v, path + (k,)) for k, v in node.state.items()}
        note(path, f"{cls} -> {{'class', 'args'}} description")
        out = {"class": cls, "args": [conv(a, path + ("args", i)) for i, a in enumerate(node.args)]}
        if node.state is not None:
            out["state"] = conv(node.state, path + ("state",))
        return out

    def numpy_value(value, path):
        import numpy as np

        if isinstance(value, np.dtype):
            note(path, f"numpy dtype {value} -> its name")
            return str(value)
        if isinstance(value, np.generic):
            note(path, f"numpy {type(value).__name__} -> Python {type(value.item()).__name__}")
            return value.item()
        name = TORCH_OF_NUMPY.get(value.dtype.name)
        if name is None or name not in dtypes.DTYPES:
            note(path, f"numpy {value.dtype} array -> list")
            return value.tolist()
        data = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False)).tobytes()
        note(path, f"numpy {value.dtype} array {list(value.shape)} -> tensor")
        storage = Storage(f"numpy-{len(changes)}", name, len(data), buffer=bytearray(data))
        return TensorRef(storage, name, value.shape)

    return conv(root, ()), changes


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
