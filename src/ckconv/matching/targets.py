"""The architectures a checkpoint is matched against: looked up by name among the plugins, built, and specced.

Models are built on the meta device (no weights are allocated, nothing is downloaded), once: specs and each
source's list of model names are cached in-process and on disk (:mod:`ckconv.storage.spec_cache`), keyed by the
source's version as its distribution's metadata says, so a warm cache answers without importing torch.
"""

from __future__ import annotations

import ast
import contextlib

from ..architectures import ArchSpec, TensorSpec, spec_of_model
from ..errors import UsageError, did_you_mean
from ..plugins import BUILTIN_PLUGINS, host
from ..storage import spec_cache


def sources() -> dict:
    return host().architectures


def resolve(arch: str) -> tuple:
    """``vgg16`` or ``torchvision:vgg16`` -> (source, model name); unknown or ambiguous names are UsageErrors."""
    arch = str(arch).strip()
    known = sources()
    if ":" in arch:
        ns, model = arch.split(":", 1)
        if ns not in known:
            raise UsageError(f"unknown architecture namespace {ns!r}{did_you_mean(ns, known)}; known: "
                             f"{', '.join(sorted(known)) or 'none'}")
        try:
            names = _list(known[ns])
        except Exception:  # noqa: BLE001 - a plugin that cannot list its models may still build this one
            names = ()
        if names and model not in names:
            raise UsageError(f"unknown architecture {arch!r}{did_you_mean(model, names, ns + ':')}; "
                             "`ckconv match CKPT --arch auto` ranks them all")
        return known[ns], model
    builtin = [src for ns, src in known.items() if _is_builtin(ns) and arch in _list(src)]
    if len(builtin) == 1:
        return builtin[0], arch  # plain names mean the built-in architectures; plugins are named ns:model
    found = builtin or [src for src in known.values() if arch in _list(src)]
    if not found:
        near = [m for ns, src in sorted(known.items(), key=lambda kv: not _is_builtin(kv[0])) for m in _list(src)]
        raise UsageError(f"unknown architecture {arch!r}{did_you_mean(arch, near)}; `ckconv match CKPT "
                         "--arch auto` ranks them all (namespaces: " + ", ".join(f"{ns}:" for ns in sorted(known))
                         + ")")
    if len(found) > 1:
        raise UsageError(f"architecture {arch!r} is ambiguous: " + ", ".join(f"{s.name}:{arch}" for s in found)
                         + "; name one of these")
    return found[0], arch


def _is_builtin(namespace):
    return host().owners.get(("architectures", namespace)) in BUILTIN_PLUGINS


_LISTS: dict = {}


def source_version(source) -> str:
    """What keys a source's cache entries (see :meth:`ArchitectureSource.cache_version`)."""
    method = getattr(source, "cache_version", None)
    return str(method() if method is not None else getattr(source, "version", "") or "")


def _list(source):
    """A source's model names: from memory, the disk cache (keyed by its version), or ``source.list()``."""
    key = (id(source), source.name)
    if key not in _LISTS:
        version = source_version(source)
        names = spec_cache.read_names(source.name, version) if version else None
        if names is None:
            names = list(source.list())
            if version:
                spec_cache.write_names(source.name, version, names)
        _LISTS[key] = names
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


_SPECS: dict = {}


def spec(arch: str, options=None) -> ArchSpec:
    """The spec of ``arch`` built with ``options``: from memory, the disk cache, or by building it on meta.

    A model that cannot be built with these options is remembered too (the same UsageError, without a rebuild).
    """
    source, model = resolve(arch)
    options = parse_options(options)
    name = f"{source.name}:{model}"
    version = source_version(source)
    key = (name, spec_cache.options_key(options), version)
    if key in _SPECS:
        return _SPECS[key]
    cached = spec_cache.read_spec(source.name, version, model, options) if version else None
    if cached is not None and "error" in cached:
        raise UsageError(cached["error"])
    if cached is not None:
        found = ArchSpec(name, dict(options), [TensorSpec(n, tuple(s), d, k, m, t)
                                               for n, s, d, k, m, t in cached["tensors"]],
                         [tuple(m) for m in cached["modules"]])
    else:
        try:
            found = spec_of_model(build(name, options), name, options)
        except UsageError as exc:
            if version:
                spec_cache.write_spec(source.name, version, model, options, error=str(exc))
            raise
        if version:
            spec_cache.write_spec(source.name, version, model, options,
                                  [[t.name, list(t.shape), t.dtype, t.kind, t.module, t.module_type]
                                   for t in found.tensors], [list(m) for m in found.modules])
    _SPECS[key] = found
    return found
