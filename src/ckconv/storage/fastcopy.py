"""Moving tensor bytes from one file to another without passing them through Python objects.

Every copy names explicit offsets on both sides, so the file positions of the descriptors are never relied on.

* No checksum wanted (a safetensors or legacy source going to safetensors): the kernel copies the range
  (``os.copy_file_range``, else ``os.sendfile``, else a bounded buffer).
* A CRC-32 wanted (to verify a zip record of the source, or to write a zip record): one pass through a reused
  1 MiB buffer: read, CRC-32 while the bytes are in the CPU cache, write. It moves the bytes through memory once
  less than a kernel copy beside a second reading for the CRC, and needs no second core. The CRC-32 is ISA-L's
  (``isal``) or zlib-ng's when installed, zlib's otherwise.

Measured on the 2-core benchmark machine: see bench/README.md and bench/RESULTS.md ("where the time goes").
"""

from __future__ import annotations

import errno
import os
import zlib

BLOCK = 32 << 20  # bytes per kernel copy call (one progress tick)
BUF = 1 << 20  # bytes per read when the data must pass through user space (fits in L2, so crc32 + write stay hot)
# ckconv fsyncs every output before renaming it into place. Asking the kernel to start writing each copied block
# to disk right away overlaps that disk write with the rest of the copy instead of leaving it all to the final
# fsync. Set CKCONV_EARLY_WRITEBACK=0 to leave writeback to the kernel's own schedule.
EARLY_WRITEBACK = os.environ.get("CKCONV_EARLY_WRITEBACK", "1") != "0" and hasattr(os, "posix_fadvise")

_KERNEL_COPY_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM,
                       getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_kernel_copy = {"copy_file_range": hasattr(os, "copy_file_range"), "sendfile": hasattr(os, "sendfile")}


class Truncated(Exception):
    """The source ended before the range did (the caller words the error)."""


def _no_progress(n):
    pass


def _crc32(data, value=0):
    """CRC-32 (zlib's polynomial): ISA-L's (``isal``) or zlib-ng's (``zlib-ng``) when installed, else zlib's."""
    global _crc32
    _crc32 = _pick_crc32()[1]
    return _crc32(data, value)


def _pick_crc32():
    """-> (name, function): the fastest CRC-32 installed. Both optional packages are about 4x zlib's speed here
    (bench/README.md); ``pip install 'ckconv[fast]'`` installs isal. ``CKCONV_CRC32=zlib`` forces zlib."""
    wanted = os.environ.get("CKCONV_CRC32", "")
    candidates = [("isal", "isal.isal_zlib"), ("zlib-ng", "zlib_ng.zlib_ng")]
    for name, module in candidates if wanted in ("", "isal", "zlib-ng") else ():
        if wanted and wanted != name:
            continue
        try:
            fast = __import__(module, fromlist=["crc32"]).crc32
            if fast(b"123456789") == 0xCBF43926:  # the CRC-32 check value: never trust a stranger's polynomial
                return name, fast
        except (ImportError, AttributeError):
            continue
    return "zlib", zlib.crc32


def crc32_backend() -> str:
    """Which CRC-32 implementation copies use (``isal``, ``zlib-ng`` or ``zlib``)."""
    return _pick_crc32()[0]


def start_writeback(fd, offset, length):
    """Start (not wait for) writing a just-written range to disk.

    On Linux POSIX_FADV_DONTNEED starts writeback of the range's dirty pages and then drops only the pages that
    are already clean, so the data stays cached while it is written.
    """
    if EARLY_WRITEBACK and length:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def kernel_copy(src_fd, src_off, dst_fd, dst_off, length, progress=None):
    """Copy ``length`` bytes at ``src_off`` to ``dst_off``, in the kernel when it can."""
    progress = progress or _no_progress
    end = src_off + length
    while src_off < end:
        n = min(BLOCK, end - src_off)
        done = _kernel_block(src_fd, src_off, dst_fd, dst_off, n)
        start_writeback(dst_fd, dst_off, done)
        src_off += done
        dst_off += done
        progress(done)


def _kernel_block(src_fd, src_off, dst_fd, dst_off, n):
    """Copy up to ``n`` bytes; returns how many (at least 1) or raises Truncated."""
    if _kernel_copy["copy_file_range"]:
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, src_off, dst_off)
        except OSError as exc:
            if exc.errno not in _KERNEL_COPY_ERRNOS:
                raise
            _kernel_copy["copy_file_range"] = False
        else:
            if done == 0:
                raise Truncated
            return done
    if _kernel_copy["sendfile"]:
        try:
            os.lseek(dst_fd, dst_off, os.SEEK_SET)
            done = os.sendfile(dst_fd, src_fd, src_off, n)
        except OSError as exc:
            if exc.errno not in _KERNEL_COPY_ERRNOS:
                raise
            _kernel_copy["sendfile"] = False
        else:
            if done == 0:
                raise Truncated
            return done
    buf = bytearray(min(n, BUF))
    done = os.preadv(src_fd, [buf], src_off)
    if done == 0:
        raise Truncated
    _pwrite_all(dst_fd, memoryview(buf)[:done], dst_off)
    return done


def _pwrite_all(fd, view, offset):
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def copy_with_crc(src_fd, src_off, dst_fd, dst_off, length, crc=0, progress=None):
    """Copy ``length`` bytes and return their CRC-32 (seeded with ``crc``), in one pass: each MiB is read into a
    reused buffer, checksummed while it is still in the CPU cache and written from there; the destination's
    writeback is started every :data:`BLOCK` bytes (:func:`start_writeback`)."""
    progress = progress or _no_progress
    buf = bytearray(min(BUF, max(length, 1)))
    view = memoryview(buf)
    end = src_off + length
    pending = dst_off  # where the written range whose writeback is not started yet begins
    while src_off < end:
        n = os.preadv(src_fd, [view[:min(len(buf), end - src_off)]], src_off)
        if n == 0:
            raise Truncated
        block = view[:n]
        crc = _crc32(block, crc)
        _pwrite_all(dst_fd, block, dst_off)
        src_off += n
        dst_off += n
        progress(n)
        if dst_off - pending >= BLOCK:
            start_writeback(dst_fd, pending, dst_off - pending)
            pending = dst_off
    if length > BUF:
        start_writeback(dst_fd, pending, dst_off - pending)
    return crc


def _pread_all(fd, length, offset) -> bytes:
    """Up to ``length`` bytes at ``offset``: fewer only where the file ends."""
    parts, got = [], 0
    while got < length:
        block = os.pread(fd, length - got, offset + got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_at(fd, data, offset, crc=None):
    """Write a bytes-like block at ``offset``; returns the CRC-32 continued from ``crc`` (None: not computed)."""
    view = memoryview(data).cast("B")
    _pwrite_all(fd, view, offset)
    return None if crc is None else _crc32(view, crc)


READ_AHEAD = 1 << 20  # small reads are served from one window of this many bytes read ahead


class SourceFiles:
    """Read-only descriptors of source files, opened once per path while a writer runs."""

    def __init__(self):
        self.fds: dict = {}
        self.window = (None, 0, b"")  # (path, offset, bytes) last read ahead

    def read(self, path, offset, length) -> bytes:
        """``length`` bytes at ``offset`` of ``path``. A million tensors of a few bytes each, stored one after the
        other, cost a read per window of :data:`READ_AHEAD` bytes, not a system call each. Raises
        :class:`Truncated` when the file ends first."""
        wpath, wstart, wdata = self.window
        if wpath == path and wstart <= offset and offset + length <= wstart + len(wdata):
            return wdata[offset - wstart:offset - wstart + length]
        fd = self.fd(path)
        data = _pread_all(fd, max(length, READ_AHEAD) if length <= READ_AHEAD else length, offset)
        if len(data) < length:
            raise Truncated
        if length <= READ_AHEAD:
            self.window = (path, offset, data)
            return data[:length]
        return data

    def fd(self, path):
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass
        return fd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
