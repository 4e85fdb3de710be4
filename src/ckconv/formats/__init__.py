"""What a format plugin builds on: the :class:`Format` contract and the helpers every writer shares.

This package face is the format half of the plugin API (docs/plugins.md, "The plugin API"); the built-in formats
(``torch_pickle``, ``safetensors_format``, ``torch_sharded``, ``dcp``) live beside it as plugins like any other,
over the format toolkit they share (``torch_archive``, ``torch_file``, ``safetensors_file``): modules, not plugins,
so that no plugin imports another.
"""

from ..pickling import structure
from ..pickling.writer import PickleWriter, check_writable
from ..storage.atomic import FolderLayout
from .base import Format, RankWrite, WriteOptions

__all__ = ["FolderLayout", "Format", "PickleWriter", "RankWrite", "WriteOptions", "check_writable", "structure"]
