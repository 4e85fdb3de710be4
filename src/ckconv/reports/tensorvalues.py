"""Tensor elements as numbers, with numpy only: every dtype ckconv moves, decoded in bounded blocks.

``diff`` compares tensors across dtypes (a bf16 cast against its fp32 source), so elements are decoded into one of
three exact representations: integers (bool as 0/1) as int64/uint64, real floats as float64 (float16, bfloat16 and
every float8 are exact in float64), complex as complex128. numpy has no bfloat16 or float8: bfloat16 is the upper
half of a float32, and each float8 format is a 256-entry table built from its bit layout.
"""

from __future__ import annotations

import numpy as np

from .. import dtypes

BLOCK_ELEMENTS = 1 << 18  # elements decoded at a time: 4 MiB of complex128 per side, a few temporaries

_NUMPY = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "u1",
    "complex128": "<c16", "complex64": "<c8",
}
# float8 layouts: (exponent bits, mantissa bits, bias, flavour); "fn" has no infinities and NaN at S.1111.111,
# "fnuz" has no infinities, no negative zero and NaN at 0x80 only, "ieee" reserves the top exponent for inf/NaN.
_FLOAT8 = {
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
}
_TABLES: dict = {}


def kind(dtype: str) -> str:
    """'int', 'float' or 'complex': the exact representation :func:`decode` gives ``dtype``'s elements."""
    if dtype.startswith("complex"):
        return "complex"
    if dtype in dtypes.FLOATING or dtype.startswith("float8"):
        return "float"
    return "int"


def common_kind(a: str, b: str) -> str:
    ka, kb = kind(a), kind(b)
    if "complex" in (ka, kb):
        return "complex"
    return "float" if "float" in (ka, kb) else "int"


def decode(raw, dtype: str, as_kind: str):
    """Little-endian bytes of whole elements -> a numpy array in the representation ``as_kind``."""
    if dtype == "bfloat16":
        values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype == "complex32":
        halves = np.frombuffer(raw, "<f2").astype(np.float64)
        values = halves[0::2] + 1j * halves[1::2]
    elif dtype in _FLOAT8 or dtype == "float8_e8m0fnu":
        values = _table(dtype)[np.frombuffer(raw, np.uint8)]
    else:
        values = np.frombuffer(raw, _NUMPY[dtype])
    with np.errstate(invalid="ignore"):  # NaN float16 -> float64 warns on some numpy builds
        if as_kind == "complex":
            return values.astype(np.complex128)
        if as_kind == "float":
            return values.astype(np.float64)
    return values.astype(np.uint64 if dtype == "uint64" else np.int64)


def _table(dtype):
    if dtype not in _TABLES:
        codes = np.arange(256, dtype=np.int64)
        if dtype == "float8_e8m0fnu":  # exponent only, unsigned: 2**(e - 127), 0xFF is NaN
            table = np.ldexp(1.0, codes - 127)
            table[255] = np.nan
        else:
            ebits, mbits, bias, flavour = _FLOAT8[dtype]
            sign = np.where(codes >> 7, -1.0, 1.0)
            exp = (codes >> mbits) & ((1 << ebits) - 1)
            mant = codes & ((1 << mbits) - 1)
            frac = mant / (1 << mbits)
            table = sign * np.where(exp == 0, np.ldexp(frac, 1 - bias), np.ldexp(1.0 + frac, exp - bias))
            top = exp == (1 << ebits) - 1
            if flavour == "ieee":
                table[top & (mant == 0)] = sign[top & (mant == 0)] * np.inf
                table[top & (mant != 0)] = np.nan
            elif flavour == "fn":
                table[top & (mant == (1 << mbits) - 1)] = np.nan
            else:
                table[0x80] = np.nan
        _TABLES[dtype] = table
    return _TABLES[dtype]


def blocks(ref, count=None):
    """Yield a tensor's C-order bytes in blocks of ``count`` whole elements (the last may be shorter)."""
    want = (count or BLOCK_ELEMENTS) * dtypes.itemsize(ref.dtype)
    pending = bytearray()
    for chunk in ref.chunks():
        pending += chunk
        while len(pending) >= want:
            yield bytes(pending[:want])
            del pending[:want]
    if pending:
        yield bytes(pending)


def abs_diff(x, y, as_kind):
    """|x - y| elementwise, exact for integers (int64/uint64 pairs never overflow), with NaN == NaN as 0."""
    if as_kind == "int":
        if x.dtype == y.dtype:
            xu, yu = x.astype(np.uint64), y.astype(np.uint64)
            return np.where(x >= y, xu - yu, yu - xu)  # modular subtraction: the true difference is < 2**64
        return np.abs(x.astype(object) - y.astype(object))  # uint64 against signed: rare, exact via Python ints
    with np.errstate(all="ignore"):
        d = np.abs(x - y)
        both_nan = _isnan(x) & _isnan(y)
        d[(x == y) | both_nan] = 0
    return d


def _isnan(v):
    return np.isnan(v.real) | np.isnan(v.imag) if np.iscomplexobj(v) else np.isnan(v)


def outside(d, y, atol, rtol, as_kind):
    """Boolean mask of elements failing ``|a - b| <= atol + rtol * |b|`` (torch.isclose; NaN == NaN is close,
    an infinite difference never is)."""
    if as_kind == "int":
        if not atol and not rtol:
            return d != 0
        with np.errstate(all="ignore"):
            return ~(d.astype(np.float64) <= atol + rtol * np.abs(y.astype(np.float64)))
    with np.errstate(all="ignore"):  # d == 0 first: NaN or infinite elements of y make the bound NaN
        return ~((d == 0) | (np.isfinite(d) & (d <= atol + rtol * np.abs(y))))
