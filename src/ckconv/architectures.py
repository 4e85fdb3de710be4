"""Model families ckconv can match checkpoints against, and their state_dict specs.

A spec is what matching needs from an architecture: every state_dict key in order with its shape, dtype, whether
it is a parameter or a buffer, and the module that owns it. Models are built on the meta device (no weights are
allocated, nothing is downloaded) and specs are cached in-process and on disk (``$CKCONV_CACHE_DIR``, else
``$XDG_CACHE_HOME/ckconv``, else ``~/.cache/ckconv``; ``CKCONV_CACHE_DIR=`` set but empty disables the disk cache).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

SPEC_VERSION = 1


class ArchitectureSource:
    """A namespace of buildable models (``torchvision:vgg16``).

    * ``name`` -- the namespace;
    * ``list()`` -- model names in it;
    * ``build(model, **options)`` -- an ``nn.Module`` (ckconv builds it under ``torch.device('meta')`` when it only
      needs names and shapes); it must never download weights;
    * ``version`` -- changes whenever the models may change (cached specs are keyed by it);
    * ``auto_exclude`` -- fnmatch patterns of models ``--arch auto`` skips (duplicates of other models).
    """

    name = ""
    version = ""
    auto_exclude: tuple = ()

    def list(self):
        raise NotImplementedError

    def build(self, model, **options):
        raise NotImplementedError


class TorchvisionSource(ArchitectureSource):
    name = "torchvision"
    description = "every model in torchvision.models.list_models()"
    auto_exclude = ("quantized_*",)  # the same float modules as their plain twins

    @property
    def version(self):
        import torchvision

        return torchvision.__version__

    def list(self):
        import torchvision

        return sorted(torchvision.models.list_models())

    def build(self, model, **options):
        import torchvision

        if model not in torchvision.models.list_models():
            raise UsageError(f"torchvision has no model {model!r}; see `ckconv match --arch auto` or "
                             "torchvision.models.list_models()")
        options.setdefault("weights", None)
        params = _params(torchvision.models.get_model_builder(model))
        if "weights_backbone" in params:
            options.setdefault("weights_backbone", None)
        with _no_downloads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet/inception init warnings are noise here
            return torchvision.models.get_model(model, **options)


def _params(fn):
    import inspect

    return inspect.signature(fn).parameters


@contextlib.contextmanager
def _no_downloads():
    """Refuse any weight download while building: ckconv builds architectures, never fetches them."""
    import torch.hub

    def refuse(url, *args, **kwargs):
        raise UsageError(f"building the architecture tried to download {url}; ckconv never downloads weights "
                         "(pass weights options as None)")

    targets = [torch.hub]
    try:
        from torchvision.models import _api

        targets.append(_api)
    except ImportError:
        pass
    saved = [(t, t.load_state_dict_from_url) for t in targets if hasattr(t, "load_state_dict_from_url")]
    for t, _ in saved:
        t.load_state_dict_from_url = refuse
    try:
        yield
    finally:
        for t, fn in saved:
            t.load_state_dict_from_url = fn


# --- naming and building ---------------------------------------------------------------------------------

def sources() -> dict:
    from .plugins import host

    return host().architectures


def resolve(arch: str) -> tuple:
    """``vgg16`` or ``torchvision:vgg16`` -> (source, model name); unknown or ambiguous names are UsageErrors."""
    arch = str(arch).strip()
    known = sources()
    if ":" in arch:
        ns, model = arch.split(":", 1)
        if ns not in known:
            raise UsageError(f"unknown architecture namespace {ns!r}; known: {', '.join(sorted(known)) or 'none'}")
        return known[ns], model
    builtin = [src for ns, src in known.items() if _is_builtin(ns) and arch in _list(src)]
    if len(builtin) == 1:
        return builtin[0], arch  # plain names mean the built-in architectures; plugins are named ns:model
    found = builtin or [src for src in known.values() if arch in _list(src)]
    if not found:
        raise UsageError(f"unknown architecture {arch!r}; try `--arch auto` or a name from "
                         + ", ".join(f"{ns}:" for ns in sorted(known)) + " (e.g. resnet18)")
    if len(found) > 1:
        raise UsageError(f"architecture {arch!r} is ambiguous: " + ", ".join(f"{s.name}:{arch}" for s in found)
                         + "; name one of these")
    return found[0], arch


def _is_builtin(namespace):
    from .plugins import BUILTIN_PLUGINS, host

    return host().owners.get(("architectures", namespace)) in BUILTIN_PLUGINS


_LISTS: dict = {}


def _list(source):
    key = (id(source), source.name)
    if key not in _LISTS:
        _LISTS[key] = list(source.list())
    return _LISTS[key]


def all_architectures(auto=False) -> list:
    """Every ``namespace:model``; ``auto`` leaves out each source's ``auto_exclude`` patterns."""
    import fnmatch

    out = []
    for ns, src in sorted(sources().items()):
        skip = getattr(src, "auto_exclude", ()) if auto else ()
        if "*" in skip:
            continue
        out += [f"{ns}:{m}" for m in _list(src) if not any(fnmatch.fnmatchcase(m, p) for p in skip)]
    return out


def canonical(arch: str) -> str:
    source, model = resolve(arch)
    return f"{source.name}:{model}"


def parse_options(items) -> dict:
    """``["num_classes=10", "aux_logits=False"]`` -> dict; values are Python literals, else plain strings."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"invalid --arch-option {item!r}: use KEY=VALUE, e.g. num_classes=10")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def build(arch: str, options=None, *, device="meta"):
    """Build ``arch`` with ``options``; on the meta device unless told otherwise (weights stay random/empty)."""
    import torch

    source, model = resolve(arch)
    options = parse_options(options)
    try:
        if device != "meta":
            with torch.device(device):
                return source.build(model, **options)
        try:
            with torch.device("meta"):
                return source.build(model, **options)
        except (NotImplementedError, RuntimeError) as exc:
            if "meta" not in str(exc):
                raise
            with _parameters_on_meta():  # models that compute with tensors while building (RegNet)
                return source.build(model, **options)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:  # builders reject bad options this way
        raise UsageError(f"cannot build {source.name}:{model} with options {options}: "
                         f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None


@contextlib.contextmanager
def _parameters_on_meta():
    """Build on the CPU but move each parameter and buffer to meta as it is registered (one at a time)."""
    import torch
    from torch import nn

    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def param(self, name, p):
        if p is not None and p.device.type != "meta":
            p = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        register_parameter(self, name, p)

    def buffer(self, name, b, persistent=True):
        if isinstance(b, torch.Tensor) and b.device.type != "meta":
            b = b.to("meta")
        register_buffer(self, name, b, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


# --- specs -----------------------------------------------------------------------------------------------------

@dataclass
class TensorSpec:
    name: str
    shape: tuple
    dtype: str
    kind: str  # "parameter" or "buffer"
    module: str  # qualified name of the owning module
    module_type: str = ""

    def to_dict(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind,
                "module": self.module, "module_type": self.module_type}


@dataclass
class ArchSpec:
    arch: str
    options: dict = field(default_factory=dict)
    tensors: list = field(default_factory=list)

    def to_dict(self):
        return {"arch": self.arch, "options": self.options, "tensors": [t.to_dict() for t in self.tensors]}

    @property
    def names(self):
        return [t.name for t in self.tensors]


def spec_of_model(model, arch="<model>", options=None) -> ArchSpec:
    """The state_dict spec of an ``nn.Module`` (any device)."""
    from . import dtypes

    owners = {}
    for qual, mod in model.named_modules(remove_duplicate=False):
        owners.setdefault(qual, mod)
    tensors = []
    for name, value in model.state_dict(keep_vars=True).items():
        if not hasattr(value, "shape"):
            continue  # _extra_state and other non-tensor entries
        module_name, _, leaf = name.rpartition(".")
        owner = owners.get(module_name)
        kind = "parameter" if owner is not None and leaf in getattr(owner, "_parameters", {}) else "buffer"
        tensors.append(TensorSpec(name, tuple(value.shape), dtypes.dtype_name(value.dtype), kind, module_name,
                                  type(owner).__name__ if owner is not None else ""))
    return ArchSpec(arch, dict(options or {}), tensors)


_SPECS: dict = {}


def spec(arch: str, options=None) -> ArchSpec:
    """The spec of ``arch`` built with ``options``: from memory, the disk cache, or by building it on meta."""
    source, model = resolve(arch)
    options = parse_options(options)
    name = f"{source.name}:{model}"
    key = (name, _options_key(options), str(getattr(source, "version", "")))
    if key in _SPECS:
        return _SPECS[key]
    path = _cache_path(source, model, options)
    found = _read_cached(path, name, options)
    if found is None:
        found = spec_of_model(build(name, options), name, options)
        _write_cached(path, found)
    _SPECS[key] = found
    return found


def _options_key(options):
    return json.dumps(options, sort_keys=True, default=repr)


def cache_dir() -> Path | None:
    env = os.environ.get("CKCONV_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckconv"


def _cache_path(source, model, options):
    root = cache_dir()
    if root is None:
        return None
    version = str(getattr(source, "version", "") or "unversioned")
    suffix = "-" + hashlib.sha256(_options_key(options).encode()).hexdigest()[:12] if options else ""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{model}{suffix}")
    return root / "specs" / source.name / version / f"{safe}.json"


def _read_cached(path, name, options):
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("ckconv_spec") != SPEC_VERSION or data.get("arch") != name:
            return None
        tensors = [TensorSpec(n, tuple(s), d, k, m, t) for n, s, d, k, m, t in data["tensors"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged cache: rebuild
    return ArchSpec(name, dict(options), tensors)


def _write_cached(path, found: ArchSpec):
    if path is None:
        return
    data = {"ckconv_spec": SPEC_VERSION, "arch": found.arch, "options": _options_key(found.options),
            "tensors": [[t.name, list(t.shape), t.dtype, t.kind, t.module, t.module_type] for t in found.tensors]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
