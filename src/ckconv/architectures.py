"""The architecture plugin contract: :class:`ArchitectureSource`, and the state_dict spec matching needs.

A spec is every state_dict key of a model in order with its shape, dtype, whether it is a parameter or a buffer,
the module that owns it, and the module tree (for selectors such as ``features[:10]``). Looking architectures up,
building them on the meta device and caching their specs is :mod:`ckconv.matching.targets`' work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import dtypes
from .storage import spec_cache

__all__ = ["ArchSpec", "ArchitectureSource", "ModuleTree", "TensorSpec", "spec_of_model"]


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
