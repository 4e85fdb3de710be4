"""The safetensors file: its header, reading and writing; and the ``safetensors`` layout of a hub folder.

Format toolkit, not a plugin: the ``safetensors`` format reads and writes with it, and ``torch-sharded`` uses its
sniffing, which leaves a safetensors folder or index to the safetensors format. The hub folder itself (index,
shards, planner) is :mod:`ckconv.formats.hub_folder`.

Parsing is ckconv's own and at least as strict as the Rust reference: header size capped, JSON validated with
duplicate names refused, offsets contiguous from 0 with no gap or overlap, data ending exactly at end of file,
dtype x shape equal to the byte length. Non-tensor structure travels in ``__metadata__["ckconv.structure"]``.
"""

from __future__ import annotations

import json
import operator
import os
import re
import struct
from pathlib import Path

from .. import dtypes
from ..errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsupportedContent
from ..model import Storage, TensorRef, contiguous_strides
from ..pickling.unpickler import short_repr
from ..storage.fastcopy import SourceFiles, write_at
from ..storage.files import is_text, parse_json
from ..tree import gc_paused
from .hub_folder import MAX_TENSORS, HubLayout

MAX_HEADER = 100_000_000  # the Rust implementation's cap
MAX_BYTES = (1 << 64) - 1  # shapes and offsets are u64 in the Rust implementation
LAYOUT = HubLayout(index="model.safetensors.index.json", single="model.safetensors",
                   shard="model-{:05d}-of-{:05d}.safetensors")


def sniff(path: Path, head: bytes) -> bool:
    """True when ``path`` is a safetensors file, index or folder (``head``: a file's first bytes)."""
    if path.is_dir():
        return ((path / LAYOUT.index).is_file() or (path / LAYOUT.single).is_file()
                or bool(list(path.glob("*.safetensors.index.json"))))
    if path.name.endswith(".index.json"):
        return head.lstrip()[:1] == b"{"
    return len(head) >= 9 and head[8:9] == b"{"


def _header_bytes(path):
    """-> (the header's bytes, where the data starts, the file's size); its length checked before it is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise NotACheckpoint(f"{path}: not a readable checkpoint (too short for safetensors)")
        n = struct.unpack("<Q", prefix)[0]
        if n > MAX_HEADER:
            raise CorruptCheckpoint(f"{path}: safetensors header declares {n} bytes, over the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise CorruptCheckpoint(f"{path}: safetensors header length {n} runs past the end of the file; truncated?")
        return f.read(n), 8 + n, size


def _too_many(path, raw):
    """The tensor-count refusal, raised before parsing when ``raw`` holds more tensor descriptions than allowed (an
    unescaped "data_offsets" key is one per tensor: inside a JSON string its quotes would be escaped); returned
    for the parse's object count to raise on headers that escape it."""
    too_many = LimitExceeded(f"{path}: declares more than {MAX_TENSORS} tensors, over the limit of {MAX_TENSORS} "
                             "(CKCONV_MAX_TENSORS)")
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise too_many
    return too_many


def _data_end(path, data_start, end, size):
    if data_start + end != size:
        raise CorruptCheckpoint(
            f"{path}: tensor data ends at byte {data_start + end} but the file has {size} bytes "
            "(trailing or missing data); the file was altered or truncated")


def parse_header(path):
    """-> (ordered [(name, dtype, shape, begin, end)], metadata, data_start). Refuses every malformed header."""
    raw, data_start, size = _header_bytes(path)
    too_many = _too_many(path, raw)  # refused before parsing; the hook below counts objects for escaped keys
    header = parse_json(raw, MAX_TENSORS + 2, too_many, f"{path}: safetensors header", compact=_entry_compactor(),
                        parse_int=_unsigned if b"-0" in raw else None)
    del raw
    if type(header) is _Entry:
        raise CorruptCheckpoint(f"{path}: safetensors header is one tensor's description, not a map of tensor names")
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptCheckpoint(f"{path}: safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise LimitExceeded(f"{path}: declares {len(header)} tensors, over the limit of {MAX_TENSORS} (CKCONV_MAX_TENSORS)")
    entries = []
    add = entries.append
    for name, info in header.items():
        if type(info) is not _Entry:  # the parse left it as it was: say what is wrong with it
            _refuse_entry(path, name, info)
        add((name, *info))
    header = None
    entries.sort(key=_by_offsets)
    pos = 0
    for name, _, _, begin, end in entries:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} {what} (offset {begin}, expected {pos})")
        pos = end
    _data_end(path, data_start, pos, size)
    return entries, metadata, data_start


def _unsigned(text: str) -> int:
    """An integer of the header, for ``json.loads``: ``-0`` is refused, as serde_json reads it as a float (-0.0)
    that no size or offset may be, where Python's json makes it the integer 0."""
    if text == "-0":
        raise ValueError("-0 where an unsigned integer belongs (the safetensors library refuses it)")
    return int(text)


class _Entry(tuple):
    """(dtype, shape, begin, end) of one tensor, checked as the JSON was parsed: no dict or lists kept per tensor."""

    __slots__ = ()


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_CODES = {code: (name, dtypes.itemsize(name)) for code, name in dtypes.SAFETENSORS_TO_DTYPE.items()}
_by_offsets = operator.itemgetter(3, 4)


def _entry_compactor():
    """For one parse: ``compact(pairs)`` turns an object of exactly dtype/shape/data_offsets that passes every check
    into an :class:`_Entry`, and returns None for anything else (which stays a dict: :func:`_refuse_entry` names
    what is wrong with it). Equal shapes share one tuple."""
    shapes: dict = {}

    def compact(pairs):
        if len(pairs) != 3:
            return None
        (k0, code), (k1, shape), (k2, offsets) = pairs
        if not (k0 == "dtype" and k1 == "shape" and k2 == "data_offsets"):  # the usual order, else any order
            info = dict(pairs)
            if info.keys() != _ENTRY_KEYS:
                return None
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        known = _CODES.get(code) if type(code) is str else None
        if known is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
            return None
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= MAX_BYTES:
            return None
        numel = 1
        for s in shape:
            if type(s) is not int or s < 0 or s > MAX_BYTES:
                return None
            numel *= s
            if numel > MAX_BYTES:
                return None
        if numel * known[1] != end - begin:
            return None
        key = tuple(shape)
        return _Entry((known[0], shapes.setdefault(key, key), begin, end))

    return compact


def _refuse_entry(path, name, info):
    """Name what is wrong with a tensor's description that :func:`_entry_compactor` did not accept (the same checks, in the order they always ran)."""
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} needs exactly dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(code) is not str or code not in dtypes.SAFETENSORS_TO_DTYPE:
        raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} has unknown dtype {short_repr(code, 20)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} has invalid data_offsets")
    dtype = dtypes.SAFETENSORS_TO_DTYPE[code]
    numel = 1
    for s in shape:
        numel *= s
        if numel > MAX_BYTES or s > MAX_BYTES:  # checked as it grows: a 3,000-dim shape is a bignum bomb
            raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} is too large: its shape overflows 64 bits")
    if offsets[1] > MAX_BYTES:
        raise CorruptCheckpoint(f"{path}: tensor {name!r:.80} is too large: its data_offsets overflow 64 bits")
    raise CorruptCheckpoint(
        f"{path}: tensor {name!r:.80} is {shape} x {code} = {numel * dtypes.itemsize(dtype)} bytes but "
        f"data_offsets span {offsets[1] - offsets[0]}")


def read_file(path):
    """-> ({name: TensorRef} in the order of their bytes, metadata)."""
    with gc_paused():  # a million small records, no cycles: a collection pass per few thousand would rescan them all
        return _read_file(path)


def _read_file(path):
    raw, data_start, size = _header_bytes(path)
    _too_many(path, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    del raw  # held once, as text; parse_header (below) reads it again for what _read_usual leaves to it
    read = None if text is None else _read_usual(text, str(path), data_start, size)
    del text
    if read is not None:
        return read
    entries, metadata, data_start = parse_header(path)
    tensors = {}
    where = str(path)
    strides: dict = {}  # one stride tuple per distinct shape
    for name, dtype, shape, begin, end in entries:
        st = Storage(name, dtype, end - begin, path=where, offset=data_start + begin, label=name)
        stride = strides.get(shape)
        if stride is None:
            stride = strides[shape] = contiguous_strides(shape)
        tensors[name] = TensorRef(st, dtype, shape, stride)
    return tensors, metadata


# A header as safetensors and ckconv write it, read in one pass straight into the tensor records (no parsed dict,
# no list of entries beside them: a million tensors cost their records only): "__metadata__" first if present,
# then each tensor's dtype, shape and data_offsets in that order, names without escapes, the tensors in offset
# order. Anything else, valid or not, goes to parse_header, which accepts or refuses it as always; this reading
# accepts a subset of what parse_header accepts and gives the same result for it (tests/test_safetensors_header.py).
_WS = r"[ \t\n\r]*"
_INT = r"(0|[1-9][0-9]{0,19})"
_USUAL_ENTRY = re.compile(
    rf'{_WS}"([^"\\\x00-\x1f]*)"{_WS}:{_WS}\{{{_WS}"dtype"{_WS}:{_WS}"([A-Z0-9_]{{1,16}})"{_WS},{_WS}"shape"{_WS}:'
    rf'{_WS}\[([0-9, \t\n\r]*)\]{_WS},{_WS}"data_offsets"{_WS}:{_WS}\[{_WS}{_INT}{_WS},{_WS}{_INT}{_WS}\]{_WS}'
    rf'\}}{_WS}([,}}])')
_USUAL_METADATA = re.compile(rf'{_WS}\{{{_WS}"__metadata__"{_WS}:{_WS}')
_USUAL_OPEN = re.compile(rf"{_WS}\{{")
_USUAL_NEXT = re.compile(rf"{_WS}([,}}])")
_USUAL_DIM = re.compile(rf"{_WS}{_INT}{_WS}")
_USUAL_END = re.compile(_WS)


class _Unusual(Exception):
    """A metadata object that is not a flat map of strings to strings: parse_header says what it is."""


def _flat_strings(pairs):
    if not all(type(v) is str for _, v in pairs):
        raise _Unusual
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Unusual
    return out


_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=_flat_strings)


def _usual_shape(dims: str):
    """-> (shape, contiguous strides, numel) of the text between a shape's brackets, or None."""
    shape = []
    numel = 1
    if dims.strip(" \t\n\r"):
        for part in dims.split(","):
            m = _USUAL_DIM.fullmatch(part)
            if m is None:
                return None
            s = int(m.group(1))
            numel *= s
            if s > MAX_BYTES or numel > MAX_BYTES:
                return None
            shape.append(s)
    shape = tuple(shape)
    return shape, contiguous_strides(shape), numel


def _read_usual(text: str, where: str, data_start: int, size: int):
    """-> (tensors, metadata) of a header written the usual way (see above), or None for parse_header to read."""
    metadata = {}
    m = _USUAL_METADATA.match(text)
    if m is not None:
        try:
            metadata, pos = _METADATA_DECODER.raw_decode(text, m.end())
        except (ValueError, RecursionError, _Unusual):
            return None
        if type(metadata) is not dict or not is_text((*metadata, *metadata.values())):
            return None  # parse_header says what is wrong
        m = _USUAL_NEXT.match(text, pos)
        if m is None:
            return None
        more = m.group(1) == ","
    else:
        m = _USUAL_OPEN.match(text)
        if m is None:
            return None
        more = True
    pos = m.end()
    tensors: dict = {}
    shapes: dict = {}  # the text of a shape -> (shape, strides, numel): equal shapes share their tuples
    codes = _CODES
    entry = _USUAL_ENTRY.match
    count = end = 0
    while more:
        m = entry(text, pos)
        if m is None:
            return None
        name, code, dims, begin, stop, sep = m.groups()
        known = codes.get(code)
        described = shapes.get(dims)
        if described is None:
            described = shapes[dims] = _usual_shape(dims)
        if known is None or described is None or name == "__metadata__":
            return None
        begin, stop = int(begin), int(stop)
        nbytes = stop - begin
        if begin != end or nbytes != described[2] * known[1] or stop > MAX_BYTES:
            return None  # out of offset order, a gap, an overlap or a size mismatch: parse_header says which
        end = stop
        dtype = known[0]
        tensors[name] = TensorRef(Storage(name, dtype, nbytes, path=where, offset=data_start + begin, label=name),
                                  dtype, described[0], described[1])
        count += 1
        if len(tensors) != count:
            return None  # a duplicate name
        pos = m.end()
        more = sep == ","
    if _USUAL_END.match(text, pos).end() != len(text):
        return None
    _data_end(where, data_start, end, size)
    return tensors, metadata


def header_bytes(named, metadata, sizes=None) -> bytes:
    """The 8-byte length and the JSON header of ``named`` ([(name, TensorRef)]; ``sizes``: their nbytes when the
    caller has them), padded with spaces to a multiple of 8 as the Rust implementation writes it.

    The text ``json.dumps`` gives for ``{"__metadata__": metadata, name: {"dtype", "shape", "data_offsets"}...}``,
    built a tensor at a time: each name JSON-escaped, each dtype's and each distinct shape's text made once."""
    sizes = [ref.nbytes for _, ref in named] if sizes is None else sizes
    parts = ['{"__metadata__":' + json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))]
    add = parts.append
    codes: dict = {}  # dtype -> '"dtype":"F32","shape":' ("" for raw bytes: "U8", shape [nbytes])
    shapes: dict = {}  # shape -> its JSON text
    pos = 0
    for (name, ref), n in zip(named, sizes):
        if name == "__metadata__":
            raise UnsupportedContent("a tensor named __metadata__ cannot be stored in a safetensors header")
        dtype, end = ref.dtype, pos + n
        code = codes.get(dtype)
        if code is None:
            found = dtypes.safetensors_code(dtype)
            code = codes[dtype] = f'"dtype":"{found}","shape":' if found else ""
        if code:
            shape = shapes.get(ref.shape)
            if shape is None:
                shape = shapes[ref.shape] = json.dumps(list(ref.shape), separators=(",", ":"))
            add(f'{_json_string(name)}:{{{code}{shape},"data_offsets":[{pos},{end}]}}')
        else:
            add(f'{_json_string(name)}:{{"dtype":"U8","shape":[{n}],"data_offsets":[{pos},{end}]}}')
        pos = end
    raw = (",".join(parts) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


_json_string = json.encoder.encode_basestring  # a str as JSON text, non-ASCII kept (ensure_ascii=False)


SMALL = 1 << 16  # tensors up to this size (in storages up to this size) are gathered and written a MiB at a time
GATHER = 1 << 20


def write_file(path, named, metadata, progress=None):
    """Header, then each tensor's bytes copied straight from its source file (see ckconv.storage.fastcopy).

    Small tensors (a state_dict of a hundred thousand biases and norms) are read through one read-ahead window
    of their source and gathered into one buffer written a MiB at a time (:meth:`TensorRef.read_small`: each source
    record's CRC is still checked); the others go file to file in the kernel."""
    sizes = [ref.nbytes for _, ref in named]
    header = header_bytes(named, metadata, sizes)
    with open(path, "wb", buffering=0) as f, SourceFiles() as files:
        fd = f.fileno()
        write_at(fd, header, 0)
        pos = start = len(header)
        pending = bytearray()
        for (_, ref), n in zip(named, sizes):
            data = ref.read_small(files, n, SMALL) if n <= SMALL else None
            if data is not None:
                pending += data
                if len(pending) >= GATHER:
                    _flush(fd, pending, start, progress)
                    start = pos + n
            else:
                _flush(fd, pending, start, progress)
                ref.copy_to(fd, pos, progress=progress, files=files)
                start = pos + n
            pos += n
        _flush(fd, pending, start, progress)


def _flush(fd, pending, offset, progress):
    """Write the gathered bytes at ``offset`` and empty the buffer."""
    if pending:
        write_at(fd, pending, offset)
        if progress:
            progress(len(pending))
        pending.clear()
