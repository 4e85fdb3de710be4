"""The values a restricted pickle may build by calling a global: checked stand-ins for builtins and torch records.

Each takes only plain data (numbers, strings, bytes, tuples of ints) and returns a value or an inert record; a
malformed argument is a :class:`~ckconv.errors.CorruptCheckpoint`, never a call into the named object.
"""

from __future__ import annotations

from ..errors import CorruptCheckpoint
from ..model import Foreign, TorchDevice, TorchSize, is_reference
from ..tensor_kinds import (LAYOUTS, QDTYPES, SPARSE_COMPONENTS, QuantizedRef, SparseTensor, TorchLayout, TorchQScheme,
                            check_qtensor, check_sparse)

INT64_MAX = (1 << 63) - 1
MAX_BUILT_TUPLE = 512  # elements of a tuple built by a ``builtins.tuple`` call (it may be hashed many times)


def scalar(value, what, types=(str, int, float, bool)):
    if type(value) not in types:
        raise CorruptCheckpoint(f"malformed {what} record")
    return value


def str_(value="", encoding=None, errors="strict"):
    if encoding is not None:
        return codecs_decode(value, encoding)
    return str(scalar(value, "str", (str, int, float, bool, type(None))))


def int_(value=0, base=None):
    value = scalar(value, "int", (str, bytes, int, float, bool))
    return int(value) if base is None else int(value, scalar(base, "int", (int,)))


def float_(value=0.0):
    return float(scalar(value, "float", (str, int, float, bool)))


def bool_(value=False):
    return bool(scalar(value, "bool", (str, int, float, bool, type(None))))


def codecs_decode(data, encoding):
    if not isinstance(data, (bytes, bytearray)) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CorruptCheckpoint("malformed str record")
    return bytes(data).decode(encoding)


def torch_size(dims=()):
    if (not isinstance(dims, (tuple, list)) or len(dims) > MAX_BUILT_TUPLE
            or not all(type(d) is int and -INT64_MAX - 1 <= d <= INT64_MAX for d in dims)):
        raise CorruptCheckpoint("torch.Size with non-integer dimensions")
    return TorchSize(dims)


def torch_device(kind, index=None):
    if not isinstance(kind, str) or (index is not None and type(index) is not int):
        raise CorruptCheckpoint("malformed torch.device")
    return TorchDevice(kind if index is None else f"{kind}:{index}")


def complex_(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise CorruptCheckpoint("malformed complex number")
    return complex(real, imag)


def bytearray_(data=b"", *rest):
    if isinstance(data, str):
        return bytearray(codecs_encode(data, rest[0] if rest else "latin1"))
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptCheckpoint("malformed bytearray")
    return bytearray(data)


def bytes_(data=b"", *rest):
    if isinstance(data, str):
        return codecs_encode(data, rest[0] if rest else "latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptCheckpoint("malformed bytes record")
    return bytes(data)


def codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CorruptCheckpoint("malformed bytes record")
    return text.encode(encoding)


# builtins a pickle may name: ckconv's checked stand-ins (methods are bound to the unpickler, which keeps a
# hashing budget); ``object`` is only ever a base class argument.
BUILTIN_BUILDERS = {"set": "_set", "frozenset": "_frozenset", "complex": complex_, "bytearray": bytearray_,
                    "bytes": bytes_, "object": object, "list": "_list", "tuple": "_tuple", "dict": "_dict",
                    "str": str_, "int": int_, "float": float_, "bool": bool_}


def reconstructor(cls, base, state=None):
    """``copyreg._reconstructor(cls, base, state)`` (protocols 0 and 1). Real pickle runs ``base.__new__(cls,
    state)`` and, unless ``base`` is ``object``, ``base.__init__(obj, state)``; here only a record is made."""
    if isinstance(cls, type) and issubclass(cls, Foreign) and is_reference(base):
        obj = cls.__new__(cls)
        object.__setattr__(obj, "reconstructor", (base, state))
        return obj
    raise CorruptCheckpoint("malformed object record")


# --- quantized and sparse tensors (ckconv.tensor_kinds): records checked as torch checks them, nothing called ----

def qscheme(name):
    """``torch.per_channel_affine`` and the other qschemes torch's weights_only loader allows, as values."""
    return TorchQScheme(name)


def get_layout(name):
    """``torch.serialization._get_layout('torch.sparse_coo')``: a layout by name, as torch looks it up."""
    if type(name) is not str or not name.startswith("torch.") or name[6:] not in LAYOUTS:
        raise CorruptCheckpoint(f"malformed layout record {name!r:.40}")
    return TorchLayout(name[6:])


def rebuild_qtensor(rebuild_tensor, where):
    """``torch._utils._rebuild_qtensor(storage, offset, size, stride, qparams, requires_grad, hooks)``;
    ``rebuild_tensor`` checks the view against the storage as for any tensor."""

    def build(storage, storage_offset, size, stride, quantizer_params, requires_grad=False, backward_hooks=None):
        qdtype = getattr(storage, "dtype", None)
        if qdtype not in QDTYPES:
            raise CorruptCheckpoint(f"{where}: a quantized tensor over a storage of {qdtype}; torch cannot load it "
                                    "either, the file is corrupt")
        ref = rebuild_tensor(storage, storage_offset, size, stride, quantized=True)
        if not isinstance(quantizer_params, tuple):
            raise CorruptCheckpoint(f"{where}: malformed quantizer parameters")
        return check_qtensor(QuantizedRef(ref.storage, qdtype, ref.shape, ref.stride, ref.offset, bool(requires_grad),
                                          qparams=quantizer_params), where)

    return build


def rebuild_sparse_tensor(where):
    """``torch._utils._rebuild_sparse_tensor(layout, data)`` for COO, CSR, CSC, BSR and BSC."""

    def build(layout, data):
        if not isinstance(layout, TorchLayout) or layout not in SPARSE_COMPONENTS or not isinstance(data, tuple):
            raise CorruptCheckpoint(f"{where}: malformed sparse tensor record")
        coo = layout == "sparse_coo"
        if len(data) not in ((3, 4) if coo else (4,)):
            raise CorruptCheckpoint(f"{where}: malformed {layout} tensor record")
        coalesced = data[3] if coo and len(data) == 4 else None
        comps, size = (data[:2], data[2]) if coo else (data[:3], data[3])
        if not isinstance(size, (tuple, list)) or len(size) > MAX_BUILT_TUPLE:
            raise CorruptCheckpoint(f"{where}: malformed {layout} tensor size")
        sp = SparseTensor(layout, comps, size, coalesced, type(size) if type(size) in (TorchSize, tuple) else list)
        return check_sparse(sp, where)

    return build
