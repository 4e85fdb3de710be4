"""What matching found, key by key: :class:`MatchReport` (rendered by ``ckconv match``, written by ``--save-map``).

Each of its lists holds one kind of frozen dataclass, shapes (and lists of names) as tuples, with ``to_dict()``
for ``--json``; ``notes`` holds :class:`~ckconv.model.Note`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from ..model import KeysNote, Note


def _as_tuples(item, *names):
    """Store the named fields of a frozen dataclass as tuples (a shape or a list given as a list)."""
    for name in names:
        object.__setattr__(item, name, tuple(getattr(item, name)))


@dataclass(frozen=True)
class Match:
    """A target key filled from a checkpoint key: paired at step ``how`` after the renames ``steps``."""
    target: str
    source: str
    how: str
    shape: tuple
    steps: tuple = ()
    reshape: tuple | None = None  # the source shape, when the tensor is reshaped to ``shape``
    confidence: float = 1.0

    def __post_init__(self):
        _as_tuples(self, "shape", "steps", *(() if self.reshape is None else ("reshape",)))

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

    def __post_init__(self):
        _as_tuples(self, "target_shape", "source_shape")

    def to_dict(self):
        return {"target": self.target, "source": self.source, "target_shape": list(self.target_shape),
                "source_shape": list(self.source_shape), "how": self.how}


@dataclass(frozen=True)
class Filled:
    """A target key no checkpoint key filled, set to a known value: ``num_batches_tracked`` to 0."""
    target: str
    shape: tuple = ()
    dtype: str = "int64"
    value: int = 0

    def __post_init__(self):
        _as_tuples(self, "shape")

    def to_dict(self):
        return {"target": self.target, "shape": list(self.shape), "dtype": self.dtype, "value": self.value}


@dataclass(frozen=True)
class KeyEntry:
    """A key left alone: a target key nothing filled (``missing``) or a checkpoint key nothing used (``unexpected``)."""
    name: str
    shape: tuple
    dtype: str

    def __post_init__(self):
        _as_tuples(self, "shape")

    def to_dict(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Ambiguity:
    """A pairing refused at ``step`` because more than one was possible: a ``target`` key (or a ``source`` key or
    module) and the ``candidates`` it could have been paired with."""
    step: str
    candidates: tuple
    target: str | None = None
    source: str | None = None

    def __post_init__(self):
        _as_tuples(self, "candidates")
        if (self.target is None) == (self.source is None):
            raise ValueError("an Ambiguity names a target or a source, one of them")

    @property
    def name(self) -> str:
        """The key (or module) that could not be paired: ``target`` or ``source``, whichever is set."""
        return self.target if self.target is not None else self.source

    def to_dict(self):
        side = "target" if self.target is not None else "source"
        return {"step": self.step, side: self.name, "candidates": list(self.candidates)}


@dataclass(frozen=True)
class Candidate:
    """An architecture ``--arch auto`` ranked: the share of its keys filled (``coverage``), the share of checkpoint
    keys used (``used``) and their harmonic mean (``score``), each rounded to 6 places."""
    arch: str
    coverage: float
    used: float
    score: float

    def to_dict(self):
        return {"arch": self.arch, "coverage": self.coverage, "used": self.used, "score": self.score}


def keys_note(head: str, names, listed=3) -> KeysNote:
    names = tuple(names)
    shown = ", ".join(names[:listed]) + (f" and {len(names) - listed} more" if len(names) > listed else "")
    return KeysNote(f"{head}: {shown}", warning=True, head=head, names=names)


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
    filled: list = field(default_factory=list)  # [Filled]: num_batches_tracked
    missing: list = field(default_factory=list)  # [KeyEntry] target keys nothing filled
    unexpected: list = field(default_factory=list)  # [KeyEntry] checkpoint keys nothing used
    mismatched: list = field(default_factory=list)  # [Mismatch] in target order
    ambiguous: list = field(default_factory=list)  # [Ambiguity]
    notes: list = field(default_factory=list)  # [Note]
    arch_options: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)  # --arch auto: [Candidate], best first
    source_tensors: dict = field(default=None, repr=False, compare=False)  # {name: TensorRef}
    targets: list = field(default_factory=list, repr=False, compare=False)  # target names in state_dict order
    section_path: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        self.notes = [Note.of(n) for n in self.notes]

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
        return [e.name for e in self.missing]

    @property
    def unexpected_keys(self) -> list:
        """Checkpoint keys nothing used."""
        return [e.name for e in self.unexpected]

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

    def fit_warnings(self) -> list:
        """[KeysNote] warnings for what an architecture left unfilled and for the checkpoint's tensors that fit
        nowhere in it (left out of the output): part of a conversion's result, for the library and the CLI alike."""
        if self.architecture is None:
            return []
        out = []
        unfilled = self.missing_keys + self.mismatched_keys
        if unfilled:
            out.append(keys_note(f"coverage {self.coverage:.1%}: {len(unfilled)} of {self.arch}'s {self.target_count} "
                                 f"keys not filled ({len(self.missing)} missing, {len(self.mismatched)} with other "
                                 "shapes)", unfilled))
        if self.unexpected:
            out.append(keys_note(f"{len(self.unexpected)} checkpoint keys left out (no place in {self.arch})",
                                 self.unexpected_keys))
        return out

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
                **{key: [item.to_dict() for item in getattr(self, key)]
                   for key in ("matched", "filled", "missing", "unexpected", "mismatched", "ambiguous")},
                "notes": [str(n) for n in self.notes], "candidates": [c.to_dict() for c in self.candidates]}
