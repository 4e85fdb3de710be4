"""All-or-nothing outputs that never cost the user a file: stage beside (or inside) the destination, fsync, rename.

Two helpers, one per kind of output:

* :func:`staged_file` -- one file. A hidden ``.NAME.ckconv-tmp-*`` beside the destination becomes it by one
  ``os.replace``; a crash, SIGKILL or full disk leaves at most that hidden file, never a partial destination.
* :func:`staged_folder` -- a multi-file output (sharded safetensors, DCP, sharded torch ``.bin``). A new folder is
  staged beside and renamed into place whole; an existing folder (a model folder holding ``config.json``, the
  source checkpoint, ...) is written *into*: only the files of the output's own layout are replaced, one rename
  each, index last, and a failure puts back whatever was moved.

Both refuse, even with ``force``, to overwrite or remove any file in ``protect`` (the source checkpoint's files,
compared by inode as ``os.path.samefile`` does, not by name). Nothing here removes a file ckconv did not write in
this run, except a file of the output's own layout that ``force`` was given to replace.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Formatter
from typing import Callable, Iterable

from ..errors import CkconvWarning, OutputExists, WriteFailed

NEVER_SOURCE = "ckconv never overwrites or removes its source, even with --force"


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path):
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
        _fsync_dir(path)
    else:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _tmp_name(stem: str) -> str:
    return f".{stem[:100]}.ckconv-tmp-{os.getpid()}-{os.urandom(4).hex()}"  # 255-byte names leave room


def _reserve(dst: Path) -> Path:
    """A new empty file beside ``dst`` with a name of :func:`_tmp_name`, made exclusively (``O_EXCL``): whatever
    happens to the staged path later, no file of anyone else's ever had its name."""
    for _ in range(8):
        tmp = dst.parent / _tmp_name(dst.name)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _os_error(dst, exc) from None
    raise WriteFailed(f"cannot write {dst}: no free temporary name beside it after 8 tries")


def identities(paths: Iterable) -> frozenset:
    """The (device, inode) of every existing path in ``paths``: what ``protect`` takes."""
    out = set()
    for p in paths:
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            continue
        out.add((st.st_dev, st.st_ino))
    return frozenset(out)


def _is_protected(path: Path, protect: frozenset) -> bool:
    if not protect:
        return False
    try:
        st = os.stat(path)  # follows symlinks: a link to the source counts as the source
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in protect


def _refuse_source(path: Path, what="choose another output path"):
    raise OutputExists(f"{path} is the source checkpoint; {NEVER_SOURCE}: {what}")


def _os_error(dst: Path, exc: OSError):
    if exc.errno == errno.ENOSPC:
        return WriteFailed(f"no space left on device while writing {dst}; free space and retry (nothing was written)")
    return WriteFailed(f"cannot write {dst}: {exc.strerror or exc} (nothing was written)")


# --- one file ------------------------------------------------------------------------------------------------

def check_destination(dst: Path, force: bool, protect: frozenset = frozenset()):
    """Refuse a single-file destination that is a folder, the source, or (without ``force``) any existing file."""
    dst = Path(dst)
    if dst.is_dir():
        raise OutputExists(f"{dst} is a folder; ckconv never replaces a folder with a file: name a file inside it")
    if _is_protected(dst, protect):
        _refuse_source(dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise OutputExists(f"{dst} already exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise WriteFailed(f"cannot write {dst}: folder {dst.parent} does not exist")


@contextmanager
def staged_file(dst, *, force: bool, protect: frozenset = frozenset()):
    """Yield a temporary path beside ``dst`` to write; it replaces ``dst`` (one ``os.replace``) when the block
    succeeds. Refused up front as :func:`check_destination` says; on any failure the temporary file is removed,
    ``dst`` is as it was, and an ``OSError`` becomes one :class:`WriteFailed` line."""
    dst = Path(dst)
    check_destination(dst, force, protect)
    tmp = _reserve(dst)
    try:
        yield tmp
        _fsync_tree(tmp)
        if _is_protected(dst, protect):  # it may have changed while we wrote
            _refuse_source(dst)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(tmp, ignore_errors=True)  # a writer that made a folder here: ours, made in this run
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise _os_error(dst, exc) from None
        raise


# --- a folder of files ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FolderLayout:
    """The files a multi-file format owns in its folder (what :func:`staged_folder` may replace there).

    * ``index`` -- names that say the folder is complete (``model.safetensors.index.json``, ``.metadata``): moved
      into place after every other file, in this order, and moved aside first when replaced.
    * ``shards`` -- a ``str.format`` template of the output's own numbered file names, each field a number
      (``model-{:05d}-of-{:05d}.safetensors``, ``__{}_{}.distcp``): with ``index`` the only names an earlier
      output's files may have to be replaced. A field with a width (``{:05d}``) matches at least that many digits.
    * ``earlier(folder)`` -- names of the files an earlier output of this layout left in ``folder`` (the shards its
      index names). An index is untrusted input: only names of this layout (``index`` or ``shards``) are replaced
      with ``force``; any other name it gives is left in place (:meth:`survey`), and :func:`staged_folder` says so
      in a :class:`~ckconv.errors.CkconvWarning`. Called on an existing folder only; whatever it raises, it names
      nothing.
    """

    index: tuple = ()
    earlier: Callable[[Path], Iterable[str]] | None = None
    shards: str = ""

    def owns(self, name) -> bool:
        """True when ``name`` is one of this layout's own file names (an index name, or a shard name)."""
        return name in self.index or (bool(self.shards) and _template_regex(self.shards).fullmatch(name) is not None)

    def survey(self, folder: Path) -> tuple:
        """-> (names of an earlier output's files in ``folder`` to replace, other names its index gives, left)."""
        named = []
        if self.earlier is not None:
            try:
                named = [n for n in dict.fromkeys(self.earlier(folder)) if _plain_name(n)]
            except Exception:  # noqa: BLE001 - an earlier output ckconv cannot read names nothing to replace
                named = []
        replace = list(self.index) + [n for n in named if self.owns(n) and n not in self.index]
        left = [n for n in named if not self.owns(n)]
        present = [n for n in replace if _plain_name(n) and os.path.lexists(folder / n)]
        return present, [n for n in left if os.path.lexists(folder / n)]

    def earlier_files(self, folder: Path) -> list:
        return self.survey(folder)[0]

    def describe(self) -> str:
        """The layout's own names for a message: ``model-NNNNN-of-NNNNN.safetensors``, ``.metadata``."""
        shown = []
        if self.shards:
            shown.append("".join(text + ("N" * _width(spec) if field is not None else "")
                                 for text, field, spec, _ in Formatter().parse(self.shards)))
        return ", ".join(shown + list(self.index))


def _width(spec) -> int:
    digits = re.match(r"0?(\d*)", spec or "").group(1)
    return int(digits) if digits else 1


@lru_cache(maxsize=32)
def _template_regex(template: str) -> re.Pattern:
    parts = []
    for text, field, spec, _ in Formatter().parse(template):
        parts.append(re.escape(text))
        if field is not None:
            parts.append(r"\d{%d,}" % _width(spec) if spec else r"\d+")
    return re.compile("".join(parts))


def left_alone_warning(folder: Path, names, layout: FolderLayout) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    them = "them" if len(names) > 1 else "it"
    return (f"left {shown} in {folder}: an earlier index there names {them}, but ckconv replaces only files of its "
            f"own output ({layout.describe()}); remove {them} by hand if no longer needed")


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name \
        and os.sep not in name


def _check_replacements(dst: Path, names, force: bool, protect: frozenset, *, skip_folders: bool):
    """-> the names in ``dst`` that will be moved aside; refuses folders, the source, and (without force) any."""
    out = []
    for n in names:
        p = dst / n
        if p.is_dir() and not p.is_symlink():
            if skip_folders:
                continue
            raise OutputExists(f"{p} is a folder; ckconv never replaces a folder with a file: write into "
                               "another folder")
        if _is_protected(p, protect):
            _refuse_source(p, "write into another folder")
        out.append(n)
    if out and not force:
        more = f" and {len(out) - 1} more files" if len(out) > 1 else ""
        raise OutputExists(f"{dst} already exists and holds {out[0]}{more} of this output's layout; pass --force "
                           "to replace them (ckconv never touches the other files in the folder)")
    return out


@contextmanager
def staged_folder(dst, *, force: bool, protect: frozenset = frozenset(), layout: FolderLayout | None = None):
    """Stage a multi-file output for ``dst``, a new or an existing folder; yield an empty temporary folder.

    Contract for the writer: write plain files (no subfolders) into the yielded folder; the names it writes are
    the output. When the block succeeds:

    * ``dst`` does not exist: the temporary folder (``.NAME.ckconv-tmp-*`` beside it) is renamed to ``dst``.
    * ``dst`` is a folder: the temporary folder is ``dst/.ckconv-tmp-*`` (same file system, so every rename is
      atomic). The files the output writes, plus ``layout.earlier_files(dst)`` (the files of an earlier output of
      the same layout), are *replaced*: the index files are moved aside first, then the rest, into
      ``dst/.ckconv-old-*``; the new files are renamed in, index last; the folder is fsynced; only then are the
      moved-aside files deleted. Every other file in ``dst`` is never touched. Without ``force`` any such file
      existing is refused -- as far as the names are known, before the block runs (``layout.index`` and the
      earlier files), and again with the exact names before anything is moved.
    * Refused even with ``force``: ``dst`` or any file to replace being in ``protect``; ``dst`` being a file;
      a folder where a file would go.

    On any failure (``OutputExists``, a full disk, Ctrl-C) everything moved is put back and the temporary folder
    (only files this run wrote) is removed: nothing is left at a new ``dst``, and an existing one is as it was. A
    SIGKILL mid-write leaves the hidden temporary folder; a SIGKILL in the few renames of the final step leaves
    the replaced files in ``dst/.ckconv-old-*``, from where the user can move them back.
    """
    dst = Path(dst)
    layout = layout or FolderLayout()
    existing = dst.is_dir()
    if existing:
        if _is_protected(dst, protect):
            _refuse_source(dst, "write into another folder")
        _check_replacements(dst, layout.earlier_files(dst), force, protect, skip_folders=True)
        tmp = dst / f".ckconv-tmp-{os.getpid()}-{os.urandom(4).hex()}"
    else:
        if os.path.lexists(dst):
            raise OutputExists(f"{dst} is a file, but this output is a folder; ckconv never replaces a file with "
                               "a folder: pass a folder name")
        if not dst.parent.is_dir():
            raise WriteFailed(f"cannot write {dst}: folder {dst.parent} does not exist")
        tmp = dst.parent / _tmp_name(dst.name)
    made = False
    try:
        tmp.mkdir()
        made = True
        yield tmp
        _fsync_tree(tmp)
        if existing:
            _commit_into(dst, tmp, layout, force, protect)
        else:
            os.rename(tmp, dst)  # fails (ENOTEMPTY, ENOTDIR) if something appeared at dst meanwhile
            _fsync_dir(dst.parent)
    except BaseException as exc:
        if made:
            shutil.rmtree(tmp, ignore_errors=True)  # only the files this run staged; backups live elsewhere
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise _os_error(dst, exc) from None
        raise


def _commit_into(dst: Path, tmp: Path, layout: FolderLayout, force: bool, protect: frozenset):
    index = [n for n in layout.index]
    written = []
    for n in sorted(os.listdir(tmp)):
        if not stat.S_ISREG(os.lstat(tmp / n).st_mode):
            raise WriteFailed(f"cannot write {dst}: the writer left {n}, which is not a plain file "
                              "(a format plugin must write plain files only)")
        written.append(n)
    order = [n for n in written if n not in index] + [n for n in index if n in written]
    earlier, left = layout.survey(dst)
    earlier = [n for n in earlier if n not in written]
    replaced = _check_replacements(dst, [n for n in written if os.path.lexists(dst / n)], force, protect,
                                   skip_folders=False)
    stale = _check_replacements(dst, earlier, force, protect, skip_folders=True)
    aside_names = sorted(replaced + stale, key=lambda n: (n not in index, index.index(n) if n in index else 0))
    backup = None
    aside, moved = [], []
    try:
        if aside_names:
            backup = dst / f".ckconv-old-{os.getpid()}-{os.urandom(4).hex()}"
            backup.mkdir()
            for n in aside_names:  # index first: the folder stops claiming to be complete before a shard changes
                os.rename(dst / n, backup / n)
                aside.append(n)
        for n in order:  # index last: a folder with an index is complete
            os.rename(tmp / n, dst / n)
            moved.append(n)
        _fsync_dir(dst)
    except BaseException:
        lost = _roll_back(dst, tmp, backup, aside, moved)
        if lost:
            raise WriteFailed(f"cannot write {dst}, and {len(lost)} replaced files could not be put back: they are "
                              f"in {backup} (move them back by hand)") from None
        raise
    left = [n for n in left if n not in written]
    if left:
        warnings.warn(left_alone_warning(dst, left, layout), CkconvWarning, stacklevel=2)
    for n in aside:  # the files --force replaced, now superseded on disk
        try:
            os.unlink(backup / n)
        except OSError:
            pass
    for folder in (backup, tmp):
        if folder is not None:
            try:
                os.rmdir(folder)
            except OSError:
                pass
    _fsync_dir(dst)


def _roll_back(dst, tmp, backup, aside, moved) -> list:
    for n in reversed(moved):
        try:
            os.rename(dst / n, tmp / n)  # ours: back into the staging folder, which the caller removes
        except OSError:
            pass
    lost = []
    for n in reversed(aside):
        try:
            if n in moved and os.path.lexists(dst / n):
                os.unlink(dst / n)  # a new file we could not move back out: ours, written in this run
            os.rename(backup / n, dst / n)
        except OSError:
            lost.append(n)
    _fsync_dir(dst)
    if backup is not None and not lost:
        try:
            os.rmdir(backup)
        except OSError:
            pass
    return lost


@contextmanager
def staged(dst, *, directory: bool, force: bool, protect: frozenset = frozenset(), layout=None):
    """:func:`staged_folder` when ``directory``, else :func:`staged_file`."""
    if directory:
        with staged_folder(dst, force=force, protect=protect, layout=layout) as tmp:
            yield tmp
    else:
        with staged_file(dst, force=force, protect=protect) as tmp:
            yield tmp
