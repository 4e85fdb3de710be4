"""Quantized and sparse tensors as inert records: what ``torch.load(weights_only=True)`` accepts beyond dense ones.

* :class:`QuantizedRef` -- a quantized tensor (``qint8``, ``quint8``, ``qint32``, ``quint4x2``, ``quint2x4``):
  a :class:`~ckconv.model.TensorRef` over the storage of its integer representation, plus the quantizer
  parameters ``torch._utils._rebuild_qtensor`` was given (a per-tensor scale and zero point, or per-channel
  scales, zero points and axis, kept exactly as the file held them: lists or tensors).
* :class:`SparseTensor` -- a COO, CSR, CSC, BSR or BSC tensor, as ``torch._utils._rebuild_sparse_tensor``
  records it: the layout, its component tensors (indices and values) and its size.
* :class:`TorchQScheme`, :class:`TorchLayout` -- ``torch.per_channel_affine``, ``torch.sparse_csr`` by name.

The checks here are torch's own, made on the record before anything is allocated: a view that reaches past its
storage, an axis out of range, a component whose shape contradicts the size are refused as corrupt (torch refuses
them too). Index *values* are checked where ckconv materialises a sparse tensor (:func:`to_torch`), as
``torch.load(weights_only=True)`` checks them. Nothing here imports torch until a caller asks for real tensors.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from . import dtypes
from .errors import CorruptCheckpoint, UnsupportedContent
from .model import TensorRef, TorchDtype, TorchSize

__all__ = ["QDTYPES", "QuantizedRef", "SPARSE_COMPONENTS", "SparseTensor", "TorchLayout", "TorchQScheme",
           "check_qtensor", "check_sparse", "describe", "is_special"]

# quantized dtype -> (dtype of its integer representation, bits per element, torch's typed storage class)
QDTYPES = {"qint8": ("int8", 8, "QInt8Storage"), "quint8": ("uint8", 8, "QUInt8Storage"),
           "qint32": ("int32", 32, "QInt32Storage"), "quint4x2": ("uint8", 4, "QUInt4x2Storage"),
           "quint2x4": ("uint8", 2, "QUInt2x4Storage")}
QSCHEMES = ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams", "per_tensor_symmetric",
            "per_channel_symmetric")  # the names torch's weights_only allows; it rebuilds only the affine ones
SCALE_DTYPES = ("float64", "float32")
ZERO_POINT_DTYPES = ("int64", "int32", "float32", "float64")
# layout -> names of its components, as torch's accessors call them (and as safetensors outputs name them)
SPARSE_COMPONENTS = {"sparse_coo": ("indices", "values"), "sparse_csr": ("crow_indices", "col_indices", "values"),
                     "sparse_csc": ("ccol_indices", "row_indices", "values"),
                     "sparse_bsr": ("crow_indices", "col_indices", "values"),
                     "sparse_bsc": ("ccol_indices", "row_indices", "values")}
LAYOUTS = frozenset(SPARSE_COMPONENTS) | {"strided", "_mkldnn", "jagged"}
INT64_MAX = (1 << 63) - 1
INDEX_DTYPES = ("int64", "int32")


class TorchQScheme(str):
    """``torch.per_channel_affine`` and friends, by name."""

    def __repr__(self):
        return f"torch.{str(self)}"


class TorchLayout(str):
    """``torch.sparse_coo`` and friends, by name (pickled as ``torch.serialization._get_layout('torch.x')``)."""

    def __repr__(self):
        return f"torch.{str(self)}"


class QuantizedRef(TensorRef):
    """A quantized tensor: ``dtype`` is the quantized dtype (``qint8``); its bytes are the integer representation.

    ``qparams`` is what torch.save wrote: ``(qscheme, scale, zero_point)`` per tensor, or ``(qscheme, scales,
    zero_points, axis)`` per channel, the scales and zero points a list or a :class:`TensorRef`.
    Sub-byte dtypes (``quint4x2``, ``quint2x4``) pack elements; they are whole, contiguous storages.
    """

    __slots__ = ("qparams",)

    def __init__(self, storage, dtype, shape, stride=None, offset=0, requires_grad=False, parameter=False,
                 qparams=()):
        super().__init__(storage, dtype, shape, stride, offset, requires_grad, parameter)
        self.qparams = tuple(qparams)

    @property
    def packed(self):
        return QDTYPES[self.dtype][1] < 8

    @property
    def repr_dtype(self):
        """The dtype of the integer representation (``int8`` for ``qint8``)."""
        return QDTYPES[self.dtype][0]

    @property
    def nbytes(self):
        return self.storage.nbytes if self.packed else self.numel * dtypes.itemsize(self.dtype)

    @property
    def qscheme(self):
        """The qscheme torch gives the loaded tensor: torch.save writes ``per_channel_affine`` for
        ``per_channel_affine_float_qparams`` too, which loads as such when its zero points are floats."""
        declared = str(self.qparams[0])
        zero_points = self.qparams[2] if len(self.qparams) == 4 else None
        if declared == "per_channel_affine" and isinstance(zero_points, TensorRef) and zero_points.dtype in (
                "float32", "float64"):
            return "per_channel_affine_float_qparams"
        return declared

    def int_repr(self) -> TensorRef:
        """The integer representation as a plain tensor (a packed dtype: its storage's bytes, 1-D ``uint8``)."""
        if self.packed:
            return TensorRef(self.storage, "uint8", (self.storage.nbytes,))
        return TensorRef(self.storage, self.repr_dtype, self.shape, self.stride, self.offset)

    def chunks(self, budget=None):
        return self.int_repr().chunks(budget)

    def copy_to(self, fd, dst_offset, **kwargs):
        return self.int_repr().copy_to(fd, dst_offset, **kwargs)

    def view_key(self):
        q = tuple(id(p) if isinstance(p, (TensorRef, list)) else (type(p), p) for p in self.qparams)
        return super().view_key() + ("q",) + q

    def __reduce__(self):
        return QuantizedRef, (self.storage, self.dtype, self.shape, self.stride, self.offset, self.requires_grad,
                              self.parameter, self.qparams)

    def __repr__(self):
        return f"QuantizedRef({self.dtype}, {list(self.shape)}, {self.qscheme})"


class SparseTensor:
    """A sparse tensor: ``layout`` (``sparse_coo``...), ``components`` (TensorRefs named by
    :data:`SPARSE_COMPONENTS`), ``size`` and, for COO, ``coalesced`` (None when the file used torch's 3-tuple)."""

    __slots__ = ("layout", "components", "size", "coalesced", "size_type")
    requires_grad = False
    parameter = False

    def __init__(self, layout, components, size, coalesced=None, size_type=TorchSize):
        self.layout = TorchLayout(layout)
        self.components = tuple(components)
        self.size = tuple(size)
        self.coalesced = coalesced
        self.size_type = size_type  # torch.save writes a torch.Size; a tuple is kept a tuple

    @property
    def names(self):
        return SPARSE_COMPONENTS[self.layout]

    @property
    def values(self) -> TensorRef:
        return self.components[-1]

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def shape(self):
        return self.size

    @property
    def numel(self):
        return math.prod(self.size)

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.components)

    def view_key(self):
        return ("sparse", id(self))

    def __setstate__(self, state):
        raise CorruptCheckpoint("the pickle tried to modify a sparse tensor record; the file is hostile")

    def __reduce__(self):
        return SparseTensor, (self.layout, self.components, self.size, self.coalesced, self.size_type)

    def __repr__(self):
        return f"SparseTensor({self.layout}, {self.dtype}, {list(self.size)}, nnz={self.components[-1].shape[:1]})"

    def __eq__(self, other):
        return (isinstance(other, SparseTensor) and (self.layout, self.size, self.coalesced)
                == (other.layout, other.size, other.coalesced) and len(self.components) == len(other.components))

    __hash__ = object.__hash__


def is_special(value) -> bool:
    return isinstance(value, (QuantizedRef, SparseTensor))


def describe(value) -> str:
    """How inspect and diff name the kind: ``qint8 per_channel_affine axis 0``, ``sparse_csr float32 nnz 5``."""
    if isinstance(value, QuantizedRef):
        text = f"{value.dtype} {value.qscheme}"
        return text + (f" axis {value.qparams[3]}" if len(value.qparams) == 4 else "")
    if isinstance(value, SparseTensor):
        nnz = value.components[-2 if value.layout != "sparse_coo" else 0].shape[-1:] or (0,)
        return f"{value.layout} {value.dtype} nnz {nnz[0]}"
    return str(getattr(value, "dtype", ""))


# --- checks made on the record (torch's own, before anything is allocated) ----------------------------------------

def _refuse(where, what):
    return CorruptCheckpoint(f"{where}: {what}; torch cannot load it either, the file is corrupt")


def check_qtensor(ref: QuantizedRef, where="") -> QuantizedRef:
    """Refuse what ``torch._utils._rebuild_qtensor`` refuses, from the record alone. ``ref``'s view has already
    been checked against its storage like any tensor's."""
    q = ref.qparams
    if not q or not isinstance(q[0], TorchQScheme):
        raise _refuse(where, "a quantized tensor without a qscheme")
    if ref.requires_grad:
        raise _refuse(where, "a quantized tensor that requires grad")
    if ref.packed and (ref.offset or not ref.is_contiguous or 0 <= ref.storage.nbytes < math.ceil(
            ref.numel * QDTYPES[ref.dtype][1] / 8)):  # a legacy file's storage sizes come later: views() checks
        raise UnsupportedContent(f"{where}: a {ref.dtype} tensor that is a view into its storage is not supported "
                                 "(torch.save writes them whole): save a .clone() of it")
    if q[0] == "per_tensor_affine":
        if len(q) != 3 or type(q[1]) not in (float, int) or type(q[2]) is not int or not all(
                type(v) is float or -INT64_MAX - 1 <= v <= INT64_MAX for v in q[1:]):
            raise _refuse(where, "a per-tensor quantized tensor whose scale or zero point is not a number")
        return ref
    if q[0] not in ("per_channel_affine", "per_channel_affine_float_qparams"):
        raise _refuse(where, f"a quantized tensor with qscheme {q[0]} (torch rebuilds only the affine ones)")
    if len(q) != 4 or type(q[3]) is not int or not 0 <= q[3] < len(ref.shape):
        raise _refuse(where, f"a per-channel quantized tensor whose axis is out of range for shape {list(ref.shape)}")
    channels = ref.shape[q[3]]
    for values, what, allowed in ((q[1], "scales", SCALE_DTYPES), (q[2], "zero points", ZERO_POINT_DTYPES)):
        if isinstance(values, TensorRef) and not is_special(values):
            if values.dtype not in allowed or len(values.shape) != 1 or values.numel != channels:
                raise _refuse(where, f"per-channel {what} of {values.dtype} {list(values.shape)} for "
                                     f"{channels} channels")
        elif type(values) is list:
            if len(values) != channels or not all(type(v) is float or type(v) is int and -INT64_MAX - 1 <= v
                                                  <= INT64_MAX for v in values):
                raise _refuse(where, f"{len(values)} per-channel {what} for {channels} channels")
        else:
            raise _refuse(where, f"per-channel {what} that are neither a list nor a tensor")
    return ref


def check_sparse(sp: SparseTensor, where="") -> SparseTensor:
    """Refuse what torch's sparse constructors refuse from shapes alone (``check_invariants=False``): component
    dtypes and ranks, the number of stored elements, the size against the indices and values."""
    comps, size = sp.components, sp.size
    if not all(isinstance(c, TensorRef) and not is_special(c) for c in comps) or len(comps) != len(sp.names):
        raise _refuse(where, f"a {sp.layout} tensor whose components are not {len(sp.names)} tensors")
    if not all(type(n) is int and 0 <= n <= INT64_MAX for n in size):
        raise _refuse(where, f"a {sp.layout} tensor with size {list(size)[:8]}")
    values = comps[-1]
    if values.dtype not in dtypes.DTYPES:
        raise _refuse(where, f"a {sp.layout} tensor of {values.dtype} values")
    if sp.layout == "sparse_coo":
        idx = comps[0]
        ok = (idx.dtype == "int64" and len(idx.shape) == 2 and len(values.shape) >= 1
              and values.shape[0] == idx.shape[1] and idx.shape[0] + len(values.shape) - 1 == len(size)
              and tuple(values.shape[1:]) == tuple(size[idx.shape[0]:]) and sp.coalesced in (None, True, False))
        if not ok:
            raise _refuse(where, f"a sparse_coo tensor of size {list(size)} with indices {list(idx.shape)} and "
                                 f"values {list(values.shape)}")
        return sp
    compressed, plain = comps[0], comps[1]
    blocked = sp.layout in ("sparse_bsr", "sparse_bsc")
    ok = (compressed.dtype in INDEX_DTYPES and plain.dtype == compressed.dtype and len(compressed.shape) >= 1
          and len(plain.shape) == len(compressed.shape) and compressed.shape[:-1] == plain.shape[:-1]
          and len(values.shape) >= len(plain.shape) + (2 if blocked else 0)
          and values.shape[len(plain.shape) - 1] == plain.shape[-1] and sp.coalesced is None)
    batch = len(compressed.shape) - 1
    if ok:
        dims = size[batch:batch + 2]
        block = values.shape[batch + 1:batch + 3] if blocked else (1, 1)
        axis = 0 if sp.layout in ("sparse_csr", "sparse_bsr") else 1
        ok = (len(dims) == 2 and all(b > 0 for b in block) and dims[0] % block[0] == 0 and dims[1] % block[1] == 0
              and compressed.shape[-1] == dims[axis] // block[axis] + 1 and tuple(size[:batch]) == compressed.shape[:-1])
    if not ok:
        raise _refuse(where, f"a {sp.layout} tensor of size {list(size)} with components "
                             + ", ".join(f"{list(c.shape)} {c.dtype}" for c in comps))
    return sp


def check_indices(sp: SparseTensor, where="") -> None:
    """Refuse index values ``torch.load(weights_only=True)`` refuses (it validates every sparse tensor it loads):
    COO indices in range (and sorted and distinct when marked coalesced); compressed indices starting at 0, ending
    at nnz, never decreasing, plain indices in range, sorted and distinct within each row. O(nnz), with numpy."""
    import numpy as np

    def array(ref):
        data = b"".join(bytes(c) for c in ref.chunks())
        return np.frombuffer(data, dtype=f"<i{dtypes.itemsize(ref.dtype)}").reshape(ref.shape)

    bad = None
    if sp.layout == "sparse_coo":
        idx = array(sp.components[0])
        dims = np.array(sp.size[:idx.shape[0]], dtype=np.int64).reshape(-1, 1)
        if idx.size and ((idx < 0).any() or (idx >= dims).any()):
            bad = "indices out of range"
        elif sp.coalesced and idx.shape[1] > 1:
            order = np.lexsort(idx[::-1])
            if (order != np.arange(idx.shape[1])).any() or not (np.diff(idx, axis=1) != 0).any(axis=0).all():
                bad = "indices marked coalesced that are not sorted and distinct"
    else:
        compressed, plain = array(sp.components[0]), array(sp.components[1])
        batch = compressed.ndim - 1
        blocked = sp.layout in ("sparse_bsr", "sparse_bsc")
        block = sp.components[2].shape[batch + 1:batch + 3] if blocked else (1, 1)
        axis = 1 if sp.layout in ("sparse_csr", "sparse_bsr") else 0
        limit = sp.size[batch + axis] // block[axis]
        steps = np.diff(compressed, axis=-1)
        rows = np.repeat(np.arange(compressed.shape[-1] - 1), steps.reshape(-1, steps.shape[-1])[0]) if (
            batch == 0 and (steps >= 0).all()) else None
        if (compressed[..., 0] != 0).any() or (compressed[..., -1] != plain.shape[-1]).any() or (steps < 0).any():
            bad = "compressed indices that do not run from 0 to nnz"
        elif plain.size and ((plain < 0).any() or (plain >= limit).any()):
            bad = "plain indices out of range"
        elif rows is not None and plain.size > 1 and ((np.diff(plain) <= 0) & (np.diff(rows) == 0)).any():
            bad = "plain indices not sorted and distinct within a row"
    if bad:
        raise _refuse(where or f"{sp.layout} tensor of size {list(sp.size)}", f"a {sp.layout} tensor with {bad}")


# --- real torch tensors (imported here only when a caller asks for them) -------------------------------------------

def to_torch(value, untyped_storage, convert):
    """A real quantized or sparse tensor, built as ``torch.load(weights_only=True)`` builds it, index values
    checked as it checks them. ``untyped_storage(ref)`` gives a ref's torch storage; ``convert`` other values."""
    import torch

    if isinstance(value, TorchQScheme):
        return getattr(torch, str(value))
    if isinstance(value, TorchLayout):
        return getattr(torch, str(value))
    if isinstance(value, QuantizedRef):
        storage = torch.TypedStorage(wrap_storage=untyped_storage(value), dtype=getattr(torch, value.dtype),
                                     _internal=True)
        params = tuple(convert(p) for p in value.qparams)
        out = torch._utils._rebuild_qtensor(storage, value.offset, value.shape, value.stride, params, False,
                                            OrderedDict())
        return torch.nn.Parameter(out, requires_grad=False) if value.parameter else out
    comps = [convert(c) for c in value.components]
    size = torch.Size(value.size)
    try:
        if value.layout == "sparse_coo":
            out = torch.sparse_coo_tensor(comps[0], comps[1], size, check_invariants=True,
                                          is_coalesced=value.coalesced)
            torch._validate_sparse_coo_tensor_args(comps[0], comps[1], size, out.is_coalesced(), check_pinning=False)
            return out
        return torch.sparse_compressed_tensor(comps[0], comps[1], comps[2], size,
                                              layout=getattr(torch, str(value.layout)), check_invariants=True)
    except RuntimeError as exc:  # torch.load(weights_only=True) validates the same invariants, and refuses
        raise CorruptCheckpoint(f"{value.layout} tensor of size {list(value.size)}: {str(exc)[:160]}; torch "
                                "cannot load it either, the file is corrupt") from None


def from_torch(t, tensor_ref):
    """A live quantized or sparse tensor as a record; ``tensor_ref(t)`` describes a strided tensor."""
    import torch

    if t.is_quantized:
        qscheme = t.qscheme()
        if qscheme == torch.per_tensor_affine:
            qparams = (TorchQScheme("per_tensor_affine"), t.q_scale(), t.q_zero_point())
        elif qscheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams):
            qparams = (TorchQScheme("per_channel_affine"), tensor_ref(t.q_per_channel_scales()),
                       tensor_ref(t.q_per_channel_zero_points()), t.q_per_channel_axis())
        else:
            raise UnsupportedContent(f"quantized tensors with qscheme {qscheme} cannot be saved (torch.save "
                                     "refuses them too)")
        int_view = tensor_ref(_int_view(t))
        ref = QuantizedRef(int_view.storage, str(t.dtype)[6:], tuple(t.shape), t.stride(), t.storage_offset(),
                           qparams=qparams, parameter=isinstance(t, torch.nn.Parameter))
        return check_qtensor(ref)
    layout = str(t.layout)[6:]
    if layout == "sparse_coo":
        return SparseTensor(layout, (tensor_ref(t._indices()), tensor_ref(t._values())), tuple(t.shape),
                            t.is_coalesced())
    if layout not in SPARSE_COMPONENTS:
        raise UnsupportedContent(f"{t.layout} tensors are not supported: call .to_dense() before saving")
    compressed, plain = ((t.crow_indices(), t.col_indices()) if layout in ("sparse_csr", "sparse_bsr")
                         else (t.ccol_indices(), t.row_indices()))
    return SparseTensor(layout, tuple(tensor_ref(c) for c in (compressed, plain, t.values())), tuple(t.shape))


def _int_view(t):
    """The integer view of a quantized tensor over the same storage (its storage, offset and strides kept)."""
    import torch

    repr_dtype, bits, _ = QDTYPES[str(t.dtype)[6:]]
    out = torch.empty(0, dtype=getattr(torch, repr_dtype))
    if bits < 8:  # packed elements: the whole storage, as torch.save writes it
        return out.set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes(),), (1,))
    return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


# --- ckconv's structure record (safetensors, sharded indexes): the vocabulary of docs/formats.md -------------------

KINDS = (QuantizedRef, SparseTensor, TorchQScheme, TorchLayout)
TAGS = ("$qtensor", "$sparse", "$qscheme", "$layout")
QPARAM_NAMES = ("qscheme", "q_per_channel_scales", "q_per_channel_zero_points", "axis")


def encode_record(node, path, enc, name_for) -> dict:
    """``node`` as JSON: ``enc(value, path)`` encodes a value, ``name_for(path, ref)`` names a stored tensor."""
    if isinstance(node, TorchQScheme):
        return {"$qscheme": str(node)}
    if isinstance(node, TorchLayout):
        return {"$layout": str(node)}
    if isinstance(node, QuantizedRef):
        name = name_for(path, node.int_repr())
        out = {"$qtensor": name, "dtype": node.dtype, "shape": list(node.shape),
               "qparams": [enc(p, tuple(path) + (QPARAM_NAMES[i],)) for i, p in enumerate(node.qparams)]}
        if node.parameter:
            out["param"] = True
        return out
    check_indices(node)
    out = {"$sparse": str(node.layout), "size": list(node.size),
           "components": [enc(c, tuple(path) + (n,)) for c, n in zip(node.components, node.names)]}
    if node.coalesced is not None:
        out["coalesced"] = node.coalesced
    if node.size_type is not TorchSize:
        out["size_type"] = node.size_type.__name__
    return out


def decode_record(tag, node, dec, take_tensor, bad):
    """The inverse of :func:`encode_record`: ``dec`` decodes a value, ``take_tensor(name)`` gives a stored
    tensor; every record is checked as the unpickler checks a pickle's."""
    val = node[tag]
    if tag in ("$qscheme", "$layout"):
        if val not in (QSCHEMES if tag == "$qscheme" else LAYOUTS):
            raise bad(f"unknown {tag[1:]} {val!r:.40}")
        return (TorchQScheme if tag == "$qscheme" else TorchLayout)(val)
    if tag == "$qtensor":
        stored, qdtype, shape = take_tensor(val), node.get("dtype"), node.get("shape")
        if (qdtype not in QDTYPES or type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape)
                or type(node.get("qparams")) is not list or stored.dtype != QDTYPES[qdtype][0]):
            raise bad(f"bad quantized tensor record for {val!r:.80}")
        packed = QDTYPES[qdtype][1] < 8
        if (tuple(shape) != stored.shape) if not packed else (stored.offset or stored.nbytes != stored.storage.nbytes):
            raise bad(f"quantized tensor {val!r:.80} is stored as {list(stored.shape)}, not as its {shape}")
        view = (None, 0) if packed else (stored.stride, stored.offset)
        ref = QuantizedRef(stored.storage, qdtype, shape, *view, qparams=[dec(p) for p in node["qparams"]],
                           parameter=node.get("param") is True)
        return check_qtensor(ref, f"quantized tensor {val!r:.80}")
    if tag == "$sparse":
        comps, size = node.get("components"), node.get("size")
        size_type = {"tuple": tuple, "list": list}.get(node.get("size_type"), TorchSize)
        if val not in SPARSE_COMPONENTS or type(comps) is not list or type(size) is not list:
            raise bad("bad sparse tensor record")
        sp = SparseTensor(val, [dec(c) for c in comps], size, node.get("coalesced"), size_type)
        return check_sparse(sp, f"{val} tensor")
    raise bad(f"unknown tag {tag}")


def parts(value) -> list:
    """[(name, part)] that make up a quantized or sparse tensor, for comparing two of them part by part: the
    tensors (the integer representation under the name None) and the values that describe them."""
    if isinstance(value, QuantizedRef):
        return [(None, value.int_repr()), ("dtype", value.dtype)] + list(zip(QPARAM_NAMES, value.qparams))
    return ([("layout", str(value.layout)), ("size", list(value.size)), ("coalesced", value.coalesced)]
            + list(zip(value.names, value.components)))


def packed_param(key, value) -> bool:
    """Whether ``key: value`` is one of the non-tensor entries ``torch.ao.quantization``'s modules put in a
    state_dict (``LinearPackedParams._save_to_state_dict``): ``*_packed_params.dtype`` (``torch.qint8``) and
    ``*_packed_params._packed_params`` (the ``(weight, bias)`` tuple). They are part of the model's weights."""
    if not isinstance(key, str):
        return False
    if key == "_packed_params.dtype" or key.endswith("._packed_params.dtype"):
        return isinstance(value, TorchDtype)
    if key == "_packed_params._packed_params" or key.endswith("._packed_params._packed_params"):
        return (isinstance(value, tuple) and 0 < len(value) <= 2
                and all(isinstance(v, TensorRef) or v is None for v in value))
    return False


def views(value) -> list:
    """The strided tensor views inside ``value`` whose bounds need checking once storage sizes are known (legacy
    files learn them after the pickle): a plain tensor itself, a quantized tensor's integer view and per-channel
    tensors, a sparse tensor's components. A packed quantized tensor is checked here and contributes its
    per-channel tensors only."""
    if isinstance(value, QuantizedRef):
        if value.packed:
            check_qtensor(value)
        inner = [p for p in value.qparams if isinstance(p, TensorRef)]
        return inner if value.packed else [value.int_repr(), *inner]
    if isinstance(value, SparseTensor):
        return list(value.components)
    return [value]
