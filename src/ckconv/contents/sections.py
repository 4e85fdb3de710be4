"""Naming the parts of a checkpoint: model weights, optimizer, scheduler, everything else.

Which of the model parts is *the* model is :func:`ckconv.contents.unwrap.unwrap`'s answer, not this module's.
"""

from __future__ import annotations

from . import modules
from ..model import TensorRef
from ..tree import is_flat_state_dict
from .unwrap import MODEL_KEYS, OPTIMIZER_KEYS, SCHEDULER_KEYS


def section_of(key) -> str:
    if key in OPTIMIZER_KEYS:
        return "optimizer"
    if key in SCHEDULER_KEYS:
        return "scheduler"
    if key in MODEL_KEYS:
        return "model"
    return "other"


def sections(root) -> dict:
    """{section: [top-level keys]}; a flat state_dict and a pickled module are all "model"."""
    if modules.is_module(root):
        return {"model": ["<root>"]}
    if is_flat_state_dict(root) or not isinstance(root, dict):
        return {"model": ["<root>"]} if isinstance(root, dict) and root else {"other": ["<root>"]}
    out: dict = {}
    for key, value in root.items():
        name = section_of(key)
        if name == "other" and modules.is_module(value):  # torch.save({'generator': G, ...}): G is a model
            name = "model"
        if name == "model" and not _has_tensors(value):
            name = "other"
        out.setdefault(name, []).append(key)
    return out


def _has_tensors(node) -> bool:
    if isinstance(node, TensorRef) or modules.is_module(node):
        return True
    if isinstance(node, dict):
        return any(_has_tensors(v) for v in node.values())
    return False
