"""What a checkpoint is inside ckconv, independent of any file format and of torch.

A checkpoint is a tree of plain Python values (dict, OrderedDict, list, tuple, set, str, int, float, bool, None,
bytes, complex) whose leaves may also be:

* :class:`TensorRef` -- a tensor described by dtype, shape, stride and offset into a :class:`Storage`; the bytes
  stay in the source file (or in memory) until a writer streams them or a caller materialises them;
* :class:`TorchSize`, :class:`TorchDtype`, :class:`TorchDevice` -- torch values, kept without importing torch;
* :class:`Foreign` -- an inert record of an object of a class ckconv does not run (``argparse.Namespace``, a
  user's dataclass): class name, constructor arguments and state.

Readers build this tree, writers consume it; ``materialize`` turns it into real torch objects for callers.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field

from . import dtypes
from .errors import CorruptCheckpoint, LimitExceeded
from .storage import fastcopy

__all__ = ["CHUNK", "Checkpoint", "Foreign", "GlobalRef", "Note", "Storage", "TensorRef", "TorchDevice", "TorchDtype",
           "TorchSize", "contiguous_strides", "gather", "is_reference", "warning"]

CHUNK = 8 << 20  # bytes moved per read/write when streaming tensor data
DEFAULT_MEMORY_BUDGET = 4 << 30


def memory_budget() -> int:
    """Bytes ckconv may allocate beyond the file's own sizes (CKCONV_MEMORY_BUDGET, read at each use)."""
    try:
        return int(os.environ.get("CKCONV_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET))
    except ValueError:
        return DEFAULT_MEMORY_BUDGET


def _no_state(self, state):
    """pickle's BUILD opcode calls ``__setstate__``: a file must never rewrite a storage's path or a view's shape."""
    what = self.label if isinstance(self, Storage) else repr(self)
    raise CorruptCheckpoint(f"the pickle tried to modify {type(self).__name__} {what} (BUILD on a tensor record); "
                            "the file is hostile")


class Storage:
    """A run of bytes holding tensor elements: a byte range of a file, or a buffer in memory."""

    __slots__ = ("key", "dtype", "nbytes", "path", "offset", "crc", "verified", "buffer", "label")

    def __init__(self, key, dtype, nbytes, *, path=None, offset=0, crc=None, buffer=None, label=""):
        self.key = key
        self.dtype = dtype  # element dtype of a typed storage; "uint8" for untyped storages
        self.nbytes = nbytes
        self.path = path
        self.offset = offset
        self.crc = crc  # expected CRC-32 of all bytes, checked whenever the whole storage is read
        self.verified = crc is None
        self.buffer = buffer  # a memoryview-able object when the bytes live in memory
        self.label = label or str(key)

    __setstate__ = _no_state

    def __reduce__(self):  # copy.copy / deepcopy without __setstate__
        return _storage_copy, (type(self), {k: getattr(self, k) for k in Storage.__slots__})

    def chunks(self, start=0, length=None, size=CHUNK):
        """Yield the bytes [start, start+length) in bounded chunks, checking the CRC when it can."""
        if length is None:
            length = self.nbytes - start
        if self.buffer is not None:
            view = memoryview(self.buffer).cast("B")
            for pos in range(start, start + length, size):
                yield view[pos:min(pos + size, start + length)]
            return
        yield from self.file_chunks(start, length, size)

    def file_chunks(self, start, length, size, crc_seed=0, what="storage"):
        """The file-backed part of :meth:`chunks`; ``crc_seed`` for stored CRCs that also cover a header."""
        whole = start == 0 and length == self.nbytes
        if not whole and not self.verified:
            self.verify()
        crc = crc_seed
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start)
            remaining = length
            while remaining:
                block = f.read(min(size, remaining))
                if not block:
                    raise CorruptCheckpoint(f"{self.path}: {what} {self.label} is truncated; the file is damaged")
                if whole and not self.verified:
                    crc = zlib.crc32(block, crc)
                remaining -= len(block)
                yield block
        if whole and not self.verified:
            self._check(crc)

    def read(self, start=0, length=None) -> bytes:
        if length is None:
            length = self.nbytes - start
        if self.buffer is None and self.path is not None and type(self).chunks is Storage.chunks:
            # One read into one bytes object: no list of chunks joined into a second copy.
            whole = start == 0 and length == self.nbytes
            if not whole and not self.verified:
                self.verify()
            with open(self.path, "rb") as f:  # buffered: read(n) loops until n bytes, past the 2 GiB syscall cap
                f.seek(self.offset + start)
                data = f.read(length) if length else b""
            if len(data) != length:
                raise CorruptCheckpoint(f"{self.path}: storage {self.label} is truncated; the file is damaged")
            if whole and not self.verified:
                self._check(zlib.crc32(data))
            return data
        return b"".join(bytes(c) for c in self.chunks(start, length))

    def copy_to(self, fd, dst_offset, start=0, length=None, *, want_crc=False, progress=None, files=None):
        """Write the bytes [start, start+length) at ``dst_offset`` of the writable descriptor ``fd``.

        Returns their CRC-32 when ``want_crc`` (a zip writer needs it) and otherwise None. The bytes never become
        Python objects when they are a byte range of a file: the kernel copies them. A zip source's CRC is checked
        in the same pass as the copy, and for a whole record that CRC is also the one a zip writer needs, so it is
        computed once. A safetensors (or legacy) source has no CRC to check: without ``want_crc`` it is a pure
        kernel copy. ``files`` (a :class:`ckconv.storage.fastcopy.SourceFiles`) keeps source descriptors open between
        calls. Storages that override :meth:`chunks` (plugins, casts) are written from their chunks.
        """
        if length is None:
            length = self.nbytes - start
        if self.buffer is not None or self.path is None or type(self).chunks is not Storage.chunks:
            return _copy_chunks(self.chunks(start, length), fd, dst_offset, length, want_crc, progress, self.label)
        whole = start == 0 and length == self.nbytes
        check = whole and not self.verified
        if not whole and not self.verified:
            self.verify()
        own = files is None
        files = files or fastcopy.SourceFiles()
        try:
            src = files.fd(self.path)
            if check or want_crc:
                crc = fastcopy.copy_with_crc(src, self.offset + start, fd, dst_offset, length, progress=progress)
                if check:
                    self._check(crc)
                return crc
            fastcopy.kernel_copy(src, self.offset + start, fd, dst_offset, length, progress)
            return None
        except fastcopy.Truncated:
            raise CorruptCheckpoint(f"{self.path}: storage {self.label} is truncated; the file is damaged") from None
        finally:
            if own:
                files.close()

    def read_small(self, files, limit=1 << 16):
        """All the bytes of a storage of at most ``limit`` bytes that is a plain byte range of a file, read through
        ``files``' read-ahead window (a :class:`ckconv.storage.fastcopy.SourceFiles`) and checked against its CRC
        when it has one; None for any other storage, which :meth:`copy_to` copies file to file. A million tiny
        storages then cost a read per window, not system calls each."""
        if self.nbytes > limit or self.path is None or self.buffer is not None or type(self).chunks is not Storage.chunks:
            return None
        try:
            data = files.read(self.path, self.offset, self.nbytes)
        except fastcopy.Truncated:
            raise CorruptCheckpoint(f"{self.path}: storage {self.label} is truncated; the file is damaged") from None
        if not self.verified:
            self._check(zlib.crc32(data))
        return data

    def verify(self):
        crc = 0
        for block in self.chunks(0, self.nbytes):
            crc = zlib.crc32(block, crc)
        if not self.verified:
            self._check(crc)

    def _check(self, crc):
        if crc != self.crc:
            raise CorruptCheckpoint(
                f"{self.path}: CRC mismatch in storage {self.label} (the bytes changed after writing); "
                "the file is corrupt, get a fresh copy")
        self.verified = True


class TensorRef:
    """A tensor as a view into a :class:`Storage`: nothing is read until asked."""

    __slots__ = ("storage", "dtype", "shape", "stride", "offset", "requires_grad", "parameter")

    def __init__(self, storage, dtype, shape, stride=None, offset=0, requires_grad=False, parameter=False):
        self.storage = storage
        self.dtype = dtype
        self.shape = tuple(shape)
        self.stride = tuple(stride) if stride is not None else contiguous_strides(self.shape)
        self.offset = offset
        self.requires_grad = requires_grad
        self.parameter = parameter

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)  # numel inline: asked of every tensor, often

    @property
    def is_contiguous(self):
        if len(self.shape) == 1:  # the usual bias, norm, flat buffer: the loop below, unrolled
            return self.stride[0] == 1 or self.shape[0] == 1
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def view_key(self):
        """Two refs with the same view key are the same tensor (tied weights)."""
        return (id(self.storage), self.dtype, self.shape, self.stride, self.offset)

    __setstate__ = _no_state

    def __reduce__(self):  # copy.copy / deepcopy without __setstate__
        return TensorRef, (self.storage, self.dtype, self.shape, self.stride, self.offset, self.requires_grad,
                           self.parameter)

    def chunks(self, budget=None):
        """Yield the tensor's bytes in C order, streaming when it is contiguous in its storage."""
        size = dtypes.itemsize(self.dtype)
        if self.is_contiguous:
            yield from self.storage.chunks(self.offset * size, self.nbytes)
            return
        check_budget(self, budget)
        yield gather(self)

    def copy_to(self, fd, dst_offset, *, want_crc=False, progress=None, files=None, budget=None):
        """Write the tensor's bytes in C order at ``dst_offset`` of ``fd``; see :meth:`Storage.copy_to`."""
        if self.is_contiguous:
            size = dtypes.itemsize(self.dtype)
            return self.storage.copy_to(fd, dst_offset, self.offset * size, self.nbytes, want_crc=want_crc,
                                        progress=progress, files=files)
        return _copy_chunks(self.chunks(budget), fd, dst_offset, self.nbytes, want_crc, progress, repr(self))

    def read_small(self, files, nbytes, limit=1 << 16):
        """The tensor's ``nbytes`` bytes (its :attr:`nbytes`, which the caller has) when it is a contiguous view
        inside a storage that :meth:`Storage.read_small` reads (its CRC checked); None otherwise, for
        :meth:`copy_to`. A writer gathers a million tiny tensors a MiB per write this way."""
        st = self.storage
        if st.nbytes > limit or type(self).copy_to is not TensorRef.copy_to or not self.is_contiguous:
            return None
        data = st.read_small(files, limit)
        if data is None:
            return None
        start = self.offset * dtypes.itemsize(self.dtype)
        if start == 0 and nbytes == len(data):
            return data
        if start + nbytes > len(data):  # readers refuse such a view; a plugin's record might still hold one
            raise CorruptCheckpoint(f"tensor view {list(self.shape)} reaches past the end of storage {st.label}")
        return data[start:start + nbytes]

    def __repr__(self):
        return f"TensorRef({self.dtype}, {list(self.shape)})"


def _storage_copy(cls, fields):
    out = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(out, k, v)
    return out


def check_budget(ref: TensorRef, budget=None):
    """Refuse, before allocating, a strided view whose gathered copy would exceed the memory budget.

    A stride-0 ``expand`` stores a few kilobytes and becomes gigabytes when made contiguous.
    """
    budget = memory_budget() if budget is None else budget
    if ref.nbytes + max(ref.storage.nbytes, 0) > budget:
        raise LimitExceeded(
            f"tensor view of {ref.nbytes} bytes over a {ref.storage.nbytes}-byte storage exceeds the "
            f"memory budget of {budget} bytes; set CKCONV_MEMORY_BUDGET if you trust this file")


def _copy_chunks(chunks, fd, dst_offset, length, want_crc, progress, label):
    """Write an iterable of bytes-like blocks at ``dst_offset``; returns their CRC-32 when ``want_crc``."""
    crc = 0 if want_crc else None
    written = 0
    for block in chunks:
        crc = fastcopy.write_at(fd, block, dst_offset + written, crc)
        n = memoryview(block).nbytes
        written += n
        if progress:
            progress(n)
    if written != length:
        raise CorruptCheckpoint(f"{label} produced {written} bytes, expected {length}")
    return crc


def contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def gather(ref: TensorRef) -> bytes:
    """Copy a strided view into C-order bytes with numpy (no torch needed)."""
    import numpy as np

    size = dtypes.itemsize(ref.dtype)
    check_budget(ref)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.numel and (last + 1) * size > ref.storage.nbytes:
        raise CorruptCheckpoint(f"tensor view {list(ref.shape)} reaches past the end of storage {ref.storage.label}")
    raw = np.frombuffer(ref.storage.read(), dtype=np.uint8)
    elem = np.dtype({1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}.get(size, f"V{size}"))
    base = raw[: len(raw) // size * size].view(elem)
    view = np.lib.stride_tricks.as_strided(
        base[ref.offset:], shape=ref.shape, strides=[s * size for s in ref.stride], writeable=False)
    return np.ascontiguousarray(view).tobytes()


class TorchSize(tuple):
    """``torch.Size`` without torch."""

    def __repr__(self):
        return f"torch.Size({list(self)})"


class TorchDtype(str):
    """``torch.float32`` and friends, by name."""

    def __repr__(self):
        return f"torch.{str(self)}"


class TorchDevice(str):
    """``torch.device('cuda:0')``, by its string form."""

    def __repr__(self):
        return f"torch.device({str(self)!r})"


class Foreign:
    """An inert record of an object whose class ckconv does not run.

    ``module``/``qualname`` give the class (or function) the file asked for; ``args`` (and ``kwargs``) what it would
    have been called with; ``state``, ``listitems`` and ``dictitems`` what pickle would have applied afterwards.
    How pickle would have made the object is kept so a writer can say it the same way: ``newobj`` is True for
    ``cls.__new__(cls, *args)`` (NEWOBJ: no ``__init__``) and False for a call ``cls(*args)`` (REDUCE);
    ``reconstructor`` is ``(base, base_state)`` for ``copyreg._reconstructor(cls, base, base_state)``.

    The class itself (``foreign_class(module, qualname)``) is also a value: an inert *reference* to a global
    (``_norm_layer = BatchNorm2d``, ``numpy.ndarray`` passed to ``_reconstruct``), never imported.
    """

    module = "?"
    qualname = "?"

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "newobj", False)  # reached only when pickle *called* the class (REDUCE)

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "listitems", [])
        object.__setattr__(self, "dictitems", [])
        object.__setattr__(self, "newobj", True)
        object.__setattr__(self, "reconstructor", None)
        return self

    @property
    def class_name(self):
        return f"{self.module}.{self.qualname}"

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def append(self, item):
        self.listitems.append(item)

    def extend(self, items):
        self.listitems.extend(items)

    def __setitem__(self, key, value):
        self.dictitems.append((key, value))

    def __setattr__(self, key, value):  # pickle's slot-state path; recorded, never applied
        state = self.state if isinstance(self.state, dict) else {}
        state[key] = value
        object.__setattr__(self, "state", state)

    def __repr__(self):
        return f"<foreign {self.class_name}>"

    def __eq__(self, other):
        return (isinstance(other, Foreign) and self.class_name == other.class_name and self.args == other.args
                and self.kwargs == other.kwargs and self.state == other.state
                and self.listitems == other.listitems and self.dictitems == other.dictitems
                and self.newobj == other.newobj and self.reconstructor == other.reconstructor)

    __hash__ = object.__hash__


class GlobalRef:
    """Marks objects that stand for a global by name (``module``, ``qualname``) when they appear as values:
    ckconv's builders for the globals it implements (``collections.OrderedDict`` passed to ``defaultdict``)."""

    __slots__ = ()
    module: str
    qualname: str


def is_reference(value) -> bool:
    """Whether ``value`` is an inert reference to a global (a foreign class, or a ckconv builder)."""
    return isinstance(value, GlobalRef) or (isinstance(value, type) and issubclass(value, Foreign))


def reference_name(value) -> tuple:
    """(module, qualname) of a reference."""
    return value.module, value.qualname


_FOREIGN_CLASSES: dict = {}


def foreign_class(module: str, qualname: str):
    """A stand-in class for ``module.qualname``: calling or instantiating it only records arguments."""
    key = (module, qualname)
    if key not in _FOREIGN_CLASSES:
        _FOREIGN_CLASSES[key] = type("Foreign", (Foreign,), {"module": module, "qualname": qualname})
    return _FOREIGN_CLASSES[key]


@dataclass(frozen=True)
class Note:
    """Something the user should know about a result. ``warning`` (set where the note is made, never guessed from
    its wording) marks what calls for attention: a part of the model not written, a freeze lost, a head that
    does not fit. Other notes describe the output."""

    text: str
    warning: bool = False

    def __str__(self):
        return self.text

    @classmethod
    def of(cls, value) -> "Note":
        """A note as it is, or a plugin's plain string as a note."""
        return value if isinstance(value, Note) else cls(str(value))


@dataclass(frozen=True)
class KeysNote(Note):
    """A note about a list of keys: ``text`` gives their count and the first few; ``head`` (the text before the
    list) and ``names`` (every key) let a renderer list them all (``ckconv convert -v``)."""

    head: str = ""
    names: tuple = ()


def warning(text: str) -> Note:
    return Note(text, warning=True)


@dataclass
class Checkpoint:
    """A checkpoint as read from one source: the tree plus what the reader learned about it."""

    root: object
    format: str = ""
    path: str = ""
    metadata: dict = field(default_factory=dict)  # format-level metadata (safetensors __metadata__, ...)
    notes: list = field(default_factory=list)  # [Note] (or str) the user should know (lossy steps, fallbacks)
    foreign: list = field(default_factory=list)  # [(path, class name)] of inert foreign objects
    dangerous: list = field(default_factory=list)  # dangerous globals seen (inspect only; read refuses)
    globals: list = field(default_factory=list)  # [(module, qualname)] every global the file names (verdicts)
    code: list = field(default_factory=list)  # records holding code (TorchScript, an exported graph): never run

