"""Emits ckconv trees as protocol-2 pickles in exactly the shape ``torch.save`` writes.

Written by hand (not ``pickle.Pickler``) because the globals it names -- ``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage``, ``torch.Size`` -- must appear without importing torch, and the result must be readable by
``torch.load(weights_only=True)``.

Every global that comes from the tree (a foreign record's class, a reference) passes :mod:`ckconv.pickling.policy` first:
only allowlisted or user-allowed names, validated as dotted identifiers, are written; anything else makes
:meth:`PickleWriter.dumps` refuse, naming them all, before a single byte reaches a file. A writer given a ``sink``
streams the pickle through it a MiB at a time instead of holding it whole (a million tensors' pickle is ~90 MB);
it refuses the same way at the end, so it writes into a staged file that a refusal discards, after
:func:`check_writable` (which streams into nothing) refused what it could before anything was staged.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from contextlib import contextmanager
from itertools import islice

from .. import dtypes
from . import policy
from ..errors import UnsupportedContent
from ..model import Foreign, TensorRef, TorchDevice, TorchDtype, TorchSize, is_reference
from .allowlist import Role
from ..tensor_kinds import QDTYPES, QuantizedRef, SparseTensor, TorchLayout, TorchQScheme, check_indices


def write_problems(root, allow=()) -> list:
    """What keeps ``root`` out of a pickle although its globals are allowed (arguments, state): for verdicts."""
    return dry_run(root, allow).problems


def dry_run(root, allow=()) -> "PickleWriter":
    """Write ``root`` into nothing: the writer then holds every global the tree would name, each with the roles it
    would be written in (``named``), and the problems that keep it out of a pickle (``problems``)."""
    writer = PickleWriter(lambda storage: "0", allow=allow, tensors=False, sink=_discard)  # a tensor names no tree global
    writer.save(root)
    return writer


def check_writable(root, allow=(), where="") -> None:
    """Refuse, naming them, the globals of ``root`` that a pickle may not carry (see :mod:`ckconv.pickling.policy`); for
    writers that pickle a tree piece by piece and must refuse before their first file."""
    PickleWriter(lambda storage: "0", allow=allow, where=where, tensors=False, sink=_discard).dumps(root)


def _discard(data):
    pass


FLUSH = 1 << 20  # bytes a streaming writer holds before handing them to its sink


class PickleWriter:
    def __init__(self, storage_key, allow=(), where="", tensors=True, sink=None):
        self.tensors = tensors  # False: a check that writes tensors as None (their globals are ckconv's own)
        self.fragments: dict = {}  # key -> the bytes a run of opcodes comes to (see fragment)
        self.out = bytearray(b"\x80\x02")
        self.memo: dict = {}
        self.storage_key = storage_key  # Storage -> record key (str)
        self.allow = tuple(allow)  # user-allowed dotted names and prefix.* patterns
        self.where = where
        self.refused: list = []  # global names the policy does not allow
        self.problems: list = []  # allowed globals given what they must not be (arguments, state)
        self.arg_depth = 0  # > 0 while writing a call's arguments: references there must be harmless to call
        self.named: dict = {}  # (module, qualname) -> Role: every global taken from the tree, in the roles written
        self.sink = sink  # called with the pickle a MiB at a time; None: dumps returns it whole
        self.flushed = 0  # bytes handed to the sink so far

    def dumps(self, root) -> bytes:
        """The pickle of ``root``, or (with a sink) b"" once the sink has had all of it."""
        self.save(root)
        if self.refused:
            raise policy.refuse_write(self.refused, self.where)
        if self.problems:
            raise policy.refuse_records(self.problems, self.where)
        self.out += b"."
        if self.sink is None:
            return bytes(self.out)
        self.flush()
        return b""

    def flush(self):
        """Hand what is written so far to the sink. Called between the items of a dict or list only, never inside a
        :meth:`fragment`."""
        if self.out:
            self.sink(self.out)
            self.flushed += len(self.out)
            self.out = bytearray()

    def tree_global(self, module, qualname, role: Role):
        """A global taken from the tree: written only when the policy allows it in ``role``."""
        key = (module, qualname)
        self.named[key] = self.named.get(key, Role(0)) | role
        if not policy.may_write(module, qualname, role, self.allow):
            name = policy.dotted(module, qualname)
            if name not in self.refused:
                self.refused.append(name)
            self.out += b"N"  # placeholder: dumps() refuses before these bytes are used
            return
        first, *rest = qualname.split(".")
        if rest:  # protocol 2 cannot name Outer.inner in one GLOBAL: getattr(Outer, 'inner'), as pickle does
            for _ in rest:
                self.global_("builtins", "getattr")
            self.global_(module, first)
            for attr in rest:
                self.save_str(attr)
                self.out += b"\x86R"
            return
        self.global_(module, qualname)

    # -- primitives -------------------------------------------------------------------------------------------
    def put_memo(self, key):
        idx = len(self.memo)
        self.memo[key] = idx
        self.out += b"q" + bytes([idx]) if idx < 256 else b"r" + struct.pack("<I", idx)

    def global_(self, module, name):
        key = ("global", module, name)
        if key in self.memo:  # checked when it was first written
            idx = self.memo[key]
            self.out += b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx)
            return
        if not policy.valid_name(module, name):  # never reached by tree names (tree_global checks them first)
            raise UnsupportedContent(f"refusing to write the invalid global name {policy.dotted(module, name)}")
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put_memo(key)

    def save_str(self, s: str):
        data = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def save_int(self, v: int):
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += (b"\x8a" + bytes([len(data)]) if len(data) < 256 else b"\x8b" + struct.pack("<i", len(data))) + data

    def tuple_(self, items):
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for v in items:
                self.save(v)
            self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)]
            return
        self.out += b"("
        for v in items:
            self.save(v)
        self.out += b"t"

    # -- values -----------------------------------------------------------------------------------------------
    def save(self, v):
        if type(v) is TensorRef and self.tensors:  # the common cases first: a million tensors under their names
            self.save_tensor(v)
        elif type(v) is str:
            self.save_str(v)
        elif v is None:
            self.out += b"N"
        elif v is True:
            self.out += b"\x88"
        elif v is False:
            self.out += b"\x89"
        elif isinstance(v, (QuantizedRef, SparseTensor, TorchLayout, TorchQScheme)):
            self.save_kind(v)
        elif isinstance(v, TorchDtype):
            self.global_("torch", str(v))
        elif isinstance(v, TorchDevice):
            self.global_("torch", "device")
            self.tuple_((str(v),))
            self.out += b"R"
        elif isinstance(v, TorchSize):
            self.global_("torch", "Size")
            self.tuple_((tuple(v),))
            self.out += b"R"
        elif isinstance(v, str):
            self.save_str(v)
        elif isinstance(v, int):
            self.save_int(int(v))
        elif isinstance(v, float):
            self.out += b"G" + struct.pack(">d", v)
        elif isinstance(v, complex):
            self.global_("builtins", "complex")
            self.tuple_((v.real, v.imag))
            self.out += b"R"
        elif isinstance(v, bytes):
            self.global_("_codecs", "encode")
            self.tuple_((v.decode("latin1"), "latin1"))
            self.out += b"R"
        elif isinstance(v, bytearray):
            self.global_("builtins", "bytearray")
            self.tuple_((v.decode("latin1"), "latin1"))
            self.out += b"R"
        elif isinstance(v, TensorRef):
            if self.tensors:
                self.save_tensor(v)
            else:
                self.out += b"N"
        elif isinstance(v, OrderedDict):
            self.global_("collections", "OrderedDict")
            self.out += b")R"
            self.setitems(v)
            if getattr(v, "__dict__", None):
                self.save(dict(v.__dict__))
                self.out += b"b"
        elif isinstance(v, dict):
            self.out += b"}"
            self.setitems(v)
        elif isinstance(v, list):
            self.save_list(v)
        elif isinstance(v, tuple):
            self.tuple_(tuple(v))
        elif isinstance(v, (set, frozenset)):
            self.global_("builtins", type(v).__name__)
            self.tuple_((list(v),))
            self.out += b"R"
        elif isinstance(v, Foreign):
            key = ("object", id(v))
            if key in self.memo:  # shared, or a back-reference from inside its own state: pickle's memo
                idx = self.memo[key]
                self.out += b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx)
            else:
                self.save_foreign(v)
        elif is_reference(v):
            self.tree_global(v.module, v.qualname, Role.REBUILD if self.arg_depth else Role.REFERENCED)
        else:
            raise UnsupportedContent(f"cannot write a value of type {type(v).__name__} into a torch checkpoint")

    def check_args(self, f: Foreign, role):
        """What an allowlisted global must not be given (policy.call_args_problem / policy.state_problem): a
        NEWOBJ with arguments (torch.save never writes one for the classes allowed), records or huge numbers as a
        call's arguments, state that makes a class's own __setstate__ loop. A global the user allowed by name is
        the user's to judge."""
        if not policy.may_write(f.module, f.qualname, role) or policy.allowed_by_user(f.module, f.qualname,
                                                                                    self.allow):
            return
        if role == Role.INSTANTIATED and (f.args or f.kwargs):
            problem = f"{f.class_name} made with arguments (NEWOBJ), which torch.save never writes for it"
        elif f.args:
            problem = policy.call_args_problem(f.class_name, f.args)
        else:
            problem = None
        problem = problem or policy.state_problem(f.class_name, f.state)
        if problem is not None and problem not in self.problems:
            self.problems.append(problem)

    @contextmanager
    def arguments(self):
        """Writing a call's arguments: every reference in them, however deep, must be harmless to call."""
        self.arg_depth += 1
        try:
            yield
        finally:
            self.arg_depth -= 1

    def save_list(self, v):
        self.out += b"]"
        for start in range(0, len(v), 1000):
            self.out += b"("
            for item in v[start:start + 1000]:
                self.save(item)
            self.out += b"e"
            if self.sink is not None and len(self.out) >= FLUSH:
                self.flush()

    def setitems(self, d):
        items = iter(d.items())  # no list of a million pairs beside the dict
        stream = self.sink is not None
        while True:
            batch = list(islice(items, 1000))
            if not batch:
                return
            self.out += b"("
            for k, val in batch:
                self.save(k)
                self.save(val)
            self.out += b"u"
            if stream and len(self.out) >= FLUSH:
                self.flush()

    def save_tensor(self, t: TensorRef):
        # _rebuild_tensor_v2(pid, offset, size, stride, requires_grad, hooks) for dtypes with a typed storage
        # class, _rebuild_tensor_v3(..., dtype) over an UntypedStorage otherwise: what torch.save writes.
        st = t.storage
        typed = dtypes.DTYPES[t.dtype][2] if st.dtype == t.dtype else None
        kind = (t.dtype, typed, t.parameter, bool(t.requires_grad))
        self.fragment(("head",) + kind, self._tensor_head, t.parameter, typed)
        self.save_str(self.storage_key(st))
        self.fragment("cpu", self.save_str, "cpu")
        self.save_int(st.nbytes // dtypes.itemsize(t.dtype) if typed else st.nbytes)
        self.out += b"tQ"
        self.save_int(t.offset)
        self.fragment(t.shape, self._ints, t.shape)  # tuples of ints: no memo, the same bytes every time
        self.fragment(t.stride, self._ints, t.stride)
        self.fragment(("tail",) + kind, self._tensor_tail, t, typed)

    def _ints(self, values):
        self.tuple_(tuple(values))
        return all(type(v) is int for v in values)  # (True,) == (1,) as a key: cache exact ints only

    def _tensor_head(self, parameter, typed):
        if parameter:
            self.global_("torch._utils", "_rebuild_parameter")
        self.global_("torch._utils", "_rebuild_tensor_v2" if typed else "_rebuild_tensor_v3")
        self.out += b"(("
        self.save_str("storage")
        if typed:
            self.global_("torch", typed)
        else:
            self.global_("torch.storage", "UntypedStorage")

    def _tensor_tail(self, t, typed):
        self.save(bool(t.requires_grad) and not t.parameter)
        self.global_("collections", "OrderedDict")
        self.out += b")R"
        if not typed:
            self.global_("torch", t.dtype)
        self.out += b"tR"
        if t.parameter:
            self.save(bool(t.requires_grad))
            self.global_("collections", "OrderedDict")
            self.out += b")R\x87R"

    def fragment(self, key, emit, *args):
        """Append what ``emit(*args)`` writes, from a cache once it is known. The bytes a run of opcodes comes to
        are cached only when writing them put nothing in the memo (and ``emit`` did not return False), so they stay
        right for every later use (the memo only grows). A million tensors cost a few appends each, not dozens of
        calls."""
        cached = self.fragments.get(key)
        if cached is not None:
            self.out += cached
            return
        start, memo, flushed = len(self.out), len(self.memo), self.flushed
        if emit(*args) is not False and len(self.memo) == memo and self.flushed == flushed:
            self.fragments[key] = bytes(self.out[start:])

    def save_qtensor(self, t: QuantizedRef):
        # _rebuild_qtensor(QInt8Storage pid, offset, size, stride, qparams, requires_grad, OrderedDict()), exactly
        # as torch.save writes it (Parameter-wrapped when it was one); scales and zero points as the file had them
        if t.parameter:
            self.global_("torch._utils", "_rebuild_parameter")
        self.global_("torch._utils", "_rebuild_qtensor")
        self.out += b"(("
        self.save_str("storage")
        self.global_("torch", QDTYPES[t.dtype][2])
        self.save_str(self.storage_key(t.storage))
        self.save_str("cpu")
        self.save_int(t.storage.nbytes // dtypes.itemsize(t.dtype))
        self.out += b"tQ"
        self.save_int(t.offset)
        self.tuple_(tuple(t.shape))
        self.tuple_(tuple(t.stride))
        self.tuple_(t.qparams)
        self.save(bool(t.requires_grad) and not t.parameter)
        self.global_("collections", "OrderedDict")
        self.out += b")RtR"
        if t.parameter:
            self.save(bool(t.requires_grad))
            self.global_("collections", "OrderedDict")
            self.out += b")R\x87R"

    def save_kind(self, v):
        """A quantized or sparse tensor, a layout or a qscheme, in the words torch.save uses (tensor_kinds)."""
        if isinstance(v, QuantizedRef):
            if self.tensors:
                self.save_qtensor(v)
            else:  # a check without tensors: their globals are ckconv's own
                self.out += b"N"
        elif isinstance(v, TorchQScheme):
            self.global_("torch", str(v))
        elif isinstance(v, TorchLayout):  # torch pickles a layout as _get_layout('torch.sparse_coo')
            self.global_("torch.serialization", "_get_layout")
            self.tuple_((f"torch.{v}",))
            self.out += b"R"
        else:  # _rebuild_sparse_tensor(layout, (indices..., values, size[, is_coalesced])); torch validates them
            check_indices(v)  # in a check without tensors too: a sharded writer refuses before its first file
            if not self.tensors:
                self.out += b"N"
                return
            self.global_("torch._utils", "_rebuild_sparse_tensor")
            size = TorchSize(v.size) if v.size_type is TorchSize else v.size_type(v.size)
            data = v.components + (size,) + ((v.coalesced,) if v.coalesced is not None else ())
            self.tuple_((v.layout, data))
            self.out += b"R"

    def save_foreign(self, f: Foreign):
        if f.reconstructor is not None:  # copyreg._reconstructor(cls, base, state): calls base (an ARG_REFERENCE)
            self.check_args(f, Role.INSTANTIATED)
            self.global_("copyreg", "_reconstructor")
            self.tree_global(f.module, f.qualname, Role.INSTANTIATED)
            with self.arguments():
                self.save(f.reconstructor[0])
                self.save(f.reconstructor[1])
            self.out += b"\x87R"
        elif f.newobj:  # cls.__new__(cls, *args): no __init__; NEWOBJ refuses anything that is not a class
            self.check_args(f, Role.INSTANTIATED)
            self.tree_global(f.module, f.qualname, Role.INSTANTIATED)
            with self.arguments():
                self.tuple_(tuple(f.args))
                if f.kwargs:
                    self.save(dict(f.kwargs))
            self.out += b"\x92" if f.kwargs else b"\x81"
        else:  # cls(*args) or fn(*args): called, so only allowlisted callables, with arguments that cannot expand
            self.check_args(f, Role.CALLED)
            self.tree_global(f.module, f.qualname, Role.CALLED)
            with self.arguments():
                self.tuple_(tuple(f.args))
            self.out += b"R"
        self.put_memo(("object", id(f)))  # before its state, as pickle does: the state may refer back to it
        if f.listitems:
            self.out += b"("
            for item in f.listitems:
                self.save(item)
            self.out += b"e"
        if f.dictitems:
            self.out += b"("
            for k, val in f.dictitems:
                self.save(k)
                self.save(val)
            self.out += b"u"
        if f.state is not None:
            self.save(f.state)
            self.out += b"b"
