"""The one verdict type: what ``torch.load(weights_only=False)`` of a file would do, as ckconv judges it.

An ordered enum (fickling's ``Severity`` shape): ``skipped < safe < unknown < code < broken < dangerous``, so a file's
verdict is the ``max`` of its findings' verdicts and a folder's exit code follows from the worst one. The members
are strings (``Verdict.SAFE == "safe"``), so JSON output and messages read as they always did.
"""

from __future__ import annotations

import enum

__all__ = ["Verdict", "worst", "FINDINGS", "unknown_globals"]


class Verdict(enum.StrEnum):
    SKIPPED = "skipped"  # not a checkpoint (a README beside the weights): judged by nothing
    SAFE = "safe"  # every global is one ckconv reproduces, or allowlisted in the role the pickle gives it
    UNKNOWN = "unknown"  # names something ckconv does not know; torch would import or call it
    CODE = "code"  # holds code its loader compiles and runs (TorchScript, an exported graph); the weights read apart
    BROKEN = "broken"  # fails a check convert runs (CRC, bounds, limits, one reading)
    DANGEROUS = "dangerous"  # would run commands, import code or touch files under torch.load

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __lt__(self, other):
        return self.rank < Verdict(other).rank

    def __le__(self, other):
        return self.rank <= Verdict(other).rank

    def __gt__(self, other):
        return self.rank > Verdict(other).rank

    def __ge__(self, other):
        return self.rank >= Verdict(other).rank


_RANK = {v: i for i, v in enumerate(Verdict)}
FINDINGS = (Verdict.SAFE, Verdict.UNKNOWN, Verdict.DANGEROUS)  # the buckets a file's globals fall into


def worst(verdicts, default=Verdict.SAFE) -> Verdict:
    """The highest-ranked of ``verdicts`` (strings or members), ``default`` for none."""
    return max((Verdict(v) for v in verdicts), default=Verdict(default))


def unknown_globals(names, limit=8) -> str:
    """The one sentence for an ``unknown`` verdict: ``names globals ckconv does not know to be benign: a, b and 3
    more; torch.load(weights_only=False) would call them``, naming the first ``limit`` (None: every one)."""
    more = len(names) - limit if limit is not None and len(names) > limit else 0
    shown = ", ".join(names[:limit]) + (f" and {more} more" if more else "")
    return f"names globals ckconv does not know to be benign: {shown}; torch.load(weights_only=False) would call them"
