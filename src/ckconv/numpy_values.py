"""numpy arrays, scalars and dtypes inside checkpoints, turned into real numpy objects without unpickling them.

pickle stores an array as ``numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` followed by BUILD
with ``(version, shape, dtype, is_fortran, raw bytes)``; a dtype as ``numpy.dtype('f4', False, True)`` plus BUILD
``(3, '<', ...)``; a scalar as ``numpy._core.multiarray.scalar(dtype, raw bytes)``. ckconv reads all of these as
inert records (:class:`ckconv.model.Foreign`); :func:`value` rebuilds the numpy object from the record's fields
with ``numpy.frombuffer`` -- nothing the file names is called. Object arrays and structured dtypes (which only a
pickle can rebuild) are left as records.
"""

from __future__ import annotations

import math

from .model import Foreign, is_reference

NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
NOT_NUMPY = object()


def _is(node, qualname, modules=NUMPY_MODULES):
    return isinstance(node, Foreign) and node.qualname == qualname and node.module in modules


def dtype_of(node):
    """A real ``numpy.dtype`` for a dtype record, or NOT_NUMPY."""
    import numpy as np

    if not (_is(node, "dtype", ("numpy",)) and node.args and type(node.args[0]) is str):
        return NOT_NUMPY
    code, state = node.args[0], node.state
    order = ""
    if isinstance(state, tuple) and len(state) >= 3:
        if state[2] is not None:  # structured dtype: field names and offsets
            return NOT_NUMPY
        order = state[1] if state[1] in ("<", ">") else ""
    if len(code) > 12 or not code.replace("_", "").isalnum():
        return NOT_NUMPY
    try:
        dt = np.dtype(order + code)
    except TypeError:
        return NOT_NUMPY
    return NOT_NUMPY if dt.hasobject or dt.fields is not None else dt


def value(node):
    """The numpy object a record stands for (array, scalar, dtype), or NOT_NUMPY."""
    import numpy as np

    if _is(node, "dtype", ("numpy",)):
        return dtype_of(node)
    if _is(node, "scalar") and len(node.args) == 2 and isinstance(node.args[1], (bytes, bytearray)):
        dt = dtype_of(node.args[0])
        if dt is NOT_NUMPY or dt.itemsize != len(node.args[1]):
            return NOT_NUMPY
        return np.frombuffer(bytes(node.args[1]), dtype=dt)[0].copy()
    if (_is(node, "_reconstruct") and node.args and is_reference(node.args[0])
            and node.args[0].qualname == "ndarray" and isinstance(node.state, tuple) and len(node.state) == 5):
        _version, shape, dt_record, fortran, raw = node.state
        dt = dtype_of(dt_record)
        if (dt is NOT_NUMPY or not isinstance(raw, (bytes, bytearray)) or type(shape) is not tuple
                or not all(type(s) is int and s >= 0 for s in shape)):
            return NOT_NUMPY
        if math.prod(shape) * dt.itemsize != len(raw):
            return NOT_NUMPY
        flat = np.frombuffer(bytes(raw), dtype=dt).copy()
        return flat.reshape(shape, order="F" if fortran else "C")
    return NOT_NUMPY
