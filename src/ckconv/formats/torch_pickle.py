"""Built-in format plugin: torch.save checkpoints (zip format, legacy pre-1.6 format, plain pickles).

Reading is :mod:`ckconv.formats.torch_file` and writing :mod:`ckconv.formats.torch_archive`, the format toolkit
modules the sharded torch format reads and writes its shards with.
"""

from __future__ import annotations

from pathlib import Path

from ..hookspecs import hookimpl
from ..model import Checkpoint
from . import torch_file
from .base import Format, WriteOptions, user_metadata
from .torch_archive import write_zip


class TorchFormat(Format):
    name = "torch"
    description = "torch.save checkpoints: zip (torch >= 1.6) and legacy pickles (.pth .pt .bin .ckpt)"
    extensions = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")
    writes_pickles = True
    carries_metadata = True  # in the archive's metadata record (formats.torch_archive.METADATA_RECORD)

    def sniff(self, path: Path, head: bytes) -> bool:
        return torch_file.sniff(path, head)

    def read(self, path: Path) -> Checkpoint:
        return torch_file.read(path)

    def read_dangerous(self, path: Path) -> Checkpoint:
        return torch_file.read(path, allow_dangerous=True)

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        write_zip(checkpoint.root, path, options, user_metadata(checkpoint.metadata))


@hookimpl
def ckconv_register_formats(register):
    register(TorchFormat())
