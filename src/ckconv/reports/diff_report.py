"""What ``ckconv diff`` found: the report and its entries, with every list bounded.

The walk (:mod:`ckconv.reports.diff_walk`) and the tensor comparison (:mod:`ckconv.reports.diff_tensors`) fill
these; :mod:`ckconv.reports.diffing` renders them. They sit below all three so that none imports another upwards.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

MAX_LISTED = int(os.environ.get("CKCONV_DIFF_MAX_LISTED", 100_000))  # entries per list of a report; more counted


@dataclass
class TensorDiff:
    name: str
    dtype: str
    shape: list
    other_dtype: str
    other_shape: list
    max_abs_diff: float | int | None  # None when the shapes differ; NaN when one side has NaN where the other not
    mismatched: int | None = None  # elements that differ (bits in exact mode) or fall outside the tolerance
    numel: int = 0
    equal: bool = True  # counts towards the verdict: shapes, values and (in exact mode) dtypes agree
    identical: bool = True  # same dtype, same shape, same bytes


@dataclass
class Note:
    """A difference in how things are held, not in what: fails the comparison only with ``strict``."""

    path: str
    kind: str  # container, key-order, attrs, dtype, flags, structure
    detail: str


@dataclass
class DiffReport:
    """What :func:`ckconv.reports.diffing.diff` found. Each list holds at most :data:`MAX_LISTED` entries;
    ``omitted`` counts the rest per list (``{"only_in_a": 12}``), so a file with millions of differences costs
    bounded memory."""

    a: str
    b: str
    atol: float | None = None
    rtol: float | None = None
    strict: bool = False
    tensors_only: bool = False
    only_in_a: list = field(default_factory=list)
    only_in_b: list = field(default_factory=list)
    tensors_differ: list = field(default_factory=list)  # [TensorDiff], the ones that count
    values_differ: list = field(default_factory=list)  # [{name, a, b}]
    notes: list = field(default_factory=list)  # [Note]
    tensors: list = field(default_factory=list)  # [TensorDiff] for every tensor compared
    tensors_compared: int = 0
    values_compared: int = 0
    omitted: dict = field(default_factory=dict)  # {list name: entries not listed}

    def __post_init__(self):
        self._top = None  # the largest max abs diff so far (NaN wins), over every tensor compared
        self.not_identical = 0

    @property
    def tolerant(self) -> bool:
        return self.atol is not None or self.rtol is not None

    @property
    def equal(self) -> bool:
        differs = self.only_in_a or self.only_in_b or self.tensors_differ or self.values_differ
        return not differs and not (self.strict and self.notes)

    @property
    def max_abs_diff(self):
        """The largest max abs diff over tensors of equal shapes (NaN when any has a NaN mismatch); None if none."""
        return self._top

    def count(self, kind) -> int:
        """How many entries ``kind`` (``"only_in_a"``, ``"notes"``, ...) has, listed or not."""
        return len(getattr(self, kind)) + self.omitted.get(kind, 0)

    def add(self, kind, make):
        """Append ``make()`` to list ``kind`` while it has room; past that only count (``make`` never called)."""
        items = getattr(self, kind)
        if len(items) < MAX_LISTED:
            items.append(make())
        else:
            self.omitted[kind] = self.omitted.get(kind, 0) + 1

    def to_dict(self):
        d = asdict(self)
        d.update(equal=self.equal, tensors_differing=self.count("tensors_differ"), max_abs_diff=self.max_abs_diff,
                 values_differing=self.count("values_differ"))
        for entry in (d, *d["tensors"], *d["tensors_differ"]):  # JSON has no NaN or infinity
            if isinstance(entry["max_abs_diff"], float) and not math.isfinite(entry["max_abs_diff"]):
                entry["max_abs_diff"] = str(entry["max_abs_diff"])
        return d
