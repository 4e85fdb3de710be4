"""Conversion across ranks under ``torchrun``: every rank reads the source lazily and writes only its share.

The processes coordinate with ``torch.distributed`` object collectives over gloo (small messages only, never
tensor data). What each rank writes is the output format's business: a format that can be written by several
processes at once says how through ``plan_ranks`` (the Format contract, :class:`ckconv.formats.base.RankWrite`);
any other format is written by rank 0 alone while the other ranks wait. The staging, the all-or-nothing outcome and
the one error every rank reports are this module's.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import errors
from .errors import CkconvError, WriteFailed
from .formats.base import RankWrite
from .io import OutputTarget, as_checkpoint, output_target
from .pickling.writer import check_writable
from .storage.atomic import staged


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


def run_collective(group: Group, path: Path, plan: RankWrite, *, directory: bool, force: bool,
                   protect=frozenset(), layout=None):
    """Rank 0 stages the output (ckconv.storage.atomic.staged: a folder output into a new or existing folder,
    replacing only ``layout``'s files, never a ``protect``-ed source file), runs ``plan.setup`` there and tells
    every rank the temporary path; every rank runs ``plan.write(tmp, rank)``; when all succeeded rank 0 runs
    ``plan.finish(tmp, results)`` and moves the output into place. A failure on any rank fails every rank with the
    same message, and the destination is as it was.
    """
    if group.rank == 0:
        try:
            with staged(path, directory=directory, force=force, protect=protect, layout=layout) as tmp:
                plan.setup(tmp)
                group.bcast(("ok", str(tmp)))
                outcomes = group.gather(_attempt(plan, tmp, 0))
                for o in outcomes:
                    if o[0] != "ok":
                        _raise(o)
                plan.finish(tmp, [o[1] for o in outcomes])
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
    group.gather(_attempt(plan, Path(status[1]), group.rank))
    final = group.bcast(None)
    if final[0] != "ok":
        _raise(final)


def _attempt(plan, tmp, rank):
    try:
        return ("ok", plan.write(Path(tmp), rank))
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails every rank with it
        return _failure(exc, rank)


def save_distributed(obj, path, *, format=None, max_shard_size=None, force=False, progress=None,
                     allow_globals=()) -> str:
    """``ckconv.save`` run by every rank of a torchrun job, each writing its share; returns the format name.

    The output format's ``plan_ranks(checkpoint, options, world)`` says who writes what (dcp: one
    ``__<rank>_0.distcp`` per rank and ``.metadata`` by rank 0; safetensors: one file laid out identically by
    every rank, or shard i by rank i mod world size); a format without it is written by rank 0 alone.

    Every rank reads the source lazily, so each reads only the tensor bytes it writes. The output is
    byte-identical to the single-process result for safetensors, and holds the same content for torch (whose
    files carry a random serialization id) and dcp (one file per rank).
    """
    ckpt = as_checkpoint(obj)
    target = output_target(ckpt, path, format=format, max_shard_size=max_shard_size, progress=progress,
                           allow_globals=allow_globals)  # the same answer on every rank
    return write_distributed(ckpt, target, force=force)


def write_distributed(ckpt, target: OutputTarget, *, force=False) -> str:
    """:func:`ckconv.io.write` for every rank of a torchrun job: ``ckpt`` written where ``target`` planned it."""
    fmt, options = target.format, target.options
    if fmt.writes_pickles:  # every rank refuses the same globals before writing
        check_writable(ckpt.root, options.allow_globals, f"the {fmt.name} checkpoint")
    group = Group()
    plan = fmt.plan_ranks(ckpt, options, group.world)  # the Format default: rank 0 writes it all with write
    run_collective(group, target.path, plan, directory=target.folder, force=force, protect=target.protect,
                   layout=target.layout)
    return fmt.name
