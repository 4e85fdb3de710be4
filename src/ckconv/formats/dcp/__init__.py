"""Built-in format plugin: torch.distributed.checkpoint (DCP) folders.

A DCP checkpoint is a folder: ``.metadata`` (a pickle of ``torch.distributed.checkpoint.metadata.Metadata``) and
``__<rank>_<n>.distcp`` files. The state is flattened: every leaf has a dotted name (``model.fc.weight``,
``optim.param_groups.0.lr``); ``planner_data`` maps each name back to its path of keys and list indices. A tensor
is one or more chunks (a box of the full tensor, one per rank that held a shard); each chunk, and each non-tensor
leaf, is a ``torch.save`` archive stored at a byte range of a ``.distcp`` file (``storage_data``).

Reading never runs code and never loads tensor data: ``.metadata`` goes through ckconv's restricted unpickler,
where the DCP classes become inert records (:mod:`.metadata` interprets and checks them). Tensors are
:class:`~ckconv.model.TensorRef` over a :class:`.chunked.DcpTensorStorage` that streams the chunk archives' bytes
when a writer asks (:mod:`.chunked`); :mod:`.read` nests the leaves again.

Writing (:mod:`.write`) produces what ``torch.distributed.checkpoint.save`` with the default ``FileSystemWriter``
produces (``__<rank>_0.distcp`` per rank, one torch.save archive per leaf, ``.metadata``), streaming tensor bytes
file to file. DCP itself loses some structure (mapping keys become strings, OrderedDicts plain dicts, empty
containers vanish); ckconv keeps an exact description of the containers in an extra ``ckconv_structure``
attribute of the Metadata object, which torch ignores and ckconv uses to give back exactly what was written.

Under ``torchrun`` (:mod:`ckconv.torchrun`) every rank writes its own ``.distcp`` file and rank 0 the
``.metadata``, through :meth:`DcpFormat.plan_ranks`.
"""

from __future__ import annotations

from pathlib import Path

from ...hookspecs import hookimpl
from ...model import Checkpoint, warning
from ...pickling.writer import check_writable
from ...storage.atomic import FolderLayout
from ..base import Format, RankWrite, WriteOptions, user_metadata
from .metadata import METADATA_NAME
from .optimizers import unnamed_optimizers
from .read import read_dcp
from .write import earlier_output, plan_write, write_metadata, write_rank_file


class DcpFormat(Format):
    name = "dcp"
    writes_pickles = True
    carries_metadata = True  # an extra attribute of .metadata (formats.dcp.metadata.METADATA_ATTR)
    description = "torch.distributed.checkpoint folders (.metadata + __N_M.distcp shards)"
    extensions = ()

    def sniff(self, path: Path, head: bytes) -> bool:
        if not path.is_dir():
            return False
        meta = path / METADATA_NAME
        if not meta.is_file():
            return False
        with open(meta, "rb") as f:
            first = f.read(2)
        return len(first) == 2 and first[0] == 0x80

    def read(self, path: Path) -> Checkpoint:
        return read_dcp(path)

    def writes_directory(self, options: WriteOptions) -> bool:
        return True

    def folder_layout(self, options: WriteOptions):
        return FolderLayout(index=(METADATA_NAME,), earlier=earlier_output, shards="__{}_{}.distcp")

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        check_writable(checkpoint.root, options.allow_globals, "the DCP checkpoint")  # before any file
        plan = plan_write(checkpoint.root, world=1)
        locations = write_rank_file(path, 0, plan.blobs_for(0), options.progress, allow=options.allow_globals)
        write_metadata(path, plan, locations, user_metadata(checkpoint.metadata))

    def output_notes(self, checkpoint, options: WriteOptions) -> list:
        return [warning(f"the optimizer at {where} is written with numbered slots, which FSDP2 and torch's "
                        f"get_state_dict cannot resume from (they key optimizer state by parameter name): {problem}; "
                        "an optimizer built from model.named_parameters() (torch >= 2.6) names its slots")
                for where, problem in unnamed_optimizers(checkpoint.root)]

    def plan_ranks(self, checkpoint, options: WriteOptions, world: int) -> RankWrite:
        return _RankFiles(plan_write(checkpoint.root, world), options, user_metadata(checkpoint.metadata))


class _RankFiles(RankWrite):
    """DCP across ranks, as ``torch.distributed.checkpoint.save`` lays it out: rank r writes ``__r_0.distcp``
    with its share of the items (non-tensors round-robin, tensors balanced by size); rank 0 writes ``.metadata``
    once it knows where every rank put its items."""

    def __init__(self, plan, options: WriteOptions, metadata=None):
        self.plan, self.options, self.metadata = plan, options, metadata

    def write(self, path, rank) -> dict:
        return write_rank_file(path, rank, self.plan.blobs_for(rank), self.options.progress,
                               allow=self.options.allow_globals)

    def finish(self, path, results):
        write_metadata(path, self.plan, {k: v for r in results for k, v in r.items()}, self.metadata)


@hookimpl
def ckconv_register_formats(register):
    register(DcpFormat())
