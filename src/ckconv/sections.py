"""Naming the parts of a checkpoint: model weights, optimizer, scheduler, everything else."""

from __future__ import annotations

from .errors import UsageError
from .model import TensorRef
from .tree import is_flat_state_dict

MODEL_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "module", "network", "weights",
              "params", "state_dict_ema", "ema", "model_ema")
OPTIMIZER_KEYS = ("optimizer", "optimizer_states", "optimizer_state", "optimizer_state_dict", "optim", "opt")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "lr_schedulers", "param_schedulers", "scheduler_state",
                  "scheduler_state_dict")


def section_of(key) -> str:
    if key in OPTIMIZER_KEYS:
        return "optimizer"
    if key in SCHEDULER_KEYS:
        return "scheduler"
    if key in MODEL_KEYS:
        return "model"
    return "other"


def sections(root) -> dict:
    """{section: [top-level keys]}; a flat state_dict is all "model"."""
    if is_flat_state_dict(root) or not isinstance(root, dict):
        return {"model": ["<root>"]} if isinstance(root, dict) and root else {"other": ["<root>"]}
    out: dict = {}
    for key, value in root.items():
        name = section_of(key)
        if name == "model" and not _has_tensors(value):
            name = "other"
        out.setdefault(name, []).append(key)
    return out


def _has_tensors(node) -> bool:
    if isinstance(node, TensorRef):
        return True
    if isinstance(node, dict):
        return any(_has_tensors(v) for v in node.values())
    return False


def model_state_dict(root):
    """-> (flat {name: tensor}, where it was found). Prefers the first of MODEL_KEYS that holds tensors."""
    if is_flat_state_dict(root):
        return root, "<root>"
    if isinstance(root, dict):
        for key in MODEL_KEYS:
            value = root.get(key)
            if isinstance(value, dict) and value and is_flat_state_dict(_tensors_only(value)):
                return _tensors_only(value), key
    raise UsageError("cannot find a model state_dict in this checkpoint (looked for a flat name -> tensor mapping "
                     f"at the top level and under {', '.join(MODEL_KEYS)})")


def _tensors_only(d):
    return type(d)((k, v) for k, v in d.items() if isinstance(v, TensorRef))
