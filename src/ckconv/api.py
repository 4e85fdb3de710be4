"""The Python API in one place: read, load, save, convert (the CLI is a thin layer over these).

A face only: each name lives in the module of its stage (:mod:`ckconv.io`, :mod:`ckconv.conversion`).
"""

from .conversion import ConversionResult, convert
from .io import detect_format, load, output_target, parse_size, read, save

__all__ = ["ConversionResult", "convert", "detect_format", "load", "output_target", "parse_size", "read", "save"]
