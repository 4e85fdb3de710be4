"""ckconv: safe, lossless PyTorch checkpoint conversion.

The public API is imported lazily so that ``import ckconv`` (and ``ckconv --help``) never imports torch.
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"

_API = {
    "read": "api", "load": "api", "save": "api", "convert": "api", "parse_size": "api", "detect_format": "api",
    "inspect": "inspection", "diff": "diffing",
    "CkconvError": "errors",
    "save_bundle": "bundles", "load_bundle": "bundles", "describe": "bundles",
    "match": "matching", "MatchReport": "matching", "load_into": "remap", "freeze": "selectors",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"ckconv.{_API[name]}"), name)
    raise AttributeError(f"module 'ckconv' has no attribute {name!r}")


__all__ = ["hookimpl", "__version__", *_API]
