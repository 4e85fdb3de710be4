"""Step 1 of every command that wants the model: find its state_dict inside whatever a training framework saved.

One rule, used by ``--model-only``, ``--arch``, ``match``, ``load_into``, ``--freeze`` and ``inspect``. Layouts
handled: a bare state_dict; ``state_dict`` / ``model`` / ``model_state`` / ``net`` / ``module`` / ... keys (plain
torch, Lightning, mmengine, fvcore/detectron2, timm); a pickled ``nn.Module`` (``torch.save(model)``, also inside a
bundle), whose state_dict :mod:`ckconv.contents.modules` derives without importing its class; EMA copies (``ema``,
``state_dict_ema``, ``model_ema``), chosen only when asked for or when they are all there is; nested dicts of
tensors, flattened with dotted names. Optimizer and scheduler sections are never taken for the model. Among
several candidates: a model key (or the root) before any other key before an EMA key, then the one with more
tensors, then the shallower.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from . import modules
from ..errors import UnsupportedContent, UsageError, did_you_mean
from ..model import Foreign, TensorRef
from ..tensor_kinds import SparseTensor, packed_param
from ..tree import is_flat_state_dict

MODEL_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "module", "network", "weights",
              "params", "state_dict_ema", "ema", "model_ema")
OPTIMIZER_KEYS = ("optimizer", "optimizer_states", "optimizer_state", "optimizer_state_dict", "optim", "opt")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "lr_schedulers", "param_schedulers", "scheduler_state",
                  "scheduler_state_dict")
EMA_KEYS = ("state_dict_ema", "ema", "model_ema", "ema_state_dict", "ema_model")
MAX_DEPTH = 4
SECTION_KEYS = frozenset(MODEL_KEYS + EMA_KEYS + OPTIMIZER_KEYS + SCHEDULER_KEYS)


def refuse_placeholders(root, where="the checkpoint"):
    """A DeepSpeed ZeRO-3 model-states file (``zero_pp_rank_0_mp_rank_00_model_states.pt``) is refused: its
    ``module`` holds shape-[0] placeholders of the partitioned parameters (their real shapes are in
    ``param_shapes``, ``frozen_param_shapes`` and, for tied weights, ``shared_params``; their values in the ranks'
    optimizer-state files). Output made from it cannot be the model."""
    if not isinstance(root, dict) or not isinstance(root.get("module"), dict) or "param_shapes" not in root:
        return
    groups = root["param_shapes"]
    groups = groups if isinstance(groups, (list, tuple)) else [groups]
    shapes = {name: shape for group in groups if isinstance(group, dict) for name, shape in group.items()}
    frozen, shared = root.get("frozen_param_shapes"), root.get("shared_params")
    for name, shape in (frozen.items() if isinstance(frozen, dict) else ()):  # frozen parameters are partitioned too
        shapes.setdefault(name, shape)
    for alias, name in (shared.items() if isinstance(shared, dict) else ()):  # a tied weight: its source's shape
        if isinstance(name, str) and name in shapes:
            shapes.setdefault(alias, shapes[name])
    empty = [name for name, ref in root["module"].items()
             if isinstance(ref, TensorRef) and ref.numel == 0 and _numel(shapes.get(name)) > 0]
    if empty:
        raise UnsupportedContent(
            f"{where} is a DeepSpeed ZeRO-3 model-states file: its 'module' holds {len(empty)} partitioned "
            f"placeholders of shape [0] ({empty[0]} is {list(shapes[empty[0]])} in param_shapes); convert the "
            "DeepSpeed checkpoint folder (the one holding 'latest') instead, which ckconv reads whole")


def _numel(shape) -> int:
    """The element count of a ``param_shapes`` entry; 0 for anything that is not a shape."""
    is_shape = isinstance(shape, (list, tuple)) and all(type(d) is int for d in shape)
    return math.prod(shape) if is_shape else 0


def unwrap(root, section: str | None = None):
    """-> ({name: TensorRef} in file order, where: str, path: tuple of keys leading to it).

    ``section``: a dotted path of keys to take instead of the best guess (``state_dict_ema``, ``model.ema``).
    A bare state_dict comes back as it is (its ``_metadata`` too); a pickled module as ``model.state_dict()``.
    A pickled module whose state_dict cannot be derived is an error, not skipped: it is what the user meant.
    """
    refuse_placeholders(root)
    found, failed = _search(root)
    if section is not None:
        wanted = tuple(p for p in str(section).split(".") if p) if section not in ("", "<root>") else ()
        for path, flat in found:
            if tuple(map(str, path)) == wanted:
                return flat, _where(path), path
        for path, error in failed:
            if tuple(map(str, path)) == wanted:
                raise error
        if not found and failed:
            raise failed[0][1]
        raise UsageError(f"no state_dict at {section!r}{did_you_mean(section, [_where(p) for p, _ in found])}; "
                         "this checkpoint has them at " + ", ".join(_where(p) for p, _ in found[:8]))
    if failed:
        raise failed[0][1]
    if not found:
        raise UsageError("cannot find a model state_dict in this checkpoint: no name -> tensor mapping or pickled "
                         "nn.Module at the top level, under " + ", ".join(MODEL_KEYS[:6]) + ", ... or in nested "
                         "dicts (see `ckconv inspect`)")
    path, flat = min(found, key=lambda c: _rank(*c))
    return flat, _where(path), path


def model_state_dict(root):
    """-> (the model state_dict, where it was found): :func:`unwrap`'s best guess."""
    flat, where, _ = unwrap(root)
    return flat, where


def _where(path):
    return ".".join(map(str, path)) if path else "<root>"


def _rank(path, flat):
    keys = [str(p) for p in path]
    if any(k in EMA_KEYS for k in keys):
        kind = 2
    elif any(k in MODEL_KEYS for k in keys) or not keys:
        kind = 0
    else:
        kind = 1
    return kind, -len(flat), len(keys)


def candidates(root) -> list:
    """[(path, {name: TensorRef})] for every dict holding tensors under string keys and every pickled module."""
    return _search(root)[0]


def _search(root):
    """-> (candidates, [(path, error)] of pickled modules whose state_dict cannot be derived); depth <= MAX_DEPTH."""
    out, failed = [], []
    stack = [((), root)]
    seen = set()
    while stack:
        path, node = stack.pop()
        if id(node) in seen or len(path) > MAX_DEPTH:
            continue
        if modules.is_module(node):
            seen.add(id(node))
            try:
                out.append((path, modules.state_dict(node, where=f"pickled module at {_where(path)}")))
            except modules.ModuleStateError as exc:
                failed.append((path, exc))
            continue
        if not isinstance(node, dict):
            continue
        seen.add(id(node))
        flat = node if is_flat_state_dict(node) else _flatten(node)
        if flat:
            out.append((path, flat))
        if flat is node:  # every value a tensor: nothing below it to search
            continue
        for key, value in reversed(list(node.items())):
            if isinstance(value, (dict, Foreign)) and (isinstance(value, dict) or modules.is_module(value)) and not (
                    key in OPTIMIZER_KEYS or key in SCHEDULER_KEYS):  # a module is a record: tensors cost no call
                stack.append((path + (key,), value))
    return out, failed


def _flatten(node):
    """Tensors under string keys; nested dicts whose leaves are all tensors join with dots. A quantized model's
    packed parameters (``fc._packed_params._packed_params``: a (weight, bias) tuple) are weights too."""
    flat = OrderedDict() if isinstance(node, OrderedDict) else {}
    for key, value in node.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, (TensorRef, SparseTensor)) or packed_param(key, value):
            flat[key] = value
        elif isinstance(value, dict) and value and key not in SECTION_KEYS and _all_tensors(value, 0):
            for sub, ref in _flatten(value).items():
                flat[f"{key}.{sub}"] = ref
    return flat


def _all_tensors(node, depth):
    if depth > MAX_DEPTH:
        return False
    for key, value in node.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, dict):
            if not value or not _all_tensors(value, depth + 1):
                return False
        elif not isinstance(value, TensorRef):
            return False
    return True


def replace(root, path, new):
    """``root`` with the value at ``path`` swapped for ``new``; containers on the way are copied, not mutated.

    A last key that ``root`` lacks is added at the end.
    """
    if not path:
        return new
    key, rest = path[0], path[1:]
    copy = type(root)() if type(root) is not dict else {}
    for k, v in root.items():
        copy[k] = replace(v, rest, new) if k == key else v
    if key not in copy:
        if rest:
            raise KeyError(key)
        copy[key] = new
    if getattr(root, "__dict__", None):
        copy.__dict__.update(root.__dict__)
    return copy
