"""All-or-nothing outputs: write beside the destination, fsync, rename, fsync the folder.

A crash, SIGKILL or full disk leaves at most a hidden ``.NAME.ckconv-tmp-*`` beside the destination, never a
partial file or folder at the destination itself.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExists, WriteFailed


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


def check_destination(dst: Path, force: bool):
    if (dst.exists() or dst.is_symlink()) and not force:
        raise OutputExists(f"{dst} already exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise WriteFailed(f"cannot write {dst}: folder {dst.parent} does not exist")


@contextmanager
def staged(dst: Path, *, directory: bool, force: bool):
    """Yield a temporary path (file or folder) that becomes ``dst`` when the block succeeds."""
    dst = Path(dst)
    check_destination(dst, force)
    stem = dst.name[:100]  # a 255-byte destination name must still leave room for the suffix
    tmp = dst.parent / f".{stem}.ckconv-tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        if dst.is_dir() and not dst.is_symlink():
            if not force:
                raise OutputExists(f"{dst} already exists; pass --force to overwrite it")
            trash = dst.parent / f".{stem}.ckconv-old-{os.getpid()}-{os.urandom(4).hex()}"
            os.rename(dst, trash)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(trash, dst)  # put the old folder back: never leave the destination missing
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            if exc.errno == errno.ENOSPC:
                raise WriteFailed(f"no space left on device while writing {dst}; free space and retry "
                                  "(nothing was written)") from None
            raise WriteFailed(f"cannot write {dst}: {exc.strerror or exc} (nothing was written)") from None
        raise
