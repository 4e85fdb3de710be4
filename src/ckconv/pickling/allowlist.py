"""Exact names, each with the roles a pickle may give it: the allowlist ckconv writes by and judges by.

A name is a dotted path to an object *defined* where it is named (``obj.__module__ == module``): the classes of
``torch.nn.modules.conv`` are ``torch.nn.modules.conv.Conv2d``..., and ``torch.nn.modules.activation.Tensor`` (which
is ``torch.Tensor``, merely imported there) is on no list. There are no patterns.

A pickle uses a global in one of four roles (:class:`Role`); each name carries the roles it is allowed in:

* **referenced** -- kept as a value (``_norm_layer = BatchNorm2d``, a dtype): imported, never called. Every
  allowed name may be referenced;
* **instantiated** -- made without ``__init__`` (NEWOBJ, ``copyreg._reconstructor``'s class, the type
  ``_rebuild_from_type_v2`` gives a tensor), then handed its state by BUILD;
* **called** -- called by REDUCE (or INST/OBJ) with arguments the file chooses;
* **rebuild** -- handed to a function that calls it with whatever that function likes (``_rebuild_from_type_v2``'s
  rebuild function, a ``defaultdict`` factory, ``_reconstructor``'s base, numpy's ``_reconstruct`` subtype).

The names come from three places, looked up by :func:`roles_of`:

* :data:`GENERATED` (``allowlist_data.py``), generated from :data:`SOURCES` -- each source module's own classes --
  by ``tools/gen_allowlist.py``; ``tests/test_allowlist.py`` regenerates it against the installed packages and
  fails when they disagree;
* :data:`DECLARED`, written by hand: constructors of plain data that may be called, numpy's reconstruction
  helpers, the framework data classes of real checkpoints; the same tool checks each resolves to an object
  defined under that name (or, for :data:`LEGACY_SPELLINGS`, to the same object as its current spelling);
* :func:`declare`, for plugins and other modules (DeepSpeed's loss scaler and stage enum...): exact names with
  roles, checked the same way (``check_names`` in the tool) when their package is installed.

Nothing here imports torch or the named packages.
"""

from __future__ import annotations

import enum

from .allowlist_data import GENERATED

__all__ = ["Role", "roles_of", "declare", "declared", "parse_roles", "SOURCES", "DECLARED", "LEGACY_SPELLINGS"]


class Role(enum.Flag):
    REFERENCED = enum.auto()
    INSTANTIATED = enum.auto()
    CALLED = enum.auto()
    REBUILD = enum.auto()

    @property
    def label(self) -> str:
        return "+".join(m.name.lower() for m in Role if m in self) or "named"


R, I, C, F = Role.REFERENCED, Role.INSTANTIATED, Role.CALLED, Role.REBUILD
_CODES = {"r": R, "i": I, "c": C, "f": F}


def parse_roles(codes: str) -> Role:
    """``"ric"`` -> referenced | instantiated | called (the compact spelling of the data tables)."""
    out = R  # every allowed name may be referenced
    for ch in codes:
        out |= _CODES[ch]
    return out


# Packages and modules whose own classes are generated (``package.*`` walks every submodule), each with the roles
# its classes get: instantiated without __init__ and given their state by BUILD, as torch.save(model) pickles them.
SOURCES = (
    ("torch.nn.modules.*", "ri"),
    ("torch.optim.*", "ri"),
    ("torchvision.models.*", "ri"),
    ("torchvision.ops.*", "ri"),
    ("numpy.dtypes", "ri"),
    ("omegaconf.nodes", "ri"),
)

PATH_CLASSES = ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")

# Exact names written by hand, with their roles (codes as in :func:`parse_roles`).
_PLAIN = ("set", "frozenset", "list", "dict", "tuple", "int", "float", "str", "bool", "bytes", "complex", "bytearray")
DECLARED = {
    **{f"builtins.{n}": "if" for n in _PLAIN}, "builtins.object": "if", "builtins.type": "i",
    "collections.OrderedDict": "icf", "collections.defaultdict": "icf", "collections.Counter": "icf",
    "collections.deque": "icf", "argparse.Namespace": "ic", "_codecs.encode": "c",
    **{f"datetime.{n}": "c" for n in ("datetime", "date", "time", "timedelta", "timezone")}, "decimal.Decimal": "c",
    # constructing a path touches no file; PurePath.__reduce__ is a call with the parts as strings
    **{f"pathlib.{n}": "ic" for n in PATH_CLASSES},
    "numpy._core.multiarray._reconstruct": "c", "numpy._core.multiarray.scalar": "c",
    "numpy.dtype": "icf", "numpy.ndarray": "if",
    "numpy.random._pickle.__randomstate_ctor": "c", "numpy.random._pickle.__bit_generator_ctor": "cf",
    "numpy.random._pickle.__generator_ctor": "c",
    "numpy.random.mtrand.RandomState": "i", "numpy.random._generator.Generator": "i",
    "numpy.random._mt19937.MT19937": "i", "numpy.random._pcg64.PCG64": "i", "numpy.random._pcg64.PCG64DXSM": "i",
    "numpy.random._philox.Philox": "i", "numpy.random._sfc64.SFC64": "i",
    **{f"numpy.{t}": "i" for t in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                    "float16", "float32", "float64", "longdouble", "complex64", "complex128", "str_",
                                    "bytes_", "void", "datetime64", "timedelta64", "generic", "number", "integer",
                                    "floating")},
    "torch.nn.parallel.data_parallel.DataParallel": "i", "torch.nn.parallel.distributed.DistributedDataParallel": "i",
    "torch._dynamo.eval_frame.OptimizedModule": "i", "torch.nn.parameter.Parameter": "i",
    "torch.nn.parameter.Buffer": "i",
    **{f"typing.{n}": "i" for n in ("Any", "Dict", "List", "Tuple", "Optional", "Union")},
    "omegaconf.dictconfig.DictConfig": "i", "omegaconf.listconfig.ListConfig": "i",
    "omegaconf.base.ContainerMetadata": "i", "omegaconf.base.Metadata": "i",
    "lightning.fabric.utilities.data.AttributeDict": "i", "lightning_fabric.utilities.data.AttributeDict": "i",
    "pytorch_lightning.utilities.parsing.AttributeDict": "i", "lightning.pytorch.utilities.parsing.AttributeDict": "i",
    "mmengine.logging.history_buffer.HistoryBuffer": "i", "mmengine.config.config.ConfigDict": "i",
    "timm.utils.model_ema.ModelEmaV2": "i", "timm.utils.model_ema.ModelEmaV3": "i",
    # DeepSpeed's optimizer states: an IntEnum looked up by its value, loss scalers, fragment addresses (issue 25)
    "deepspeed.runtime.zero.config.ZeroStageEnum": "ic", "deepspeed.runtime.fp16.loss_scaler.LossScaler": "i",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "i",
    "deepspeed.utils.tensor_fragment.fragment_address": "i",
}
# Spellings older releases wrote that now resolve to the same object elsewhere (numpy 1.x pickles name
# ``numpy.core.multiarray``, numpy 2 moved it to ``numpy._core``): allowed in the roles of the current name, and
# checked to be that very object.
LEGACY_SPELLINGS = {
    "numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar": "numpy._core.multiarray.scalar",
}

_DECLARED_BY: dict = {}  # name -> (Role, source) for names declared at run time by plugins and other modules
_TABLE: dict | None = None


def _table() -> dict:
    global _TABLE
    if _TABLE is None:
        table = {}
        for module, (codes, names) in GENERATED.items():
            roles = parse_roles(codes)
            for name in names.split():
                table[f"{module}.{name}"] = roles
        for name, codes in DECLARED.items():
            table[name] = table.get(name, R) | parse_roles(codes)
        for old, new in LEGACY_SPELLINGS.items():
            table[old] = table[new]
        _TABLE = table
    return _TABLE


def roles_of(full: str) -> Role:
    """The roles ``full`` (an exact dotted name) is allowed in; ``Role(0)`` for a name on no list."""
    roles = _table().get(full, Role(0))
    extra = _DECLARED_BY.get(full)
    return roles | extra[0] if extra else roles


def declare(names: dict, source: str) -> None:
    """Allow exact names in roles, for a plugin or module that knows them (``{"deepspeed.runtime.zero.config.
    ZeroStageEnum": "ic"}``, codes as in :func:`parse_roles`, or :class:`Role` values). ``source`` says who
    declared them (shown by :func:`check_names`). Names are exact dotted paths; patterns are refused."""
    for full, roles in names.items():
        parts = full.split(".") if isinstance(full, str) else [""]
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise ValueError(f"{source}: {full!r} is not an exact dotted name (patterns are not allowed)")
        role = roles if isinstance(roles, Role) else parse_roles(roles)
        old = _DECLARED_BY.get(full, (Role(0), source))
        _DECLARED_BY[full] = (old[0] | role | R, source)


def declared() -> dict:
    """{name: (Role, source)} of the names declared at run time."""
    return dict(_DECLARED_BY)
