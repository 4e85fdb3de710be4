"""ckconv: safe, lossless PyTorch checkpoint conversion.

The public API is imported lazily so that ``import ckconv`` (and ``ckconv --help``) never imports torch.
"""

from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

if TYPE_CHECKING:  # what type checkers and editors see; at run time each name is imported on first use
    from .api import convert, detect_format, load, parse_size, read, save
    from .bundles import load_bundle, save_bundle
    from .contents.layout import describe
    from .reports.diffing import diff
    from .errors import CkconvError
    from .reports.inspection import inspect
    from .matching.engine import match
    from .matching.report import Ambiguity, Candidate, Filled, KeyEntry, Match, MatchReport, Mismatch
    from .matching.apply import load_into
    from .matching.selectors import freeze

__version__ = "0.1.0"

_API = {
    "read": "api", "load": "api", "save": "api", "convert": "api", "parse_size": "api", "detect_format": "api",
    "inspect": "reports.inspection", "diff": "reports.diffing",
    "CkconvError": "errors",
    "save_bundle": "bundles", "load_bundle": "bundles", "describe": "contents.layout",
    "match": "matching.engine", "load_into": "matching.apply",
    **dict.fromkeys(("MatchReport", "Match", "Mismatch", "Filled", "KeyEntry", "Ambiguity", "Candidate"),
                    "matching.report"),
    "freeze": "matching.selectors",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"ckconv.{_API[name]}"), name)
    raise AttributeError(f"module 'ckconv' has no attribute {name!r}")


def __dir__() -> list:
    """What ``dir(ckconv)`` and editors' completion show: the lazy API too, not only what is imported yet."""
    return sorted(set(globals()) | set(_API))


__all__ = ["hookimpl", "__version__", *_API]
