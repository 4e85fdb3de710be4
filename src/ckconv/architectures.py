"""Model families ckconv can match checkpoints against, and their state_dict specs.

A spec is what matching needs from an architecture: every state_dict key in order with its shape, dtype, whether
it is a parameter or a buffer, the module that owns it, and the module tree (for selectors such as
``features[:10]``). Models are built on the meta device (no weights are allocated, nothing is downloaded), once:
specs and each source's list of model names are cached in-process and on disk (:mod:`ckconv.spec_cache`), keyed by
the source's version as its distribution's metadata says, so a warm cache answers without importing torch.
"""

from __future__ import annotations

import ast
import contextlib
import warnings
from dataclasses import dataclass, field

from . import spec_cache
from .errors import UsageError

class ArchitectureSource:
    """A namespace of buildable models (``torchvision:vgg16``).

    * ``name`` -- the namespace;
    * ``list()`` -- model names in it;
    * ``build(model, **options)`` -- an ``nn.Module`` (ckconv builds it under ``torch.device('meta')`` when it only
      needs names and shapes); it must never download weights;
    * ``version`` -- changes whenever the models may change (cached specs and name lists are keyed by it);
    * ``distribution`` -- optional: the installed distribution whose version (read from its metadata, without
      importing it) keys the cache instead of ``version``, so a warm cache never imports the library;
    * ``auto_exclude`` -- fnmatch patterns of models ``--arch auto`` skips (duplicates of other models).
    """

    name = ""
    version = ""
    distribution = ""
    auto_exclude: tuple = ()

    def list(self):
        raise NotImplementedError

    def cache_version(self) -> str:
        """The ``distribution``'s installed version when there is one (read without importing it), else
        ``version``."""
        found = spec_cache.distribution_version(self.distribution) if self.distribution else ""
        return found or str(self.version or "")

    def build(self, model, **options):
        raise NotImplementedError


class TorchvisionSource(ArchitectureSource):
    name = "torchvision"
    description = "every model in torchvision.models.list_models()"
    auto_exclude = ("quantized_*",)  # the same float modules as their plain twins
    distribution = "torchvision"

    @property
    def version(self):
        # torchvision's models are torch modules too: a new torch may change their buffers or dtypes
        return (f"{spec_cache.distribution_version('torchvision')}"
                f"+torch{spec_cache.distribution_version('torch')}")

    def cache_version(self):
        return self.version

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
            raise UsageError(f"unknown architecture namespace {ns!r}{_did_you_mean(ns, known)}; known: "
                             f"{', '.join(sorted(known)) or 'none'}")
        try:
            names = _list(known[ns])
        except Exception:  # noqa: BLE001 - a plugin that cannot list its models may still build this one
            names = ()
        if names and model not in names:
            raise UsageError(f"unknown architecture {arch!r}{_did_you_mean(model, names, ns + ':')}; "
                             "`ckconv match CKPT --arch auto` ranks them all")
        return known[ns], model
    builtin = [src for ns, src in known.items() if _is_builtin(ns) and arch in _list(src)]
    if len(builtin) == 1:
        return builtin[0], arch  # plain names mean the built-in architectures; plugins are named ns:model
    found = builtin or [src for src in known.values() if arch in _list(src)]
    if not found:
        near = [m for ns, src in sorted(known.items(), key=lambda kv: not _is_builtin(kv[0])) for m in _list(src)]
        raise UsageError(f"unknown architecture {arch!r}{_did_you_mean(arch, near)}; `ckconv match CKPT "
                         "--arch auto` ranks them all (namespaces: " + ", ".join(f"{ns}:" for ns in sorted(known))
                         + ")")
    if len(found) > 1:
        raise UsageError(f"architecture {arch!r} is ambiguous: " + ", ".join(f"{s.name}:{arch}" for s in found)
                         + "; name one of these")
    return found[0], arch


def _did_you_mean(word, names, prefix="") -> str:
    """'; did you mean vgg16?' for the names nearest ``word`` (typos: a swap, a letter more, less or changed)."""
    word = word.lower()
    limit = max(1, len(word) // 4)
    scored = []
    for name in dict.fromkeys(names):
        if abs(len(name) - len(word)) > limit:
            continue
        d = _edit_distance(word, name.lower(), limit)
        if d <= limit:
            scored.append((d, sorted(name.lower()) != sorted(word), name))  # an anagram (vgg61) is a swap
    if not scored:
        return ""
    scored.sort()
    best = [n for d, swap, n in scored if (d, swap) == scored[0][:2]][:3]
    return "; did you mean " + " or ".join(prefix + n for n in best) + "?"


def _edit_distance(a, b, limit):
    """Optimal string alignment distance (a swap of neighbours counts 1), stopping once past ``limit``."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _is_builtin(namespace):
    from .plugins import BUILTIN_PLUGINS, host

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
    modules: list = field(default_factory=list)  # [(qualified name, class name)] in named_modules() order

    def to_dict(self):
        return {"arch": self.arch, "options": self.options, "tensors": [t.to_dict() for t in self.tensors]}

    @property
    def names(self):
        return [t.name for t in self.tensors]

    def module_tree(self):
        """The model's module tree without torch (for selectors: ``features[:10]`` counts every child)."""
        return ModuleTree.from_spec(self)


class ModuleTree:
    """Just enough of an ``nn.Module`` for :mod:`ckconv.matching.selectors`: children in order, tensors by leaf name."""

    def __init__(self, type_name=""):
        self.type_name = type_name
        self._modules: dict = {}
        self._parameters: dict = {}
        self._buffers: dict = {}

    @classmethod
    def from_spec(cls, spec: ArchSpec):
        nodes = {"": cls(spec.modules[0][1] if spec.modules else "")}
        for qual, type_name in spec.modules:
            if qual in nodes:
                continue
            parent, _, leaf = qual.rpartition(".")
            node = nodes[qual] = cls(type_name)
            nodes.setdefault(parent, cls())._modules[leaf] = node
        for t in spec.tensors:
            leaf = t.name.rpartition(".")[2]
            owner = nodes.setdefault(t.module, cls(t.module_type))
            (owner._parameters if t.kind == "parameter" else owner._buffers)[leaf] = t
        return nodes[""]

    def named_parameters(self, prefix=""):
        for leaf, t in self._parameters.items():
            yield (f"{prefix}.{leaf}" if prefix else leaf), t
        for name, child in self._modules.items():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)


def spec_of_model(model, arch="<model>", options=None) -> ArchSpec:
    """The state_dict spec of an ``nn.Module`` (any device)."""
    from . import dtypes

    owners = {}
    modules = []
    for qual, mod in model.named_modules(remove_duplicate=False):
        if qual not in owners:
            owners[qual] = mod
            modules.append((qual, type(mod).__name__))
    tensors = []
    for name, value in model.state_dict(keep_vars=True).items():
        if not hasattr(value, "shape"):
            continue  # _extra_state and other non-tensor entries
        module_name, _, leaf = name.rpartition(".")
        owner = owners.get(module_name)
        kind = "parameter" if owner is not None and leaf in getattr(owner, "_parameters", {}) else "buffer"
        tensors.append(TensorSpec(name, tuple(value.shape), dtypes.dtype_name(value.dtype), kind, module_name,
                                  type(owner).__name__ if owner is not None else ""))
    return ArchSpec(arch, dict(options or {}), tensors, modules)


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
