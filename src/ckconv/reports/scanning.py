"""``ckconv scan``: the CI gate. Every check a conversion runs, on files and folders, without writing anything.

For each checkpoint found (a file, or a sharded / DCP folder as one unit) it reads the structure exactly as
``convert`` would (opcode pre-scan, bounds, limits, sharded and DCP consistency), classifies every global it names
(:mod:`ckconv.pickling.policy`), checks the memory budget of tensor views, and streams every tensor byte once so that each
zip record's CRC is verified. Nothing is called, nothing is written.

A folder that is not itself a checkpoint is walked recursively (a huggingface_hub cache included: its
``snapshots/`` symlinks point into ``blobs/``, and each real file is scanned once). Files that are not checkpoints
(``config.json``, a README) are skipped, unless their name says they should be one (``.pth``, ``.safetensors``...):
those are reported broken. Special files (FIFOs, devices, sockets) are never opened.
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..pickling import policy
from .. import tree
from ..errors import CkconvError, NotACheckpoint, UnsafeCheckpoint
from ..io import detect_format, read, source_files
from ..pickling.verdicts import Verdict, unknown_globals, worst
from ..storage.atomic import identities
from ..storage.fastcopy import SourceFiles
from .inspection import verdicts

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".distcp", ".npz")
BROKEN, SKIPPED = Verdict.BROKEN, Verdict.SKIPPED
MAX_ENTRIES = 1_000_000  # directory entries visited in one scan


@dataclass
class ScanResult:
    path: str
    verdict: Verdict
    format: str = ""
    tensors: int = 0
    bytes: int = 0
    globals: dict = field(default_factory=dict)  # {verdict: [dotted names]}
    message: str = ""

    def to_dict(self):
        return asdict(self)


def scan_paths(paths, allow_globals=(), select=None) -> list:
    """[ScanResult] for every checkpoint under ``paths`` (files or folders), in a stable order. ``select``, when
    given (:class:`ckconv.reports.scan_report.Selection`), says which folders are entered (``enter(path)``) and
    which files and folder checkpoints are scanned (``scan(path, members)``); the ``paths`` folders are always
    entered."""
    allow = policy.check_patterns(allow_globals)
    results: list = []
    seen: set = set()
    for p in paths:
        _scan_path(Path(p), allow, results, seen, top=True, select=select)
    return results


def exit_code(results) -> int:
    """0 when every checkpoint is safe (skipped files do not count), 1 otherwise."""
    return 0 if all(r.verdict <= Verdict.SAFE for r in results) else 1


def _scan_path(path: Path, allow, results, seen, top=False, select=None):
    try:
        st = os.stat(path)  # follows symlinks: what the user (or a snapshot link) points at
    except OSError as exc:
        results.append(ScanResult(str(path), BROKEN, message=f"{path}: cannot read it ({exc.strerror})"))
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        verdict = BROKEN if top else SKIPPED
        results.append(ScanResult(str(path), verdict, message=f"{path}: not a regular file or folder; not read"))
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return  # the same bytes reached twice (a snapshot symlink and its blob): scanned once
    if select is not None and stat.S_ISREG(st.st_mode) and not select.scan(path, ()):
        if path.is_symlink():
            seen.add(key)  # an excluded link excludes what it points at (a hub snapshot file and its blob)
        return
    if select is not None and not top and stat.S_ISDIR(st.st_mode) and not select.enter(path):
        return
    seen.add(key)
    try:
        fmt = detect_format(path)
    except NotACheckpoint as exc:
        fmt = None
        if stat.S_ISREG(st.st_mode):
            claims = path.name.lower().endswith(CHECKPOINT_SUFFIXES) or top
            results.append(ScanResult(str(path), BROKEN if claims else SKIPPED, message=str(exc)))
            return
    except CkconvError as exc:
        results.append(ScanResult(str(path), BROKEN, message=str(exc)))
        return
    if fmt is not None and stat.S_ISDIR(st.st_mode) and select is not None and not select.scan(path, _names(path)):
        fmt = None  # a folder checkpoint (sharded, DCP) whose files the patterns leave out: walked like a folder
    if fmt is not None:
        result, used = scan_one(path, allow, fmt, used_files=True)
        used.discard(key)
        if not (used and used <= seen):  # else: every file it reads was scanned already (snapshot links)
            results.append(result)
        seen.update(used)
        if stat.S_ISREG(st.st_mode):
            return
    # a folder: everything in it not read as part of a checkpoint above (a model folder's optimizer.bin beside
    # its model.safetensors, an accelerate output, subfolders) is scanned on its own
    try:
        children = sorted(os.scandir(path), key=lambda e: e.name)
        if {"blobs", "snapshots"} <= {e.name for e in children}:  # a huggingface_hub repo cache: files by their
            children.sort(key=lambda e: e.name == "blobs")  # snapshot names first, unreferenced blobs after
    except OSError as exc:
        results.append(ScanResult(str(path), BROKEN, message=f"{path}: cannot list it ({exc.strerror})"))
        return
    if len(seen) + len(children) > MAX_ENTRIES:
        results.append(ScanResult(str(path), BROKEN, message=f"{path}: more than {MAX_ENTRIES} entries; "
                                                              "scan its subfolders one by one"))
        return
    for entry in children:
        _scan_path(Path(entry.path), allow, results, seen, select=select)


def _names(folder: Path) -> list:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except OSError:
        return []


def _member_keys(folder: Path) -> set:
    """(device, inode) of the regular files directly in a folder (links followed)."""
    keys = set()
    try:
        for entry in os.scandir(folder):
            try:
                st = os.stat(entry.path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                keys.add((st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def _files_read(path: Path, ckpt) -> set:
    """(device, inode) of the files a checkpoint was read from: its own path (or index), every storage's file."""
    names = source_files(ckpt) | ({path} if path.is_file() else set())
    if path.is_dir():  # the index files of a folder layout were read too
        names.update(entry.path for entry in os.scandir(path)
                     if entry.name.endswith(".index.json") or entry.name == ".metadata")
    return set(identities(names))


def scan_one(path: Path, allow=(), fmt=None, used_files=False):
    """Read ``path`` as convert would, verify every byte's integrity, and judge its globals -> ScanResult
    (with ``used_files``: and the (device, inode) set of the files it read)."""
    result, used = _scan_one(path, allow, fmt)
    return (result, used) if used_files else result


def _scan_one(path: Path, allow, fmt):
    failed = _member_keys(path) if path.is_dir() else set()  # a folder that fails is one finding, not many
    try:
        ckpt = read(path, fmt)
    except UnsafeCheckpoint as exc:
        found = {Verdict.SAFE: [], Verdict.UNKNOWN: [], Verdict.DANGEROUS: list(exc.globals)}
        return ScanResult(str(path), Verdict.DANGEROUS, fmt or "", globals=found, message=str(exc)), failed
    except CkconvError as exc:
        return ScanResult(str(path), BROKEN, fmt or "", message=str(exc)), failed
    used = _files_read(path, ckpt)
    try:
        count, nbytes = _verify(ckpt.root)
    except CkconvError as exc:
        return ScanResult(str(path), BROKEN, ckpt.format, message=str(exc)), used
    found = verdicts(ckpt, allow)
    verdict = worst(v for v in found if found[v])
    message = ""
    if verdict == Verdict.UNKNOWN:
        message = unknown_globals(found[Verdict.UNKNOWN]) + " (--allow-global if you trust them)"
    elif verdict == Verdict.DANGEROUS:
        message = "would call " + ", ".join(found[Verdict.DANGEROUS][:8]) + " under torch.load(weights_only=False)"
    elif verdict == Verdict.CODE:
        message = (f"{ckpt.format} archive: holds code its loader compiles and runs ("
                   + ", ".join(found[Verdict.CODE][:3]) + f"); ckconv reads its {count} tensors without it")
    return ScanResult(str(path), verdict, ckpt.format, count, nbytes, found, message), used


def _verify(root):
    """Stream every distinct storage once (CRCs are checked as the bytes pass); -> (tensors, bytes)."""
    tree._check_view_budget(root)
    refs = tree.tensors(root)
    storages: dict = {}
    for _, ref in refs:
        storages.setdefault(id(ref.storage), ref.storage)
    total = 0
    with SourceFiles() as files:  # small storages through one read-ahead window, CRC checked (Storage.read_small)
        for st in storages.values():
            if st.nbytes <= 0:
                continue
            small = st.read_small(files)
            if small is not None:
                total += len(small)
                continue
            for block in st.chunks():
                total += memoryview(block).nbytes
    return len(refs), total
