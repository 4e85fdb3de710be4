"""A restricted unpickler: reads torch checkpoints without ever calling code named by the file.

``find_class`` is the only way a pickle reaches a callable. Here it returns either one of ckconv's own builders
(tensors, ``OrderedDict``, ``torch.Size``...) or an inert :class:`~ckconv.model.Foreign` stand-in that only records
what it was given. Globals known to run code (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) are
collected and the load is refused naming them; ``inspect`` reports them instead.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import mmap
import operator
import pickle
from collections import OrderedDict

from .. import dtypes, tree
from ..errors import CkconvError, CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsafeCheckpoint, UnsupportedContent
from ..model import Foreign, GlobalRef, Storage, TensorRef, TorchDtype, foreign_class
from .builders import (BUILTIN_BUILDERS, INT64_MAX, MAX_BUILT_TUPLE, codecs_encode, get_layout, qscheme,
                       rebuild_qtensor, rebuild_sparse_tensor, reconstructor, torch_device, torch_size)
from ..tensor_kinds import QDTYPES, QSCHEMES
from .allowlist import Role
from .scan import scan
from .shadow import MAX_SAME_HASH, SAFE_INT_BITS
from .policy import COMPILE_RECORDS, dotted, is_dangerous, valid_name


# Globals whose meaning ckconv implements itself (never calling the named object).
SAFE_BUILTINS = {"set", "frozenset", "complex", "bytearray", "slice", "range", "bool", "int", "float", "str",
                 "tuple", "list", "dict", "bytes", "object"}
UNSUPPORTED_REBUILDS = {
    "_rebuild_sparse_csr": "sparse CSR tensors of torch before 1.13 are not supported: load and re-save them with a "
                           "current torch",
    "_rebuild_nested_tensor": "nested tensors are not supported: save their components as a list",
    "_rebuild_wrapper_subclass": "tensor subclasses with custom storage (DTensor, fake tensors) are not supported: "
                                 "save .full_tensor() or plain tensors",
    "_rebuild_xla_tensor": "XLA tensors are not supported: move them to the CPU before saving",
    "_rebuild_mkldnn_tensor": "MKL-DNN tensors are not supported: call .to_dense() before saving",
    "_rebuild_meta_tensor_no_storage": "meta tensors carry no data: materialise them before saving",
    "_rebuild_device_tensor_from_numpy": "tensors saved as numpy arrays on a device are not supported",
}


def _no_state(self, state):
    """pickle's BUILD opcode calls this: a file must never rewrite ckconv's own objects (paths, offsets, code)."""
    raise CorruptCheckpoint(f"the pickle tried to modify {self!r} (BUILD on a ckconv object); the file is hostile")


class StorageType:
    """The class named in a persistent id (``torch.FloatStorage``), as a dtype (and its bytes per element)."""

    __slots__ = ("dtype", "itemsize")
    __setstate__ = _no_state

    def __init__(self, dtype):
        self.dtype = dtype
        self.itemsize = dtypes.itemsize(dtype)

    def __repr__(self):
        return f"<storage type {self.dtype}>"


class Builder(GlobalRef):
    """A callable ckconv hands to the unpickler for a global; the file can call it, never modify it. Left in the
    tree as a value (``defaultdict(list)``), it is an inert reference to that global."""

    __slots__ = ("fn", "name", "module", "qualname")
    __setstate__ = _no_state

    def __init__(self, fn, name):
        self.fn = fn
        self.name = name
        self.module, _, self.qualname = name.rpartition(".")

    # Calling the builder calls ``fn`` with no Python frame in between (the C unpickler calls a builder per
    # record: a hundred thousand tensors are two hundred thousand calls): ``builder(*args)`` looks ``__call__`` up
    # on the type, and this property hands back ``self.fn``, which is then called with the arguments.
    __call__ = property(operator.attrgetter("fn"))

    def __repr__(self):
        return f"<ckconv builder for {self.name}>"


class _Marker:
    __slots__ = ("name",)
    __setstate__ = _no_state

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


PARAMETER = _Marker("torch.nn.Parameter")  # the type argument of ``_rebuild_from_type_v2`` for parameters


def short_repr(value, limit=80, _depth=0) -> str:
    """A bounded description of an untrusted value: ``repr`` of a shared structure can take 2**80 steps."""
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:limit])[:limit]
    if value is None or type(value) in (bool, float, complex):
        return repr(value)
    if type(value) is int:
        return repr(value) if value.bit_length() < 256 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (tuple, list)) and _depth < 2:
        inner = ", ".join(short_repr(v, limit, _depth + 1) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        text = f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
        return text[:limit]
    return f"<{type(value).__name__}>"


_INT = frozenset({int})
_NO_ITEMS = ()  # the default of the builders of containers: called with no argument (``OrderedDict()``)
_PLAIN_ITEMSIZE = {name: spec[0] for name, spec in dtypes.DTYPES.items()}  # dtype -> bytes, not the quantized
# The fast tensor check keeps the extent of up to MAX_VIEWS (shape, stride) pairs of up to MAX_FAST_DIMS dimensions
# (more take the step-by-step check): keys a file crafts to share one hash cost a lookup at most 64 comparisons of
# 16 ints, not a scan of every view met.
MAX_FAST_DIMS = 8
MAX_VIEWS = 64


def _ints(value, what, where):
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and 0 <= v <= INT64_MAX for v in value):
        raise CorruptCheckpoint(f"{where}: tensor {what} {short_repr(value)} is not a list of integers "
                                "between 0 and the int64 maximum")
    return tuple(value)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle with ckconv's builders; ``storage_loader(pid)`` resolves persistent ids into Storages."""

    def __init__(self, source, *, storage_loader=None, where=""):
        if storage_loader is not None:  # the C unpickler calls it directly, one Python call per storage
            self.persistent_load = storage_loader
        super().__init__(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        self.storage_loader = storage_loader
        self.where = where
        self.dangerous: list = []
        self.foreign: list = []
        self.globals: list = []  # (module, qualname) of every global named, for verdicts
        self.hash_budget = tree.MAX_NODES  # steps the builders below may spend hashing keys and set members
        self.same_hash: dict = {}  # hash -> how many number keys had it (hash flooding)
        self.collidable = 0  # tuple and frozenset keys seen by the builders
        self._builders: dict = {}
        self._views: dict = {}  # shape + stride -> (element count, offset of the last element), see _view_extent

    def _builder(self, fn, name):
        if name not in self._builders:
            self._builders[name] = Builder(fn, name)
        return self._builders[name]

    # -- the allowlist -----------------------------------------------------------------------------------------
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise CorruptCheckpoint(f"{self.where}: malformed pickle global")
        # Python 2 names, as pickle's own find_class maps them for protocols < 3 (``__builtin__.long`` is how
        # protocol 2 writes the class ``int``; ``copy_reg`` is ``copyreg``)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module in ("builtins", "__builtin__") and name == "getattr":
            return self._builder(self._getattr, "builtins.getattr")  # judged when called: reference or attack
        full = dotted(module, name)
        if (module, name) not in self.globals and len(self.globals) < 10_000:
            self.globals.append((module, name))
        if is_dangerous(module, name):
            if full not in self.dangerous:
                self.dangerous.append(full)
            return foreign_class(module, name) if valid_name(module, name) else foreign_class("invalid", "name")
        if module == "collections" and name == "OrderedDict":
            return self._builder(self._ordered_dict, full)
        if module in ("builtins", "__builtin__") and name == "object":
            return foreign_class("builtins", "object")  # a base-class argument: kept as a reference
        if module in ("builtins", "__builtin__") and name in BUILTIN_BUILDERS:
            fn = BUILTIN_BUILDERS[name]
            return self._builder(getattr(self, fn) if isinstance(fn, str) else fn, f"builtins.{name}")
        if module == "_codecs" and name == "encode":
            return self._builder(codecs_encode, full)
        if module == "copyreg" and name == "_reconstructor":
            return self._builder(reconstructor, full)
        if module == "torch.serialization" and name == "_get_layout":
            return self._builder(get_layout, full)
        if module in ("torch._utils", "torch._tensor", "torch", "torch.nn.parameter", "torch.storage",
                      "torch.cuda"):
            builder = self._torch_global(module, name)
            if builder is not None:
                return self._builder(builder, full) if callable(builder) and not isinstance(builder, type) else builder
        if full not in self.foreign:
            self.foreign.append(full)
        return foreign_class(module, name)

    def _getattr(self, obj, name, *default):
        """``getattr(Class, 'name')`` on an inert class record is a *reference* (how protocol 2 pickles a nested
        qualname such as mmengine's ``HistoryBuffer.min``); on anything else (a module from ``__import__``, a
        builtin) it is how payloads reach ``os.system``: recorded as dangerous, and nothing is looked up."""
        if (isinstance(obj, type) and issubclass(obj, Foreign) and not default and type(name) is str
                and name.isidentifier() and not name.startswith("__")
                and valid_name(obj.module, f"{obj.qualname}.{name}")):
            ref = foreign_class(obj.module, f"{obj.qualname}.{name}")
            if (ref.module, ref.qualname) not in self.globals and len(self.globals) < 10_000:
                self.globals.append((ref.module, ref.qualname))
            if is_dangerous(ref.module, ref.qualname) and ref.class_name not in self.dangerous:
                self.dangerous.append(dotted(ref.module, ref.qualname))
            return ref
        if (isinstance(obj, Foreign) and obj.class_name in COMPILE_RECORDS and not default and type(name) is str
                and name.isidentifier() and not name.startswith("__")):
            return foreign_class("builtins", "getattr")(obj, name)  # a bound method of torch.compile's wrapper
        if "builtins.getattr" not in self.dangerous:
            self.dangerous.append("builtins.getattr")
        return foreign_class("builtins", "getattr")(obj, name, *default)

    def _torch_global(self, module, name):
        if module == "torch._utils":
            if name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
                return self._rebuild_tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
            if name == "_rebuild_qtensor":
                return rebuild_qtensor(self._rebuild_tensor, self.where)
            if name == "_rebuild_sparse_tensor":
                return rebuild_sparse_tensor(self.where)
            if name in UNSUPPORTED_REBUILDS:
                raise UnsupportedContent(f"{self.where}: {UNSUPPORTED_REBUILDS[name]}")
            return None
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch.nn.parameter" and name == "Parameter":
            return PARAMETER
        if module == "torch.storage" and name == "_load_from_bytes":
            raise UnsupportedContent(f"{self.where}: tensors pickled with pickle.dump are not supported: "
                                     "re-save the object with torch.save")
        if module == "torch.storage" and name in ("UntypedStorage", "_UntypedStorage"):
            return StorageType("uint8")
        if module in ("torch", "torch.cuda") and name in dtypes.STORAGE_TO_DTYPE:
            return StorageType(dtypes.STORAGE_TO_DTYPE[name])
        if module == "torch" and name in dtypes.STORAGE_TO_QUANTIZED:
            return StorageType(dtypes.STORAGE_TO_QUANTIZED[name])
        if module == "torch" and name in QSCHEMES:
            return qscheme(name)
        if module == "torch":
            if name == "Size":
                return torch_size
            if name == "device":
                return torch_device
            if name in dtypes.DTYPES:
                return TorchDtype(name)
            if name in dtypes.ALIASES:
                return TorchDtype(dtypes.ALIASES[name])
            if name in dtypes.QUANTIZED:
                return TorchDtype(name)
            if name in ("strided", "sparse_coo", "sparse_csr", "_mkldnn"):
                return foreign_class(module, name)
        return None

    def persistent_load(self, pid):
        if self.storage_loader is None:
            raise CorruptCheckpoint(f"{self.where}: unexpected persistent reference in a plain pickle")
        return self.storage_loader(pid)

    def _rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                        dtype=None, metadata=None, *, quantized=False):
        """``torch._utils._rebuild_tensor_v2``: a :class:`TensorRef` once the view is checked against its storage.

        The record torch.save writes for every plain tensor (its storage's dtype, a shape and a stride as tuples of
        ints, a nonzero element count) is checked here with a few C calls; anything else, and any record that fails
        a check, takes :meth:`_checked_tensor`, which checks step by step and says what is wrong."""
        if (dtype is None and not quantized and type(size) is tuple and type(stride) is tuple
                and len(size) == len(stride) <= MAX_FAST_DIMS and type(storage_offset) is int
                and isinstance(storage, Storage)):
            view = size + stride
            if _INT.issuperset(map(type, view)):  # ints only: hashing it takes one step per element
                extent = self._views.get(view) or self._view_extent(view, size, stride)
                item = _PLAIN_ITEMSIZE.get(storage.dtype) if type(storage.dtype) is str else None
                nbytes = storage.nbytes  # < 0: a legacy storage, sized after the pickle and checked then
                if (extent is not None and item is not None and extent[0] * item <= INT64_MAX
                        and 0 <= storage_offset <= INT64_MAX
                        and (nbytes < 0 or (storage_offset + extent[1] + 1) * item <= nbytes)):
                    return TensorRef(storage, storage.dtype, size, stride, storage_offset, bool(requires_grad))
        return self._checked_tensor(storage, storage_offset, size, stride, requires_grad, dtype, quantized)

    def _view_extent(self, view, size, stride):
        """(element count, offset of the last element) of a shape and stride of ints, kept for the next tensor of
        that view; None when a dimension is 0 or any number is outside 0..int64 max (the step-by-step check then
        decides). At most :data:`MAX_VIEWS` views are kept, so crafted hash collisions cost a bounded time each."""
        if view and (min(view) < 0 or max(view) > INT64_MAX):
            return None
        numel = math.prod(size)  # 1 for a scalar; no dimension 0 (numel > 0): no partial product exceeds the whole
        if not numel:
            return None
        extent = numel, sum(map(operator.mul, size, stride)) - sum(stride)
        if len(self._views) < MAX_VIEWS:
            self._views[view] = extent
        return extent

    def _checked_tensor(self, storage, storage_offset, size, stride, requires_grad, dtype, quantized):
        if not isinstance(storage, Storage):
            raise CorruptCheckpoint(f"{self.where}: tensor without a storage")
        if dtype is None:
            dtype = TorchDtype(storage.dtype)
        if not isinstance(dtype, TorchDtype) or str(dtype) not in dtypes.DTYPES and str(dtype) not in dtypes.QUANTIZED:
            raise CorruptCheckpoint(f"{self.where}: tensor dtype {short_repr(dtype)} is not a torch dtype")
        if str(dtype) in dtypes.QUANTIZED and not quantized:
            raise UnsupportedContent(f"{self.where}: a {dtype} storage rebuilt as a plain tensor (torch.save writes "
                                     "quantized tensors with their quantizer) is not supported: re-save the tensor")
        size = _ints(size, "shape", self.where)
        stride = _ints(stride, "stride", self.where)
        if type(storage_offset) is not int or not 0 <= storage_offset <= INT64_MAX or len(size) != len(stride):
            raise CorruptCheckpoint(f"{self.where}: tensor view has an invalid offset or stride")
        item = dtypes.itemsize(str(dtype))
        numel = 1
        for n in size:
            numel *= n
            if numel * item > INT64_MAX:
                raise CorruptCheckpoint(f"{self.where}: tensor of shape {short_repr(list(size))} holds more than "
                                        "the int64 maximum of bytes; the file is corrupt")
        packed = quantized and QDTYPES[str(dtype)][1] < 8  # sub-byte elements: tensor_kinds checks the packing
        if 0 not in size and storage.nbytes >= 0 and not packed:  # legacy files learn storage sizes after the pickle
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if (last + 1) * item > storage.nbytes:
                raise CorruptCheckpoint(
                    f"{self.where}: tensor view {short_repr(list(size))} at offset {storage_offset} reaches past the "
                    f"end of storage {storage.label} ({storage.nbytes} bytes); the file is corrupt")
        return TensorRef(storage, str(dtype), size, stride, storage_offset, bool(requires_grad))

    # -- builders that hash what the file hands them: every key is charged to a budget first -----------------------
    def _charge(self, values):
        """Account for hashing ``values`` (keys, set members): work, and collisions a file can craft."""
        for value in values:
            if type(value) is float or type(value) is int and (value.bit_length() > SAFE_INT_BITS or value == -1):
                h = hash(value)
                self.same_hash[h] = self.same_hash.get(h, 0) + 1
                if self.same_hash[h] > MAX_SAME_HASH:
                    raise LimitExceeded(f"{self.where}: more than {MAX_SAME_HASH} keys share one hash value; "
                                        "crafted collisions would make loading take hours")
            elif isinstance(value, (tuple, frozenset)):
                self.collidable += 1
                if self.collidable > max(1000, tree.MAX_NODES // 500):
                    raise LimitExceeded(f"{self.where}: too many tuple or frozenset keys; refusing a possible "
                                        "hash-collision attack (raise CKCONV_MAX_NODES if you trust this file)")
            stack = [(value, 0)]
            while stack:
                obj, depth = stack.pop()
                self.hash_budget -= 1 + (obj.bit_length() >> 9 if type(obj) is int else 0)
                if self.hash_budget < 0:
                    raise LimitExceeded(f"{self.where}: structure too large: hashing its keys would take more than "
                                        f"{tree.MAX_NODES} steps (shared references can expand exponentially)")
                if isinstance(obj, tuple):
                    if depth >= tree.MAX_DEPTH:
                        raise LimitExceeded(f"{self.where}: structure too deep: a key nests more than "
                                            f"{tree.MAX_DEPTH} levels")
                    stack.extend((item, depth + 1) for item in obj)

    def _pairs(self, items, what):
        pairs = list(items.items()) if isinstance(items, dict) else list(items)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise CorruptCheckpoint(f"{self.where}: malformed {what} record")
        self._charge(k for k, _ in pairs)
        return pairs

    def _ordered_dict(self, items=_NO_ITEMS):
        if items is _NO_ITEMS:  # every tensor record's backward hooks: nothing to check
            return OrderedDict()
        return OrderedDict(self._pairs(items, "OrderedDict"))

    def _dict(self, items=()):
        return dict(self._pairs(items, "dict"))

    def _set(self, items=()):
        items = list(items)
        self._charge(items)
        return set(items)

    def _frozenset(self, items=()):
        items = list(items)
        self._charge(items)
        return frozenset(items)

    def _tuple(self, items=()):
        items = tuple(items)
        if (len(items) > MAX_BUILT_TUPLE or any(isinstance(i, (tuple, frozenset)) for i in items)
                or any(type(i) is int and i.bit_length() > 64 for i in items)):
            raise LimitExceeded(f"{self.where}: a builtins.tuple record is too large or nested; the file is hostile")
        return items

    def _list(self, items=()):
        return list(items)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise CorruptCheckpoint("parameter without tensor data")
    data.parameter = True
    data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    tensor_builder = isinstance(func, Builder) and func.name.startswith("torch._utils._rebuild_")
    if not (tensor_builder or isinstance(func, type) and issubclass(func, Foreign)) or not isinstance(args, tuple):
        raise CorruptCheckpoint("malformed tensor subclass record")
    value = func(*args)
    if isinstance(value, TensorRef) and new_type is PARAMETER:
        value.parameter = True
    return value


PREFETCH = 1 << 17  # the C unpickler reads ahead this much through peek(), instead of one read() per opcode


def _pickle_bytes(source):
    """(buffer, start, file) for a pickle given as bytes or as a file positioned at it: a read-only map of a real
    file (nothing is copied until the scan has bounded the pickle), the bytes themselves otherwise."""
    if isinstance(source, (bytes, bytearray)):
        return source, 0, None
    if isinstance(source, memoryview):
        return bytes(source), 0, None
    start = source.tell()
    try:
        return mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ), start, source
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # no descriptor (BytesIO), empty file
        return source.read(), 0, _Offset(source, start)


class _Offset:
    """A file read whole from ``start``: positions in the read bytes are ``start`` further on in the file."""

    def __init__(self, f, start):
        self.f, self.start = f, start

    def seek(self, pos):
        return self.f.seek(self.start + pos)


def unpickle(source, *, storage_loader=None, where="", allow_dangerous=False, unpickler_class=None):
    """Run the restricted unpickler on bytes or a file; returns (object, unpickler) so callers see what it saw.

    The opcodes are scanned first (:func:`ckconv.pickling.scan.scan`), so nothing that would crash or stall the C
    unpickler reaches it, and the scan finds where the pickle ends. The C unpickler then reads exactly those bytes
    (a file is left just after the pickle's STOP, as torch's buffered reads leave it), and the roles the scan saw
    are attached to the globals the unpickler met (``up.globals``: (module, qualname, Role)).
    ``unpickler_class`` is a :class:`RestrictedUnpickler` subclass with extra builders (DCP metadata).
    """
    with tree.gc_paused():
        return _unpickle(source, storage_loader, where, allow_dangerous, unpickler_class)


def _unpickle(source, storage_loader, where, allow_dangerous, unpickler_class):
    data, start, f = _pickle_bytes(source)
    try:
        end, roles = scan(data, start, where=where, max_depth=tree.MAX_DEPTH, max_nodes=tree.MAX_NODES)
        body = data[start:end]
    except CkconvError as exc:
        dangerous = [f"{m}.{n}" for m, n in getattr(exc, "roles", ()) if is_dangerous(m, n)]
        if dangerous and not allow_dangerous:
            raise refuse(where, dangerous) from None
        raise
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    if f is not None:
        f.seek(end)
    up = (unpickler_class or RestrictedUnpickler)(io.BufferedReader(io.BytesIO(body), PREFETCH),
                                                  storage_loader=storage_loader, where=where)
    obj = _load(up, where)
    if up.dangerous and not allow_dangerous:
        raise refuse(where, up.dangerous)
    up.globals = [(m, q, roles.get((m, q), Role.REFERENCED)) for m, q in up.globals]
    return obj, up


def _load(up, where):
    try:
        return up.load()
    except CkconvError:
        raise
    except RecursionError:
        raise LimitExceeded(f"{where}: structure too deep to unpickle") from None
    except MemoryError:
        raise LimitExceeded(f"{where}: the pickle asks for more memory than available") from None
    except Exception as exc:  # noqa: BLE001 - every malformed pickle ends here, whatever it raised
        if up.dangerous:  # a payload that breaks the stand-ins (a getattr chain) is still named, inspect included
            raise refuse(where, up.dangerous) from None
        raise NotACheckpoint(f"{where}: not a readable checkpoint (malformed pickle: {type(exc).__name__}: "
                             f"{str(exc)[:160]})") from None


def refuse(where, globals_):
    return UnsafeCheckpoint(
        f"refusing to load {where}: it calls {', '.join(globals_)}; this file runs code when loaded, "
        "do not use it unless you trust its source", globals_=globals_)
