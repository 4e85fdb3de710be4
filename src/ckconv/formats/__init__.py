"""What a format plugin builds on: the :class:`Format` contract and the helpers every writer shares.

This package face is the format half of the plugin API (docs/plugins.md, "The plugin API"); the built-in formats
(``torch_pickle``, ``safetensors_format``, ``torch_sharded``, ``dcp``) live beside it as plugins like any other.
"""

from ..pickling import structure
from ..pickling.writer import PickleWriter, check_writable
from ..storage.atomic import FolderLayout
from .base import Format, WriteOptions

__all__ = ["FolderLayout", "Format", "PickleWriter", "WriteOptions", "check_writable", "structure"]
