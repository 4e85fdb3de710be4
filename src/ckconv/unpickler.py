"""A restricted unpickler: reads torch checkpoints without ever calling code named by the file.

``find_class`` is the only way a pickle reaches a callable. Here it returns either one of ckconv's own builders
(tensors, ``OrderedDict``, ``torch.Size``...) or an inert :class:`~ckconv.model.Foreign` stand-in that only records
what it was given. Globals known to run code (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) are
collected and the load is refused naming them; ``inspect`` reports them instead.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict

from . import dtypes
from .errors import CorruptCheckpoint, NotACheckpoint, UnsafeCheckpoint, UnsupportedContent
from .model import Foreign, TensorRef, TorchDevice, TorchDtype, TorchSize, foreign_class

DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "pickle", "_pickle", "marshal", "shutil",
    "socket", "ctypes", "code", "codeop", "pty", "webbrowser", "types", "pdb", "bdb", "timeit", "commands",
    "platform", "multiprocessing", "asyncio", "threading", "_thread", "signal", "tempfile", "glob", "pathlib",
    "io", "_io", "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests", "httplib", "pip", "setuptools",
    "distutils", "venv", "zipimport", "pkgutil", "inspect", "gc", "operator", "functools", "numpy.testing",
    "dill", "joblib", "cloudpickle", "torch.hub", "torch.serialization", "torch.jit", "torch.package",
    "torch.utils.cpp_extension", "torch._dynamo", "torch._inductor", "torch.ops", "torch.classes", "cProfile",
    "profile", "trace", "imp", "builtins", "__builtin__", "__builtins__", "exec", "site", "sysconfig", "compileall",
    "py_compile", "ensurepip", "idlelib", "tkinter", "turtle", "xmlrpc", "asyncore", "sqlite3", "dbm", "shelve",
}
DANGEROUS_NAMES = {("numpy", "load"), ("numpy.lib.npyio", "load"), ("torch", "load"), ("torch", "save"),
                   ("torch", "compile"), ("torch", "from_file"), ("numpy", "fromfile")}

# Globals whose meaning ckconv implements itself (never calling the named object).
SAFE_BUILTINS = {"set", "frozenset", "complex", "bytearray", "slice", "range", "bool", "int", "float", "str",
                 "tuple", "list", "dict", "bytes", "object"}
SPARSE = {"_rebuild_sparse_tensor", "_rebuild_sparse_csr"}
UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor": "quantized tensors are not supported: dequantize with .dequantize() before saving",
    "_rebuild_nested_tensor": "nested tensors are not supported: save their components as a list",
    "_rebuild_wrapper_subclass": "tensor subclasses with custom storage (DTensor, fake tensors) are not supported: "
                                 "save .full_tensor() or plain tensors",
    "_rebuild_xla_tensor": "XLA tensors are not supported: move them to the CPU before saving",
    "_rebuild_mkldnn_tensor": "MKL-DNN tensors are not supported: call .to_dense() before saving",
    "_rebuild_meta_tensor_no_storage": "meta tensors carry no data: materialise them before saving",
    "_rebuild_device_tensor_from_numpy": "tensors saved as numpy arrays on a device are not supported",
}


def is_dangerous(module: str, name: str) -> bool:
    if (module, name) in DANGEROUS_NAMES:
        return True
    if module in ("builtins", "__builtin__"):
        return name not in SAFE_BUILTINS
    top = module.split(".")
    return any(".".join(top[:i]) in DANGEROUS_MODULES for i in range(1, len(top) + 1))


class StorageType:
    """The class named in a persistent id (``torch.FloatStorage``), as a dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


class _Param:
    """Marker for ``torch.nn.Parameter`` used as a type in ``_rebuild_from_type_v2``."""


def _ints(value, what, where):
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptCheckpoint(f"{where}: tensor {what} {value!r} is not a list of non-negative integers")
    return tuple(value)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle with ckconv's builders; ``storage_loader(pid)`` resolves persistent ids into Storages."""

    def __init__(self, source, *, storage_loader=None, where=""):
        super().__init__(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        self.storage_loader = storage_loader
        self.where = where
        self.dangerous: list = []
        self.foreign: list = []

    # -- the allowlist -----------------------------------------------------------------------------------------
    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise CorruptCheckpoint(f"{self.where}: malformed pickle global")
        full = f"{module}.{name}"
        if is_dangerous(module, name):
            if full not in self.dangerous:
                self.dangerous.append(full)
            return foreign_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in BUILTIN_BUILDERS:
            return BUILTIN_BUILDERS[name]
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module in ("torch._utils", "torch._tensor", "torch", "torch.nn.parameter", "torch.storage",
                      "torch.cuda"):
            builder = self._torch_global(module, name)
            if builder is not None:
                return builder
        if full not in self.foreign:
            self.foreign.append(full)
        return foreign_class(module, name)

    def _torch_global(self, module, name):
        if module == "torch._utils":
            if name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
                return self._rebuild_tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
            if name in SPARSE:
                raise UnsupportedContent(
                    f"{self.where}: sparse tensors are not supported: convert them with .to_dense() before saving")
            if name in UNSUPPORTED_REBUILDS:
                raise UnsupportedContent(f"{self.where}: {UNSUPPORTED_REBUILDS[name]}")
            return None
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch.nn.parameter" and name == "Parameter":
            return _Param
        if module == "torch.storage" and name == "_load_from_bytes":
            raise UnsupportedContent(f"{self.where}: tensors pickled with pickle.dump are not supported: "
                                     "re-save the object with torch.save")
        if module == "torch.storage" and name in ("UntypedStorage", "_UntypedStorage"):
            return StorageType("uint8")
        if module in ("torch", "torch.cuda") and name in dtypes.STORAGE_TO_DTYPE:
            return StorageType(dtypes.STORAGE_TO_DTYPE[name])
        if module == "torch" and name in dtypes.QUANTIZED_STORAGES:
            raise UnsupportedContent(f"{self.where}: quantized tensors are not supported: dequantize before saving")
        if module == "torch":
            if name == "Size":
                return _size
            if name == "device":
                return _device
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
                        dtype=None, metadata=None):
        from .model import Storage

        if not isinstance(storage, Storage):
            raise CorruptCheckpoint(f"{self.where}: tensor without a storage")
        if dtype is None:
            dtype = TorchDtype(storage.dtype)
        if not isinstance(dtype, TorchDtype):
            raise CorruptCheckpoint(f"{self.where}: tensor dtype {dtype!r} is not a torch dtype")
        if str(dtype) in dtypes.QUANTIZED:
            raise UnsupportedContent(f"{self.where}: quantized tensors are not supported: dequantize before saving")
        size = _ints(size, "shape", self.where)
        stride = _ints(stride, "stride", self.where)
        if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):
            raise CorruptCheckpoint(f"{self.where}: tensor view has an invalid offset or stride")
        item = dtypes.itemsize(str(dtype))
        if 0 not in size and storage.nbytes >= 0:  # legacy files learn storage sizes after the pickle
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if (last + 1) * item > storage.nbytes:
                raise CorruptCheckpoint(
                    f"{self.where}: tensor view {list(size)} at offset {storage_offset} reaches past the end of "
                    f"storage {storage.label} ({storage.nbytes} bytes); the file is corrupt")
        return TensorRef(storage, str(dtype), size, stride, storage_offset, bool(requires_grad))


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise CorruptCheckpoint("parameter without tensor data")
    data.parameter = True
    data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not callable(func) or not isinstance(args, tuple):
        raise CorruptCheckpoint("malformed tensor subclass record")
    value = func(*args)
    if isinstance(value, TensorRef) and new_type is _Param:
        value.parameter = True
    return value


def _size(dims=()):
    if not all(type(d) is int for d in dims):
        raise CorruptCheckpoint("torch.Size with non-integer dimensions")
    return TorchSize(dims)


def _device(kind, index=None):
    if not isinstance(kind, str) or (index is not None and type(index) is not int):
        raise CorruptCheckpoint("malformed torch.device")
    return TorchDevice(kind if index is None else f"{kind}:{index}")


def _complex(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise CorruptCheckpoint("malformed complex number")
    return complex(real, imag)


def _bytearray(data=b"", *rest):
    if isinstance(data, str):
        return bytearray(_codecs_encode(data, rest[0] if rest else "latin1"))
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptCheckpoint("malformed bytearray")
    return bytearray(data)


def _bytes(data=b"", *rest):
    if isinstance(data, str):
        return _codecs_encode(data, rest[0] if rest else "latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptCheckpoint("malformed bytes record")
    return bytes(data)


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CorruptCheckpoint("malformed bytes record")
    return text.encode(encoding)


BUILTIN_BUILDERS = {"set": set, "frozenset": frozenset, "complex": _complex, "bytearray": _bytearray,
                    "bytes": _bytes, "object": object, "list": list, "tuple": tuple, "dict": dict, "str": str,
                    "int": int, "float": float, "bool": bool}


def _reconstructor(cls, base, state=None):
    if isinstance(cls, type) and issubclass(cls, Foreign):
        return cls(state) if state is not None else cls()
    raise CorruptCheckpoint("malformed object record")


def unpickle(source, *, storage_loader=None, where="", allow_dangerous=False):
    """Run the restricted unpickler on bytes or a file; returns (object, unpickler) so callers see what it saw."""
    up = RestrictedUnpickler(source, storage_loader=storage_loader, where=where)
    try:
        obj = up.load()
    except (UnsupportedContent, CorruptCheckpoint, UnsafeCheckpoint):
        raise
    except RecursionError:
        raise CorruptCheckpoint(f"{where}: pickle nesting too deep") from None
    except MemoryError:
        raise CorruptCheckpoint(f"{where}: pickle asks for more memory than available") from None
    except Exception as exc:  # noqa: BLE001 - every malformed pickle ends here, whatever it raised
        if up.dangerous and not allow_dangerous:
            raise refuse(where, up.dangerous) from None
        raise NotACheckpoint(f"{where}: not a readable checkpoint (malformed pickle: {type(exc).__name__}: {exc})") from None
    if up.dangerous and not allow_dangerous:
        raise refuse(where, up.dangerous)
    return obj, up


def refuse(where, globals_):
    return UnsafeCheckpoint(
        f"refusing to load {where}: it calls {', '.join(globals_)}; this file runs code when loaded, "
        "do not use it unless you trust its source")
