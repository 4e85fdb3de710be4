"""Reports without an architecture: every checkpoint key mapped to itself after ``--rename``, and ``--only`` /
``--drop`` applied to a report's target keys."""

from __future__ import annotations

from ..errors import UsageError
from ..rules import parse_renames, rename as apply_renames
from .engine import source_tensors
from .report import Match, MatchReport
from .selectors import filter_keys


def identity_report(ckpt, *, rename=(), section=None) -> MatchReport:
    """No architecture: every checkpoint key maps to itself after ``rename``."""
    rules = parse_renames(rename)
    _, flat, where, path, label = source_tensors(ckpt, section)
    report = MatchReport("<none>", label, where, len(flat), len(flat), source_tensors=flat, section_path=path)
    seen = {}
    for s, ref in flat.items():
        t, applied = apply_renames(s, rules)
        if t in seen:
            raise UsageError(f"--rename maps both {seen[t]!r} and {s!r} to {t!r}")
        seen[t] = s
        report.targets.append(t)
        report.matched.append(Match(t, s, "rename" if applied else "exact", tuple(ref.shape), applied))
    return report


def restrict(report: MatchReport, only, drop, model):
    keep = set(filter_keys(report.targets, only=only, drop=drop, model=model))
    dropped = [t for t in report.targets if t not in keep]
    report.targets = [t for t in report.targets if t in keep]
    report.matched = [m for m in report.matched if m.target in keep]
    report.filled = [f for f in report.filled if f.target in keep]
    report.missing = [e for e in report.missing if e.name in keep]
    report.target_count = len(report.targets) + len(report.missing)
    return dropped
