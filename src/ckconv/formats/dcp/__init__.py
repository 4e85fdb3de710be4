"""Built-in format plugin: torch.distributed.checkpoint (DCP) folders, and conversion across ranks under torchrun.

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

Multi-rank conversion (:func:`save_distributed`): under ``torchrun`` every rank reads the source lazily and writes
only its share of the output, coordinating with ``torch.distributed`` object collectives over gloo.
"""

from __future__ import annotations

import os
from pathlib import Path

from ... import errors
from ...errors import CkconvError, WriteFailed
from ...hookspecs import hookimpl
from ...model import Checkpoint
from ...pickling import structure
from ..base import Format, WriteOptions
from .metadata import METADATA_NAME
from .read import read_dcp
from .write import earlier_output, plan_write, write_metadata, write_rank_file


class DcpFormat(Format):
    name = "dcp"
    writes_pickles = True
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
        from ...storage.atomic import FolderLayout

        return FolderLayout(index=(METADATA_NAME,), earlier=earlier_output)

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        from ...pickling.writer import check_writable

        check_writable(checkpoint.root, options.allow_globals, "the DCP checkpoint")  # before any file
        plan = plan_write(checkpoint.root, world=1)
        locations = write_rank_file(path, 0, plan.blobs_for(0), options.progress, allow=options.allow_globals)
        write_metadata(path, plan, locations)


# =============================================================================================================
# Conversion across ranks (torchrun)
# =============================================================================================================

def world_from_env():
    """(rank, world size) when this process is one of several started by torchrun, else None."""
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return None  # RANK / WORLD_SIZE without a rendezvous address: not torchrun (or not usable)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ["RANK"])
    except (KeyError, ValueError):
        return None
    if world <= 1 or not 0 <= rank < world:
        return None
    return rank, world


class Group:
    """The process group ckconv converts with: object collectives only, over gloo (CPU; no tensors move).

    When no default group exists ckconv starts one from torchrun's environment and keeps it until the process
    exits: starting a second one in the same process would rendezvous again on torchrun's store, where keys left
    by the first make that unreliable. A caller's existing group is joined (a gloo subgroup is made if it runs
    another backend, e.g. NCCL).
    """

    def __init__(self):
        import atexit

        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
            atexit.register(_destroy_group)
        self.pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def bcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def gather(self, obj):
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.pg)
        return out


def _destroy_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _failure(exc, rank):
    name = type(exc).__name__ if isinstance(exc, CkconvError) else ""
    text = str(exc) if isinstance(exc, CkconvError) else f"{type(exc).__name__}: {exc}"
    return ("error", name, f"rank {rank}: {text}" if not text.startswith("rank ") else text)


def _raise(status):
    _, name, text = status
    cls = getattr(errors, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, CkconvError)):
        cls = WriteFailed
    raise cls(text)


def run_collective(group: Group, path: Path, *, directory: bool, force: bool, work, setup=None, finish=None,
                   protect=frozenset(), layout=None):
    """Rank 0 stages the output (ckconv.storage.atomic.staged: a folder output into a new or existing folder, replacing
    only ``layout``'s files, never a ``protect``-ed source file) and tells every rank the temporary path; every
    rank runs ``work(tmp)``; when all succeeded rank 0 runs ``finish(tmp, results)`` and moves the output into
    place. A failure on any rank fails every rank with the same message, and the destination is as it was.
    """
    from ...storage.atomic import staged

    if group.rank == 0:
        try:
            with staged(path, directory=directory, force=force, protect=protect, layout=layout) as tmp:
                if setup is not None:
                    setup(tmp)
                group.bcast(("ok", str(tmp)))
                outcomes = group.gather(_attempt(work, tmp, 0))
                for o in outcomes:
                    if o[0] != "ok":
                        _raise(o)
                if finish is not None:
                    finish(tmp, [o[1] for o in outcomes])
        except BaseException as exc:
            # Rank 0 broadcasts exactly once more: the first broadcast if it failed before announcing the
            # temporary path, else the final one; the other ranks are waiting for exactly that message.
            group.bcast(_failure(exc, 0))
            raise
        group.bcast(("ok", None))
        return
    status = group.bcast(None)
    if status[0] != "ok":
        _raise(status)
    group.gather(_attempt(work, Path(status[1]), group.rank))
    final = group.bcast(None)
    if final[0] != "ok":
        _raise(final)


def _attempt(work, tmp, rank):
    try:
        return ("ok", work(Path(tmp)))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails every rank with it
        return _failure(exc, rank)


def save_distributed(obj, path, *, format=None, max_shard_size=None, force=False, progress=None,
                     allow_globals=()) -> str:
    """``ckconv.save`` run by every rank of a torchrun job, each writing its share; returns the format name.

    * ``dcp``: each rank writes ``__<rank>_0.distcp`` holding its share of the items (non-tensors round-robin,
      tensors balanced by size) and rank 0 writes ``.metadata`` after gathering where everything went -- the
      layout of ``torch.distributed.checkpoint.save`` across ranks.
    * ``safetensors``: one file is laid out by every rank identically (same header); rank 0 creates it at full
      size, then each rank writes the bytes of a contiguous run of tensors at their offsets. Sharded output
      (``max_shard_size``): shard i is written by rank i mod world size, rank 0 writes the index last.
    * other formats: rank 0 writes the output alone (the other ranks wait).

    Every rank reads the source lazily, so each reads only the tensor bytes it writes. The output is
    byte-identical to the single-process result for safetensors, and holds the same content for torch (whose
    files carry a random serialization id) and dcp (one file per rank).
    """
    from ...io import as_checkpoint, output_target, parse_size

    ckpt = as_checkpoint(obj)
    shard = parse_size(max_shard_size)
    target = output_target(ckpt, path, format=format, max_shard_size=shard)  # same answer on every rank
    path, fmt, name = target.path, target.format, target.format.name
    stage = {"protect": target.protect, "layout": target.layout}
    options = WriteOptions(max_shard_size=shard, progress=progress, allow_globals=tuple(allow_globals))
    if getattr(fmt, "writes_pickles", False):  # every rank refuses the same globals before writing
        from ...pickling.writer import check_writable

        check_writable(ckpt.root, options.allow_globals, f"the {fmt.name} checkpoint")
    group = Group()
    if name == "dcp":
        plan = plan_write(ckpt.root, group.world)

        def finish(tmp, results):
            write_metadata(tmp, plan, {k: v for r in results for k, v in r.items()})

        run_collective(group, path, directory=True, force=force, finish=finish, **stage,
                       work=lambda tmp: write_rank_file(tmp, group.rank, plan.blobs_for(group.rank), progress,
                                                        allow=options.allow_globals))
    elif name == "safetensors":
        _safetensors_distributed(ckpt, path, options, force, group, stage)
    else:
        run_collective(group, path, directory=fmt.writes_directory(options), force=force, **stage,
                       work=lambda tmp: fmt.write(ckpt, tmp, options) if group.rank == 0 else None)
    return name


def _safetensors_distributed(ckpt, path, options, force, group, stage):
    # The same plan as SafetensorsFormat.write (tests check the outputs are byte-identical).
    from ...contents.layout import optimizer_namer
    from ...storage.fastcopy import SourceFiles
    from ..safetensors_format import INDEX_NAME, RAW_DTYPES, SINGLE_NAME, _metadata, _write_json, header_bytes, plan_shards, write_file

    root = ckpt.root
    encoded, named, needs_structure = structure.encode(root, raw_dtypes=RAW_DTYPES, namer=optimizer_namer(root))
    text = structure.dumps(encoded) if needs_structure else None
    rank, world = group.rank, group.world
    if options.max_shard_size is None:
        header = header_bytes(named, _metadata(text))
        starts, pos = [], len(header)
        for _, ref in named:
            starts.append(pos)
            pos += ref.nbytes
        total = pos
        data = total - len(header)

        def setup(tmp):
            with open(tmp, "wb") as f:
                f.write(header)
                f.truncate(total)

        def work(tmp):  # a contiguous run of tensors, about total/world bytes per rank
            mine = [i for i, s in enumerate(starts)
                    if min(world - 1, (s - len(header)) * world // max(data, 1)) == rank]
            with open(tmp, "r+b", buffering=0) as f, SourceFiles() as files:
                for i in mine:
                    named[i][1].copy_to(f.fileno(), starts[i], progress=options.progress, files=files)
                os.fsync(f.fileno())

        run_collective(group, path, directory=False, force=force, setup=setup, work=work, **stage)
        return
    shards = plan_shards(named, options.max_shard_size)
    if len(shards) == 1:
        run_collective(group, path, directory=True, force=force, **stage, work=lambda tmp: write_file(
            tmp / SINGLE_NAME, named, _metadata(text), options.progress) if rank == 0 else None)
        return
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    def work_shards(tmp):
        for i, shard in enumerate(shards):
            if i % world == rank:
                write_file(tmp / names[i], shard, {"format": "pt"}, options.progress)
                with open(tmp / names[i], "rb+") as f:
                    os.fsync(f.fileno())

    def finish_index(tmp, _results):
        weight_map = {n: names[i] for i, shard in enumerate(shards) for n, _ in shard}
        index = {"metadata": {"total_size": sum(ref.nbytes for _, ref in named)}, "weight_map": weight_map}
        if text is not None:
            index["metadata"][structure.KEY] = text
        _write_json(tmp / INDEX_NAME, index)

    run_collective(group, path, directory=True, force=force, work=work_shards, finish=finish_index, **stage)


@hookimpl
def ckconv_register_formats(register):
    register(DcpFormat())
