"""The contract between ckconv and a format plugin."""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CkconvError, LimitExceeded, NotACheckpoint, UsageError
from ..pickling import structure
from ..storage.atomic import FolderLayout

SNIFF_BYTES = 512  # what ``Format.sniff`` gets of a file: its first bytes, as many as this


# Metadata keys ckconv's writers compute for each output (the structure record, an index's total_size): never
# carried over from a source, always written fresh. Keys under "dcp." describe a DCP folder as read.
OWN_METADATA = frozenset({structure.KEY, "total_size"})
READER_PREFIX = "dcp."


def user_metadata(metadata) -> dict:
    """What a writer keeps of ``Checkpoint.metadata``: everything the source's file carried (safetensors
    ``__metadata__``, an index's ``metadata``: LoRA ``ss_*`` keys, huggingface_hub's alias records, ``format``,
    transformers' ``total_parameters``) but the keys writers compute themselves (:data:`OWN_METADATA`). Values are
    strings, or JSON numbers and booleans from an index."""
    return {k: v for k, v in (metadata or {}).items()
            if isinstance(k, str) and isinstance(v, (str, int, float)) and k not in OWN_METADATA
            and not k.startswith(READER_PREFIX)}


def hub_index_metadata(metadata) -> dict:
    """``user_metadata`` for a hub index's ``metadata``: without ``format``, which belongs to each file."""
    return {k: v for k, v in user_metadata(metadata).items() if k != "format"}


def string_metadata(metadata) -> dict:
    """``user_metadata`` for a place that holds only strings (a safetensors header): numbers as their JSON text."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in user_metadata(metadata).items()}


@dataclass
class WriteOptions:
    max_shard_size: int | None = None  # bytes; safetensors-style formats shard when set
    progress: object = None  # callable(nbytes) called as tensor bytes are written, or None
    allow_globals: tuple = ()  # user-allowed globals for pickles (``--allow-global``), see ckconv.pickling.policy


class Format:
    """Subclass this and hand an instance to ``register`` in ``ckconv_register_formats``; the host refuses
    anything else. Every capability is declared here, with the default a format gets by not overriding it:

    * ``name`` -- unique short name used by ``--to``;
    * ``description`` -- one line for listings;
    * ``extensions`` -- suffixes that pick this format for an output path (reading always sniffs bytes);
    * ``shardable`` -- True when ``write`` honours ``options.max_shard_size``; ckconv refuses ``--max-shard-size``
      for any other format, unless a format declares ``shards_for`` to write it sharded;
    * ``shards_for`` -- the name of a format this one writes sharded (``torch-sharded`` for ``torch``:
      ``--to torch --max-shard-size`` writes this format), or None;
    * ``carries_metadata`` -- True when ``write`` keeps ``user_metadata(checkpoint.metadata)`` (the source's
      safetensors ``__metadata__``, an index's ``metadata``) where a reader of the format finds it again; ckconv
      warns, naming the keys, when a source's metadata goes to a format without it; default False;
    * ``writes_pickles`` -- True when ``write`` emits pickles: ckconv then checks the whole tree against its writing
      allowlist (:mod:`ckconv.pickling.policy`) before any rank writes a byte;
    * ``sniff(path, head)`` -- True when the file/folder at ``path`` is in this format; ``head`` is its first
      :data:`SNIFF_BYTES` (512) bytes, fewer for a shorter file, ``b""`` for folders. Must not trust extensions;
    * ``read(path)`` -> :class:`ckconv.model.Checkpoint`; must never execute code from the file;
    * ``write(checkpoint, path, options)`` -- write to ``path``, a temporary location ckconv renames into place
      afterwards, so a plugin never needs its own atomicity;
    * ``writes_directory(options)`` -- whether ``path`` should be a folder (an empty one, holding only plain files
      when ``write`` returns); default False;
    * ``folder_layout(options)`` -> :class:`ckconv.storage.atomic.FolderLayout`: for a folder output written into
      an existing folder, its index file names (moved in last), its shard-name template, and the files an
      earlier output left there (replaced with ``--force`` when of the layout's own names, never any other file);
      the default layout replaces only the names ``write`` writes, in name order;
    * ``plan_ranks(checkpoint, options, world)`` -> :class:`RankWrite`: how ``world`` processes of a torchrun job
      write the output together, each its share (:mod:`ckconv.torchrun`); the default has rank 0 write the whole
      output with ``write`` while the other ranks wait;
    * ``output_notes(checkpoint, options)`` -> list of :class:`ckconv.model.Note`: what ``convert`` tells the user
      about this output before it is written (a :func:`ckconv.model.warning` for what a reader of the format will
      miss); default none;
    * ``read_dangerous(path)`` -> :class:`ckconv.model.Checkpoint` or None: for ``ckconv inspect`` and ``scan``,
      re-read a file that ``read`` refused as unsafe, with the dangerous globals recorded (``dangerous``) as inert
      records instead of refused; it must execute nothing either. The default, None, says the format cannot,
      and only the refused names are reported.
    """

    name = ""
    description = ""
    extensions: tuple = ()
    shardable = False
    shards_for: str | None = None
    carries_metadata = False
    writes_pickles = False

    def sniff(self, path: Path, head: bytes) -> bool:
        raise NotImplementedError

    def read(self, path: Path):
        raise NotImplementedError

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        raise NotImplementedError

    def writes_directory(self, options: WriteOptions) -> bool:
        return False

    def folder_layout(self, options: WriteOptions) -> FolderLayout:
        return FolderLayout()

    def plan_ranks(self, checkpoint, options: WriteOptions, world: int) -> RankWrite:
        return _RankZero(self, checkpoint, options)

    def output_notes(self, checkpoint, options: WriteOptions) -> list:
        return []

    def read_dangerous(self, path: Path):
        return None


class ReadOnlyFormat(Format):
    """A format ckconv reads and never writes (an archive whose loader compiles and runs the code it holds):
    ``write`` refuses in one line, naming what the format holds (``what``)."""

    what = ""  # "TorchScript archives"

    def write(self, checkpoint, path: Path, options: WriteOptions) -> None:
        raise UsageError(f"ckconv reads {self.what} but does not write them: pick another --to")


class RankWrite:
    """One output written by the ranks of a torchrun job together, as a format's ``plan_ranks`` planned it.

    Every rank plans from the same checkpoint and options, so a plan must come out the same on every rank. On
    the staged output path (a temporary name ckconv moves into place once all is done) rank 0 runs ``setup``
    before any rank writes; then every rank runs ``write(path, rank)``; once every rank succeeded, rank 0 runs
    ``finish(path, results)`` with what each rank's ``write`` returned, in rank order. Results travel between
    processes: keep them small and picklable. An exception on any rank fails every rank with its message and
    leaves the destination as it was.
    """

    def setup(self, path: Path) -> None:
        """Rank 0, before any rank writes (e.g. create a file at its full size)."""

    def write(self, path: Path, rank: int):
        """This rank's share of the output; returns what ``finish`` needs to know about it."""
        raise NotImplementedError

    def finish(self, path: Path, results: list) -> None:
        """Rank 0, after every rank wrote (e.g. an index naming where everything went)."""

    def run_alone(self, path: Path) -> None:
        """The whole plan in this one process, as a world of one rank: ``setup``, ``write`` as rank 0, ``finish``."""
        self.setup(path)
        self.finish(path, [self.write(path, 0)])


class _RankZero(RankWrite):
    """The default plan: rank 0 writes the whole output with the format's ``write``, the other ranks wait."""

    def __init__(self, fmt, checkpoint, options):
        self.fmt, self.checkpoint, self.options = fmt, checkpoint, options

    def write(self, path, rank):
        if rank == 0:
            self.fmt.write(self.checkpoint, path, self.options)


def guarded(reader, path, **kwargs):
    """Run ``reader(path, **kwargs)``; whatever a hostile file makes Python raise becomes one clear ckconv error.

    Format plugins wrap their readers in it: a malformed file must never surface as a traceback.
    """
    try:
        return reader(path, **kwargs)
    except CkconvError:
        raise
    except RecursionError:
        raise LimitExceeded(f"{path}: structure too deep to read") from None
    except MemoryError:
        raise LimitExceeded(f"{path}: reading it needs more memory than available") from None
    except OSError as exc:
        raise NotACheckpoint(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (EOFError, struct.error, UnicodeError, zipfile.BadZipFile, ValueError, OverflowError, KeyError,
            IndexError, TypeError, AttributeError) as exc:
        raise NotACheckpoint(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
