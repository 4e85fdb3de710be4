"""``ckconv diff``: are two checkpoints the same, whatever their formats?

Tensors decide. Two checkpoints are equal when they hold the same tensor names with equal tensors (bit for bit in
the same dtype, or within ``atol``/``rtol`` across dtypes) and the same non-tensor values (epoch, lr: compared
exactly, tolerance never applies to them). How the values are held -- container types (dict vs OrderedDict, tuple
vs list), key order, the ``_metadata`` attribute torch's state_dicts carry (``@attrs``), parameter flags, dtypes
under a tolerance -- is reported as notes, which make checkpoints differ only with ``strict``.

Tensor bytes are streamed in blocks of :data:`ckconv.reports.tensorvalues.BLOCK_ELEMENTS` elements, never materialised
(:mod:`ckconv.reports.diff_tensors`); the trees are walked by :mod:`ckconv.reports.diff_walk`.
"""

from __future__ import annotations

import math
import os

from .. import tree
from ..errors import UsageError
from ..io import as_checkpoint, read
from ..model import Checkpoint
from .diff_report import DiffReport, TensorDiff
from .diff_walk import Lockstep


def diff(a, b, *, atol: float | None = None, rtol: float | None = None, strict: bool = False,
         tensors_only: bool = False) -> DiffReport:
    """Compare two checkpoints (paths in any format ckconv reads, :class:`Checkpoint` objects or torch objects).

    Without ``atol``/``rtol`` tensors must match bit for bit in the same dtype. With either (the other defaults to
    0), values are compared across dtypes, ``|a - b| <= atol + rtol * |b|`` elementwise like ``torch.allclose``
    except that NaN equals NaN; a dtype difference is then a note. ``tensors_only`` ignores every non-tensor value
    and all structure; ``strict`` makes notes count as differences.

    Tensors and values are matched by dotted name. Both trees are walked in lockstep, so the work is O(nodes) and
    names are built only for what is reported; parts held differently on the two sides (``{"a.b": t}`` against
    ``{"a": {"b": t}}``, a list against a dict) are matched by their dotted names.
    """
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"{name} must be a finite number >= 0, not {value!r}")
    report = DiffReport(_label(a), _label(b), atol, rtol, strict, tensors_only)
    root_a, root_b = _checkpoint(a).root, _checkpoint(b).root
    for root in (root_a, root_b):
        tree.walk(root)  # cycles, depth and size bombs refused first, exactly as everywhere else
    Lockstep(report).run(root_a, root_b)
    return report


def _label(source) -> str:
    """What the report calls a side: a path, never the repr of a whole tree."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Checkpoint):
        return str(source.path or "<checkpoint>")
    return f"<{type(source).__name__}>"


def _checkpoint(source) -> Checkpoint:
    return read(source) if isinstance(source, (str, os.PathLike)) else as_checkpoint(source)


# --- rendering --------------------------------------------------------------------------------------------------

SHOWN = 100  # lines per kind of difference in the text rendering; --json carries up to MAX_LISTED


def printable(text) -> str:
    """A name or value for the terminal: control characters and the like escaped (names come from files)."""
    text = str(text)
    return text if text.isprintable() else ascii(text)[1:-1]


def render(report: DiffReport) -> str:
    """The text form of a report: differences, then the notes block, then one summary line."""
    lines = []

    def listing(kind, line):
        items = getattr(report, kind)
        for item in items[:SHOWN]:
            lines.append(line(item))
        if report.count(kind) > SHOWN:
            listed = "" if len(items) == report.count(kind) else f"; --json lists the first {len(items)}"
            lines.append(f"... and {report.count(kind) - SHOWN} more (see --json{listed})")

    listing("only_in_a", lambda k: f"only in A: {printable(k)}")
    listing("only_in_b", lambda k: f"only in B: {printable(k)}")
    listing("tensors_differ", lambda d: f"differs: {printable(d.name)}: {_tensor_text(d)}")
    listing("values_differ", lambda v: f"differs: {printable(v['name'])}: {printable(v['a'])} vs "
                                       f"{printable(v['b'])}")
    if report.notes:
        lines.append("notes (counted as differences: --strict):" if report.strict
                     else "notes (how things are held; they make a difference only with --strict):")
        listing("notes", lambda n: f"  {printable(n.path)}: {printable(n.detail)}")
    verdict = "equal" if report.equal else "different"
    if report.equal and report.tolerant:
        verdict += f" within atol={report.atol or 0:g}, rtol={report.rtol or 0:g}"
    parts = [f"{_count(report.tensors_compared, 'tensor')}, {_count(report.values_compared, 'value')} compared"]
    if report.tensors_differ:
        parts.append(_count(report.count("tensors_differ"), "tensor") + " differ")
    if report.not_identical:
        parts.append(f"{report.not_identical} not bit-identical, max abs diff {_number(report.max_abs_diff)}")
    if report.values_differ:
        parts.append(_count(report.count("values_differ"), "value") + " differ")
    if report.only_in_a or report.only_in_b:
        parts.append(f"{report.count('only_in_a')} only in A, {report.count('only_in_b')} only in B")
    if report.notes:
        parts.append(_count(report.count("notes"), "note"))
    lines.append(f"{verdict} ({'; '.join(parts)})")
    return "\n".join(lines)


def _tensor_text(d: TensorDiff) -> str:
    if d.max_abs_diff is None:
        return f"shape {d.shape} vs {d.other_shape}" + (f", dtype {d.dtype} vs {d.other_dtype}"
                                                        if d.dtype != d.other_dtype else "")
    text = f"max abs diff {_number(d.max_abs_diff)} ({d.mismatched} of {d.numel} elements differ)"
    return text if d.dtype == d.other_dtype else f"dtype {d.dtype} vs {d.other_dtype}, {text}"


def _number(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")
