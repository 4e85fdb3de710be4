"""The tensor dtypes ckconv moves, described without importing torch.

Each entry: torch name -> (itemsize, safetensors code or None, torch typed-storage class or None).
dtypes without a typed storage class are written the way torch >= 2.1 writes them: an ``UntypedStorage``
plus ``_rebuild_tensor_v3`` carrying the dtype.
"""

__all__ = ["DTYPES", "FLOATING", "dtype_name", "itemsize", "safetensors_code", "torch_dtype"]

DTYPES = {
    "float64": (8, "F64", "DoubleStorage"),
    "float32": (4, "F32", "FloatStorage"),
    "float16": (2, "F16", "HalfStorage"),
    "bfloat16": (2, "BF16", "BFloat16Storage"),
    "int64": (8, "I64", "LongStorage"),
    "int32": (4, "I32", "IntStorage"),
    "int16": (2, "I16", "ShortStorage"),
    "int8": (1, "I8", "CharStorage"),
    "uint8": (1, "U8", "ByteStorage"),
    "bool": (1, "BOOL", "BoolStorage"),
    "complex64": (8, "C64", "ComplexFloatStorage"),
    "complex128": (16, None, "ComplexDoubleStorage"),
    "complex32": (4, None, None),
    "uint16": (2, "U16", None),
    "uint32": (4, "U32", None),
    "uint64": (8, "U64", None),
    "float8_e4m3fn": (1, "F8_E4M3", None),
    "float8_e5m2": (1, "F8_E5M2", None),
    "float8_e4m3fnuz": (1, "F8_E4M3FNUZ", None),
    "float8_e5m2fnuz": (1, "F8_E5M2FNUZ", None),
    "float8_e8m0fnu": (1, None, None),
}

QUANTIZED = {"qint8", "qint32", "quint8", "quint4x2", "quint2x4"}
QUANTIZED_STORAGES = {"QInt8Storage", "QInt32Storage", "QUInt8Storage", "QUInt4x2Storage", "QUInt2x4Storage"}
# a quantized dtype's bytes: the dtype of its integer representation (sub-byte dtypes pack into uint8)
QUANTIZED_REPR = {"qint8": "int8", "quint8": "uint8", "qint32": "int32", "quint4x2": "uint8", "quint2x4": "uint8"}
STORAGE_TO_QUANTIZED = {"QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
                        "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4"}

STORAGE_TO_DTYPE = {storage: name for name, (_, _, storage) in DTYPES.items() if storage}
SAFETENSORS_TO_DTYPE = {code: name for name, (_, code, _) in DTYPES.items() if code}
# Aliases torch accepts as attribute names (``torch.float`` is ``torch.float32``).
ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
    "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
}
FLOATING = {"float64", "float32", "float16", "bfloat16"}
CAST_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
              "float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}


def itemsize(dtype: str) -> int:
    """Bytes per element; a quantized dtype's are its integer representation's (one byte for packed ones)."""
    return DTYPES[dtype][0] if dtype in DTYPES else DTYPES[QUANTIZED_REPR[dtype]][0]


def safetensors_code(dtype: str):
    return DTYPES[dtype][1]


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def dtype_name(torch_dtype) -> str:
    return str(torch_dtype).removeprefix("torch.")
