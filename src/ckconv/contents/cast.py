"""``--dtype`` and ``--dtype-optimizer``: casting the floating tensors of chosen parts of a checkpoint tree.

Casts are lazy: a cast storage converts its source's bytes block by block while a writer streams them.
"""

from __future__ import annotations

from .. import dtypes, tree
from ..dtypes import CAST_NAMES
from ..errors import UsageError
from ..model import Storage, TensorRef
from .layout import model_paths, optimizer_paths
from .optimizer_slots import INTEGER_STATE
from .unwrap import replace


def cast_notes(root, dtype, dtype_optimizer, model_only=False):
    """``--dtype`` / ``--dtype-optimizer``: -> (root, tensors cast, notes).

    ``dtype`` casts the model state_dict and its EMA copies only; ``dtype_optimizer`` casts the optimizers'
    floating state (moments), never their ``step`` counters. Everything else keeps its dtype.
    """
    opt = [] if model_only else optimizer_paths(root)
    total, notes = 0, []
    if dtype:
        within = [()] if model_only else model_paths(root)
        root, cast, skipped = cast_floating(root, dtype, within=within, exclude=opt)
        where = ", ".join(".".join(map(str, p)) or "<root>" for p in within) or "nowhere: no model state_dict found"
        notes.append(f"cast {cast} floating tensors to {CAST_NAMES[dtype]} in the model (at {where}); integer, bool "
                     "and other tensors unchanged" + (f"; left {skipped} float8/complex tensors as they were"
                                                      if skipped else "")
                     + ("; optimizer state kept in its dtype (--dtype-optimizer casts it)"
                        if opt and not dtype_optimizer else ""))
        total += cast
    if dtype_optimizer:
        if not opt:
            raise UsageError("--dtype-optimizer casts optimizer state, but this checkpoint has no optimizer "
                             "state_dict" + (" in what --model-only writes" if model_only else ""))
        root, cast, _ = cast_floating(root, dtype_optimizer, within=opt, keep_keys=INTEGER_STATE)
        notes.append(f"cast {cast} floating optimizer state tensors to {CAST_NAMES[dtype_optimizer]}; step "
                     "counters kept as they were")
        total += cast
    return root, total, notes


def cast_floating(root, dtype, *, within=None, exclude=(), keep_keys=()):
    """Cast float16/bfloat16/float32/float64 tensors to ``dtype`` (storage by storage, views kept).

    -> (new root, tensors cast, float8/complex tensors left). ``within``: key paths (tuples) of the subtrees to
    cast (None: all of ``root``); ``exclude``: key paths left as they are; ``keep_keys``: dict keys whose values
    are never cast (an optimizer's ``step`` counters).
    """
    target = dtypes.CAST_NAMES.get(dtype)
    if target is None:
        raise UsageError(f"unknown --dtype {dtype!r}; use bf16, fp16 or fp32")
    new_storage: dict = {}
    counts = {"cast": 0, "skipped": 0}
    memo: dict = {}
    exclude = {tuple(p) for p in exclude}

    def storage_for(st: Storage):
        if id(st) not in new_storage:
            new_storage[id(st)] = _CastStorage(st, target)
        return new_storage[id(st)]

    def conv(node, path):
        if path in exclude:
            return node
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, TensorRef):
            if node.dtype in dtypes.FLOATING and node.storage.dtype == node.dtype:
                counts["cast"] += node.dtype != target
                out = TensorRef(storage_for(node.storage) if node.dtype != target else node.storage, target,
                                node.shape, node.stride, node.offset, node.requires_grad, node.parameter)
            else:
                counts["skipped"] += node.dtype.startswith(("float8", "complex"))
                out = node
        elif isinstance(node, dict):
            out = type(node)() if type(node) is not dict else {}
            for k, v in node.items():
                out[k] = v if k in keep_keys else conv(v, path + (k,))
            if getattr(node, "__dict__", None):
                out.__dict__.update(node.__dict__)
        elif type(node) is list:
            out = [conv(v, path + (i,)) for i, v in enumerate(node)]
        elif type(node) is tuple:
            out = tuple(conv(v, path + (i,)) for i, v in enumerate(node))
        else:
            out = node
        if not exclude:  # with exclusions a node's cast depends on the path it is reached by
            memo[id(node)] = out
        return out

    def at(node, path, prefix=()):
        if not path:
            return conv(node, prefix)
        key, rest = path[0], path[1:]
        if isinstance(node, list):
            return [at(v, rest, prefix + (i,)) if i == key else v for i, v in enumerate(node)]
        return replace(node, (key,), at(node[key], rest, prefix + (key,)))

    tree.walk(root)
    for path in [()] if within is None else within:
        root = at(root, tuple(path))
    return root, counts["cast"], counts["skipped"]


class _CastStorage(Storage):
    """A storage whose bytes are another storage's, cast to a new dtype when streamed (needs torch)."""

    def __init__(self, source: Storage, target: str):
        n = source.nbytes // dtypes.itemsize(source.dtype) * dtypes.itemsize(target)
        super().__init__(source.key, target, n, label=source.label)
        self.source = source
        self.verified = True

    def chunks(self, start=0, length=None, size=None):
        import torch

        src_size = dtypes.itemsize(self.source.dtype)
        dst_size = dtypes.itemsize(self.dtype)
        if length is None:
            length = self.nbytes - start
        step = (8 << 20) // max(src_size, dst_size) * dst_size
        for pos in range(start, start + length, step):
            n = min(step, start + length - pos)
            raw = bytearray(self.source.read(pos // dst_size * src_size, n // dst_size * src_size))
            t = torch.frombuffer(raw, dtype=dtypes.torch_dtype(self.source.dtype)) if raw else None
            yield b"" if t is None else t.to(dtypes.torch_dtype(self.dtype)).view(torch.uint8).numpy().tobytes()
