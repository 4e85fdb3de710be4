"""What matching found, key by key: :class:`MatchReport` (rendered by ``ckconv match``, written by ``--save-map``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError


@dataclass
class Match:
    target: str
    source: str
    how: str
    shape: tuple
    steps: list = field(default_factory=list)
    reshape: tuple | None = None  # the source shape, when the tensor is reshaped to ``shape``
    confidence: float = 1.0

    def to_dict(self):
        return {"target": self.target, "source": self.source, "how": self.how, "steps": list(self.steps),
                "shape": list(self.shape),
                "reshape": None if self.reshape is None else {"from": list(self.reshape), "to": list(self.shape)},
                "confidence": self.confidence}


@dataclass(frozen=True)
class Mismatch:
    """A target key paired with a checkpoint key (by ``how``) but skipped: their shapes differ and no reshape fits."""
    target: str
    source: str
    target_shape: tuple
    source_shape: tuple
    how: str

    def to_dict(self):
        return {"target": self.target, "source": self.source, "target_shape": list(self.target_shape),
                "source_shape": list(self.source_shape), "how": self.how}


class IncompleteMatch(UsageError):
    """``--strict``: some target keys were left unfilled."""

    exit_code = 1  # an answer (no), not trouble with the request


@dataclass
class MatchReport:
    arch: str
    source: str
    section: str
    target_count: int
    source_count: int
    matched: list = field(default_factory=list)  # [Match] in target order
    filled: list = field(default_factory=list)  # [{target, shape, dtype, value}]: num_batches_tracked
    missing: list = field(default_factory=list)  # [{name, shape, dtype}] target keys nothing filled
    unexpected: list = field(default_factory=list)  # [{name, shape, dtype}] checkpoint keys nothing used
    mismatched: list = field(default_factory=list)  # [Mismatch] in target order
    ambiguous: list = field(default_factory=list)  # [{step, target|source, candidates}]
    notes: list = field(default_factory=list)  # [Note] (or str)
    arch_options: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)  # --arch auto: [{arch, coverage, used, score}]
    source_tensors: dict = field(default=None, repr=False, compare=False)  # {name: TensorRef}
    targets: list = field(default_factory=list, repr=False, compare=False)  # target names in state_dict order
    section_path: tuple = field(default=(), repr=False, compare=False)

    @property
    def architecture(self) -> str | None:
        """The target architecture, or None for a plain rename (``<none>``) or a map without one (``<map>``)."""
        return self.arch if self.arch not in ("<none>", "<map>", "", None) else None

    @property
    def coverage(self) -> float:
        return (len(self.matched) + len(self.filled)) / self.target_count if self.target_count else 0.0

    @property
    def used(self) -> float:
        return len(self.matched) / self.source_count if self.source_count else 0.0

    @property
    def complete(self) -> bool:
        return self.target_count > 0 and not self.missing and not self.mismatched

    @property
    def missing_keys(self) -> list:
        """Target keys nothing filled, as ``load_state_dict``'s result names them."""
        return [e["name"] for e in self.missing]

    @property
    def unexpected_keys(self) -> list:
        """Checkpoint keys nothing used."""
        return [e["name"] for e in self.unexpected]

    @property
    def mismatched_keys(self) -> list:
        """Target keys whose checkpoint tensor has another shape (left as they were)."""
        return [m.target for m in self.mismatched]

    def skipped_text(self, listed=3) -> str:
        """``2 missing (fc.weight, fc.bias), 3 unexpected (aux.0.weight, ...)`` or "" when nothing was skipped."""
        parts = []
        for what, names in (("missing", self.missing_keys), ("unexpected", self.unexpected_keys),
                            ("with other shapes", self.mismatched_keys)):
            if names:
                parts.append(f"{len(names)} {what} ({', '.join(names[:listed])}{', ...' if len(names) > listed else ''})")
        return "; ".join(parts)

    def mapping(self) -> dict:
        return {m.target: m for m in self.matched}

    def check_strict(self):
        if not self.complete:
            unfilled = len(self.missing) + len(self.mismatched)
            raise IncompleteMatch(f"{unfilled} of {self.target_count} target keys of {self.arch} are not filled "
                                  f"({len(self.missing)} missing, {len(self.mismatched)} with other shapes); "
                                  "--strict needs all of them")

    def to_dict(self):
        return {"arch": self.arch, "arch_options": self.arch_options, "source": self.source,
                "section": self.section, "coverage": round(self.coverage, 6), "used": round(self.used, 6),
                "complete": self.complete, "target_count": self.target_count, "source_count": self.source_count,
                "matched": [m.to_dict() for m in self.matched], "filled": self.filled, "missing": self.missing,
                "unexpected": self.unexpected, "mismatched": [m.to_dict() for m in self.mismatched], "ambiguous": self.ambiguous,
                "notes": [str(n) for n in self.notes], "candidates": self.candidates}
