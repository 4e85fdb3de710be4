"""Applying a match: the remapped state_dict a :class:`MatchReport` describes, as TensorRefs (for writing) or
torch tensors, and ``load_into``, which copies a checkpoint's matched tensors into a live model."""

from __future__ import annotations

import warnings
from collections import OrderedDict

from .. import tree
from ..model import Storage, TensorRef, gather
from .engine import match
from .report import MatchReport


def _zero_ref(name):
    return TensorRef(Storage(f"ckconv-fill-{name}", "int64", 8, buffer=bytes(8)), "int64", ())


def _reshaped(ref: TensorRef, shape):
    if ref.is_contiguous:
        return TensorRef(ref.storage, ref.dtype, shape, None, ref.offset, ref.requires_grad, ref.parameter)
    data = gather(ref)
    return TensorRef(Storage(f"{ref.storage.key}-reshaped", ref.dtype, len(data), buffer=data), ref.dtype, shape,
                     None, 0, ref.requires_grad, ref.parameter)


def remap_refs(report: MatchReport, refs=None) -> OrderedDict:
    """{target name: TensorRef} in target order: matched tensors (reshaped where recorded) and filled zeros."""
    return _remapped(report, report.source_tensors if refs is None else refs, _reshaped, _zero_ref)


def remap_tensors(report: MatchReport, tensors) -> OrderedDict:
    """The same for torch tensors ``{source name: tensor}``."""
    import torch  # deferred: matching answers from cached specs without importing torch

    return _remapped(report, tensors, lambda t, shape: t.reshape(shape),
                     lambda _name: torch.tensor(0, dtype=torch.int64))


def _remapped(report, values, reshape, zero):
    mapping = report.mapping()
    filled = {f.target for f in report.filled}
    out = OrderedDict()
    for t in report.targets:
        if t in mapping:
            m = mapping[t]
            out[t] = reshape(values[m.source], m.shape) if m.reshape is not None else values[m.source]
        elif t in filled:
            out[t] = zero(t)
    return out


def load_into(model, ckpt, *, rename=(), section=None, only=(), drop=(), strict=False, structural=True,
              allow_reshape=True, ema=False) -> MatchReport:
    """Match ``ckpt`` onto ``model`` and copy the matched tensors in; -> the MatchReport, whose ``missing_keys``,
    ``unexpected_keys`` and ``mismatched_keys`` say what was skipped, as ``load_state_dict``'s result does (and a
    warning says it too: nothing is skipped silently).

    ``ema``: load the EMA weights (LitEma, timm, AveragedModel, mmengine layouts; refused when there are none).
    With ``strict`` nothing is loaded unless every key of ``model`` (or of its ``only`` part) is filled.
    """
    import torch  # deferred: matching answers from cached specs without importing torch


    report = match(ckpt, model, rename=rename, section=section, only=only, drop=drop, structural=structural,
                   allow_reshape=allow_reshape, ema=ema)
    if strict:
        report.check_strict()
    needed = {m.source: report.source_tensors[m.source] for m in report.matched}
    state = remap_tensors(report, tree.materialize(needed))
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    skipped = report.skipped_text()
    if skipped:  # never silently: load_state_dict(strict=False) returns its lists, load_into warns too
        warnings.warn(f"ckconv.load_into: loaded {len(report.matched)} tensors into {report.arch}; skipped "
                      f"{skipped} (the MatchReport lists all: missing_keys, unexpected_keys, mismatched_keys)",
                      stacklevel=2)
    return report
