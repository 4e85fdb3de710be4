"""Key renames: regex rules that plugins ship (torchvision's legacy names) and users pass with ``--rename``."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable

from .errors import UsageError

__all__ = ["KeyRule"]


@dataclass(frozen=True)
class KeyRule:
    """Rename checkpoint keys matching ``pattern`` (a regex, searched) to ``replacement`` (as ``re.sub``).

    ``replacement`` may be a string with ``\\1`` groups or a callable taking the match (for renames that compute,
    like ``mask_fcn1`` -> ``0``). ``arch``: an fnmatch pattern, or a tuple of them, naming the architectures the
    rule is for (``densenet*``, ``torchvision:vit_*``, or a model class name such as ``DenseNet`` when matching
    onto an ``nn.Module``), compared case-insensitively; None applies it to every architecture.
    """

    name: str
    pattern: str
    replacement: str | Callable = ""
    arch: str | tuple | None = None
    description: str = ""
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        try:
            object.__setattr__(self, "regex", re.compile(self.pattern))
        except re.error as exc:
            raise UsageError(f"key rule {self.name!r}: invalid regex {self.pattern!r} ({exc})") from None

    def applies_to(self, arch: str | None) -> bool:
        if self.arch is None or not arch:
            return True
        full = arch.lower()
        short = full.split(":", 1)[-1]
        patterns = (self.arch,) if isinstance(self.arch, str) else self.arch
        return any(fnmatch.fnmatchcase(full, p.lower()) or fnmatch.fnmatchcase(short, p.lower()) for p in patterns)

    def apply(self, key: str) -> str:
        try:
            return self.regex.sub(self.replacement, key)
        except (re.error, IndexError) as exc:
            raise UsageError(f"key rule {self.name!r} cannot rename {key!r}: {exc}") from None


def parse_rename(text: str) -> KeyRule:
    """``'REGEX=REPLACEMENT'`` -> KeyRule. Splits at the last ``=``: key names never contain one, regexes may."""
    if isinstance(text, KeyRule):
        return text
    if isinstance(text, (tuple, list)) and len(text) == 2:
        pattern, replacement = text
    else:
        pattern, sep, replacement = str(text).rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"invalid --rename {text!r}: use 'REGEX=REPLACEMENT', e.g. '^backbone\\.=features.'")
    return KeyRule(f"--rename {pattern}={replacement}", pattern, replacement)


def parse_renames(items) -> list:
    return [parse_rename(t) for t in (items or ())]


def rename(key: str, rules) -> tuple[str, list]:
    """Apply ``rules`` in order; -> (new key, names of the rules that changed it)."""
    applied = []
    for rule in rules:
        new = rule.apply(key)
        if new != key:
            applied.append(rule.name)
            key = new
    return key, applied


def rules_for(arch: str | None, rules) -> list:
    return [r for r in rules if r.applies_to(arch)]
