"""Two tensors compared element by element, streamed in blocks of
:data:`ckconv.reports.tensorvalues.BLOCK_ELEMENTS` elements and never materialised.

Blocks whose bytes agree in the same dtype are skipped undecoded: the common case (a copy, a converted file) costs
one byte comparison per block.
"""

from __future__ import annotations

import math

import numpy as np

from .. import dtypes
from . import tensorvalues
from ..model import TensorRef
from .diff_report import TensorDiff


def compare_tensors(name, a: TensorRef, b: TensorRef, atol=None, rtol=None) -> TensorDiff:
    """Stream both tensors and compare them element by element (the rules: :func:`ckconv.reports.diffing.diff`)."""
    d = TensorDiff(name, a.dtype, list(a.shape), b.dtype, list(b.shape), None, numel=a.numel)
    if a.shape != b.shape:
        d.equal = d.identical = False
        return d
    tolerant = atol is not None or rtol is not None
    atol, rtol = atol or 0.0, rtol or 0.0
    same_dtype = a.dtype == b.dtype
    as_kind = tensorvalues.common_kind(a.dtype, b.dtype)
    tops, mismatched, bytes_differ = [], 0, False
    for block_a, block_b in zip(tensorvalues.blocks(a), tensorvalues.blocks(b)):
        if same_dtype and block_a == block_b:
            continue
        bytes_differ = True
        x = tensorvalues.decode(block_a, a.dtype, as_kind)
        y = tensorvalues.decode(block_b, b.dtype, as_kind)
        delta = tensorvalues.abs_diff(x, y, as_kind)
        if delta.size:
            tops.append(delta.max())
        if tolerant or not same_dtype:
            mismatched += int(np.count_nonzero(tensorvalues.outside(delta, y, atol, rtol, as_kind)))
        else:
            mismatched += _bit_mismatches(block_a, block_b, dtypes.itemsize(a.dtype))
    if as_kind == "int":
        d.max_abs_diff = int(max(tops, default=0))
    else:
        d.max_abs_diff = math.nan if any(math.isnan(t) for t in tops) else float(max(tops, default=0.0))
    d.mismatched = mismatched
    d.identical = same_dtype and not bytes_differ
    d.equal = mismatched == 0 and (same_dtype or tolerant)
    return d


def _bit_mismatches(x: bytes, y: bytes, itemsize: int) -> int:
    bx = np.frombuffer(x, np.uint8).reshape(-1, itemsize)
    by = np.frombuffer(y, np.uint8).reshape(-1, itemsize)
    return int(np.count_nonzero((bx != by).any(axis=1)))
