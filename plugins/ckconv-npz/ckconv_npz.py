"""ckconv plugin: NumPy ``.npz`` archives, read and written losslessly.

An ``.npz`` is a zip of ``NAME.npy`` members. A plain state_dict becomes exactly what ``np.savez`` would write, so
``dict(np.load(path))`` gives the weights back. Anything more (nesting, optimizer state, scalars, tied tensors,
``Parameter`` flags) travels as ckconv's structure JSON in one extra member, ``__ckconv_structure__.json``. dtypes
numpy lacks (bfloat16, float8, complex32) are stored as unsigned-int arrays of the same item size and shape, with
their real dtype recorded in that JSON.

Reading never unpickles: object arrays, structured and big-endian dtypes are refused; every size is checked
against the archive, and each member's zip CRC is checked whenever its bytes are read.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

from ckconv import dtypes, hookimpl
from ckconv.errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsafeCheckpoint, UnsupportedContent, UsageError
from ckconv.formats import Format, WriteOptions, structure
from ckconv.model import CHUNK, Checkpoint, Storage, TensorRef, contiguous_strides
from ckconv.tree import foreign_objects

STRUCTURE_MEMBER = "__ckconv_structure__.json"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
MAX_MEMBERS = int(os.environ.get("CKCONV_MAX_TENSORS", 1_000_000))
MAX_STRUCTURE = 100_000_000
MAX_NPY_HEADER = 16384  # numpy itself refuses .npy headers over 10,000 bytes

# ckconv dtype -> numpy type string; everything else is written as an unsigned int of its item size.
NUMPY_CODES = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "|i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "|u1",
    "bool": "|b1", "complex64": "<c8", "complex128": "<c16",
}
FROM_NUMPY = {code: name for name, code in NUMPY_CODES.items()}
RAW_DTYPES = frozenset(dtypes.DTYPES) - frozenset(NUMPY_CODES)
VIEW_CODES = {1: "|u1", 2: "<u2", 4: "<u4", 8: "<u8"}


class NpzFormat(Format):
    name = "npz"
    description = "NumPy .npz archives (np.savez layout; bf16/float8 as same-size uint views)"
    extensions = (".npz",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if path.is_dir() or not head.startswith(ZIP_MAGICS):
            return False
        try:
            with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                arrays = [i for i in infos if i.filename.endswith(".npy")]
                if not infos or any(not i.filename.endswith(".npy") and i.filename != STRUCTURE_MEMBER for i in infos):
                    return False
                if not arrays:
                    return True  # only ckconv's structure member: a checkpoint without tensors
                f.seek(0, 2)
                return _member_head(f, arrays[0], path, f.tell(), len(NPY_MAGIC)) == NPY_MAGIC
        except (zipfile.BadZipFile, CorruptCheckpoint, OSError, ValueError, EOFError, struct.error, zlib.error):
            return False

    def read(self, path: Path) -> Checkpoint:
        arrays, text = read_archive(path)
        if text is None:
            root = dict(arrays)
        else:
            encoded = structure.loads(text, str(path))
            _check_raw_views(encoded, arrays, path)
            root = structure.decode(encoded, dict(arrays), str(path))
        return Checkpoint(root=root, format=self.name, path=str(path), foreign=foreign_objects(root))

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        if options.max_shard_size is not None:
            raise UsageError("npz archives are not sharded; drop --max-shard-size or write safetensors")
        encoded, named, needs_structure = structure.encode(checkpoint.root, raw_dtypes=RAW_DTYPES)
        # ASCII JSON: any Python str survives, lone surrogates included (json.loads restores them)
        text = json.dumps(encoded, separators=(",", ":"), allow_nan=False) if needs_structure else None
        write_archive(path, named, text, options.progress)


# --- reading -------------------------------------------------------------------------------------------------

def read_archive(path):
    """-> ({name: TensorRef} in archive order, structure JSON text or None). Reads headers only."""
    arrays, text = {}, None
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            size = os.fstat(f.fileno()).st_size
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise LimitExceeded(f"{path}: {len(infos)} members, over the limit of {MAX_MEMBERS} (CKCONV_MAX_TENSORS)")
            seen = set()
            for info in infos:
                if info.filename in seen:
                    raise CorruptCheckpoint(f"{path}: duplicate member {info.filename!r:.80}; refusing an ambiguous archive")
                seen.add(info.filename)
                _check_member(path, info)
                if info.filename == STRUCTURE_MEMBER:
                    text = _read_structure(zf, info, path)
                elif info.filename.endswith(".npy"):
                    arrays[info.filename[:-4]] = _array_ref(f, info, path, size)
                else:
                    raise UnsupportedContent(f"{path}: member {info.filename!r:.80} is not a .npy array; "
                                             "ckconv reads only np.savez-style archives")
    except zipfile.BadZipFile as exc:
        raise NotACheckpoint(f"{path}: not a readable checkpoint (broken zip archive: {exc})") from None
    except (EOFError, struct.error) as exc:
        raise CorruptCheckpoint(f"{path}: truncated or damaged npz archive ({exc})") from None
    return arrays, text


def _check_member(path, info):
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise CorruptCheckpoint(f"{path}: member {info.filename!r:.80} declares inconsistent sizes")
    if info.flag_bits & 0x1:
        raise UnsupportedContent(f"{path}: encrypted zip members are not supported")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsupportedContent(f"{path}: member {info.filename!r:.80} uses zip compression method "
                                 f"{info.compress_type}; numpy writes only stored or deflated members")


def _read_structure(zf, info, path):
    if info.file_size > MAX_STRUCTURE:
        raise LimitExceeded(f"{path}: {STRUCTURE_MEMBER} is {info.file_size} bytes, over {MAX_STRUCTURE}")
    with zf.open(info) as member:
        raw = member.read(MAX_STRUCTURE + 1)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptCheckpoint(f"{path}: {STRUCTURE_MEMBER} is not UTF-8 text") from None


def _array_ref(f, info, path, size):
    import io

    name = info.filename
    head = io.BytesIO(_member_head(f, info, path, size, MAX_NPY_HEADER))
    shape, fortran_order, dtype, header_len = read_npy_header(head, f"{path}: member {name!r:.80}")
    itemsize = dtypes.itemsize(dtype)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * itemsize
    if header_len + nbytes != info.file_size:
        raise CorruptCheckpoint(f"{path}: member {name!r:.80} holds {info.file_size - header_len} data bytes, "
                                f"but its header declares {list(shape)} x {dtype} = {nbytes}")
    label = name[:-4]
    if info.compress_type == zipfile.ZIP_STORED:
        start = _data_start(f, info, path, size)
        storage = StoredMemberStorage(name, dtype, nbytes, path=str(path), offset=start + header_len,
                                      crc=info.CRC, header=head.getvalue()[:header_len], label=label)
    else:
        storage = DeflatedMemberStorage(name, dtype, nbytes, path=str(path), member=name,
                                        skip=header_len, label=label)
    stride = None
    if fortran_order:  # column-major data: the same bytes, seen through reversed strides
        stride, acc = [], 1
        for s in shape:
            stride.append(acc)
            acc *= max(s, 1)
    return TensorRef(storage, dtype, shape, stride)


def read_npy_header(fp, where):
    """-> (shape, fortran_order, ckconv dtype name, header length). Never evaluates more than a literal."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise UnsupportedContent(f"{where} uses .npy format version {version}; ckconv reads versions 1.0 and 2.0")
    except ValueError as exc:
        raise CorruptCheckpoint(f"{where} has an invalid .npy header ({exc})") from None
    if dtype.hasobject:
        raise UnsafeCheckpoint(f"{where} is a pickled object array; loading it would run pickle, so ckconv refuses "
                               "it (np.load(..., allow_pickle=False) refuses it too)")
    if dtype.names is not None or dtype.subdtype is not None:
        raise UnsupportedContent(f"{where} has a structured dtype {dtype}; ckconv converts plain numeric arrays only")
    if dtype.byteorder == ">":
        raise UnsupportedContent(f"{where} is big-endian ({dtype.str}); re-save it little-endian with "
                                 "arr.astype(arr.dtype.newbyteorder('<'))")
    name = FROM_NUMPY.get(dtype.str)
    if name is None:
        raise UnsupportedContent(f"{where} has dtype {dtype.str} ({dtype}), which torch has no tensor type for")
    if not all(type(s) is int and s >= 0 for s in shape):
        raise CorruptCheckpoint(f"{where} has an invalid shape {shape!r:.80}")
    return tuple(shape), bool(fortran_order), name, fp.tell()


def _data_start(f, info, path, size):
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CorruptCheckpoint(f"{path}: member {info.filename!r:.80} has a broken local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > size:
        raise CorruptCheckpoint(f"{path}: member {info.filename!r:.80} runs past the end of the file; truncated?")
    return start


def _member_head(f, info, path, size, n):
    """Up to ``n`` first bytes of a member, read past zipfile (whose CRC check would fail on a damaged member
    before ckconv could say which tensor is damaged; the CRC is checked when the data is read)."""
    f.seek(_data_start(f, info, path, size))
    if info.compress_type == zipfile.ZIP_STORED:
        return f.read(min(info.file_size, n))
    inflate, out, left = zlib.decompressobj(-15), b"", info.compress_size
    while len(out) < n and left and not inflate.eof:
        chunk = f.read(min(left, 1 << 16))
        if not chunk:
            break
        left -= len(chunk)
        out += inflate.decompress(chunk, n - len(out))
    return out


def _check_raw_views(encoded, arrays, path):
    """A tensor whose dtype numpy lacks must come from a C-order uint array of the same item size."""
    stack = [encoded]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "$tensor" in node and "dtype" in node:
                ref = arrays.get(node["$tensor"])
                dt = node["dtype"]
                if ref is not None and dt in dtypes.DTYPES and (
                        ref.stride != contiguous_strides(ref.shape) or not NUMPY_CODES[ref.dtype].startswith(("|u", "<u"))
                        or dtypes.itemsize(ref.dtype) != dtypes.itemsize(dt)):
                    raise CorruptCheckpoint(f"{path}: member {node['$tensor']!r:.80} is {ref.dtype} but should hold "
                                            f"{dt} as a C-order uint{8 * dtypes.itemsize(dt)} view")
            stack.extend(node.values())


class StoredMemberStorage(Storage):
    """The data of an uncompressed ``.npy`` member: a byte range of the archive.

    The member's zip CRC covers its .npy header too, so the check is seeded with the header's CRC.
    """

    def __init__(self, key, dtype, nbytes, *, path, offset, crc, header, label):
        super().__init__(key, dtype, nbytes, path=path, offset=offset, crc=crc, label=label)
        self.header_crc = zlib.crc32(header)

    def chunks(self, start=0, length=None, size=CHUNK):
        if length is None:
            length = self.nbytes - start
        return self.file_chunks(start, length, size, crc_seed=self.header_crc, what="member")


class DeflatedMemberStorage(Storage):
    """The data of a compressed (``np.savez_compressed``) member, inflated as it streams; zipfile checks the CRC."""

    def __init__(self, key, dtype, nbytes, *, path, member, skip, label):
        super().__init__(key, dtype, nbytes, path=path, label=label)
        self.member = member
        self.skip = skip

    def chunks(self, start=0, length=None, size=CHUNK):
        if length is None:
            length = self.nbytes - start
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as m:
                _discard(m, self.skip + start, size)
                remaining = length
                while remaining:
                    block = m.read(min(size, remaining))
                    if not block:
                        raise CorruptCheckpoint(f"{self.path}: member {self.label} is truncated; the file is damaged")
                    remaining -= len(block)
                    yield block
                if start + length == self.nbytes:
                    m.read(1)  # reach the end of the member so zipfile checks its CRC
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise CorruptCheckpoint(f"{self.path}: member {self.label} is damaged ({exc}); get a fresh copy") from None


def _discard(stream, n, size):
    while n:
        block = stream.read(min(size, n))
        if not block:
            raise EOFError("member ends inside its header")
        n -= len(block)


# --- writing -------------------------------------------------------------------------------------------------

def npy_header(ref: TensorRef) -> bytes:
    """The .npy header for ``ref`` written in C order, as ``np.save`` would write it (raw dtypes as uint views)."""
    import io

    import numpy as np

    code = NUMPY_CODES.get(ref.dtype) or VIEW_CODES[dtypes.itemsize(ref.dtype)]
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(code)), "fortran_order": False, "shape": tuple(ref.shape)}
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, d)
    except ValueError:  # header over 64 KiB: only version 2.0 can hold it
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, d)
    return out.getvalue()


def write_archive(path, named, text, progress=None):
    """Write ``[(name, TensorRef)]`` as ``name.npy`` members (stored, like np.savez), plus the structure JSON."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        if text is not None:
            zf.writestr(zipfile.ZipInfo(STRUCTURE_MEMBER), text.encode("utf-8"))
        for name, ref in named:
            if "\x00" in name or not _utf8(name):
                raise UnsupportedContent(f"cannot store a tensor named {name!r:.80} in a zip archive (NUL character "
                                         "or lone surrogate); rename it or write safetensors")
            header = npy_header(ref)
            info = zipfile.ZipInfo(name + ".npy")
            info.file_size = len(header) + ref.nbytes  # lets zipfile choose zip64 up front for big members
            with zf.open(info, "w") as member:
                member.write(header)
                for chunk in ref.chunks():
                    member.write(chunk)
                    if progress:
                        progress(len(chunk))


def _utf8(name):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@hookimpl
def ckconv_register_formats(register):
    register(NpzFormat())
