"""Opening the files a checkpoint is made of, with bounded work: regular files only, never outside the folder.

* A FIFO blocks ``open`` forever, ``/dev/zero`` behind a symlink reads endlessly and reports size 0, a socket
  cannot be read at all: :func:`regular_file` refuses every non-regular file (``os.stat`` never opens it).
* A file that a checkpoint folder names (a shard, a ``.metadata``, a ``.distcp``) must really lie inside that
  folder: a symlink to ``~/.ssh/id_rsa`` would be read into the output. :func:`inside_folder` resolves links and
  refuses any that leave, except into a huggingface_hub cache's ``blobs/``, where every snapshot file links.
* :func:`read_capped` reads a small file (a JSON index) with its size capped before and while reading, and
  :func:`parse_json` parses JSON (an index, a safetensors header) refusing duplicate names and object floods.
"""

from __future__ import annotations

import json
import os
import re
import stat

from ..errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path, what=None) -> int:
    """``path``'s size; refused unless it is (or links to) a regular file. ``what`` names it in messages."""
    what = what or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotACheckpoint(f"{what}: no such file" + (" (a dangling link)" if os.path.islink(path) else "")) from None
    except OSError as exc:
        raise NotACheckpoint(f"{what}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise NotACheckpoint(f"{what}: is {kind}, not a regular file; ckconv reads checkpoints only from regular "
                             "files (copy it into one first)")
    return st.st_size


def inside_folder(folder, path, what=None) -> None:
    """Refuse ``path`` (a name inside ``folder``) when it resolves outside ``folder``'s real location.

    The one exception is huggingface_hub's cache layout, ``<repo>/snapshots/<revision>/<file> ->
    ../../blobs/<hash>``: inside a snapshot, links into the same repo's ``blobs/`` folder are what the hub writes.
    """
    what = what or str(path)
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([real_folder, real]) == real_folder:
        return
    blobs = _hub_blobs(real_folder)
    if blobs is not None and os.path.dirname(real) == blobs:
        return
    raise CorruptCheckpoint(f"{what} links outside the checkpoint folder (to {real!r:.120}); refusing to read it")


def _hub_blobs(real_folder):
    """``<repo>/blobs`` when ``real_folder`` is ``<repo>/snapshots/<revision>[/...]`` of a huggingface_hub cache."""
    parts = real_folder.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            repo = os.sep.join(parts[:i]) or os.sep
            blobs = os.path.join(repo, "blobs")
            return blobs if os.path.isdir(blobs) else None
    return None


def read_capped(path, limit, what=None) -> bytes:
    """The bytes of a small regular file, refused past ``limit`` bytes."""
    what = what or str(path)
    size = regular_file(path, what)
    if size > limit:
        raise LimitExceeded(f"{what}: {size} bytes, over the limit of {limit}; implausibly large for what it is")
    return read_sized(path, size, what)


def read_sized(path, size, what=None) -> bytes:
    """Exactly the ``size`` bytes ``os.stat`` reported: a file that holds more (one still growing, a /proc file
    that says 0) is refused instead of read on and on."""
    with open(path, "rb") as f:
        data = f.read(size)
        if len(data) != size or f.read(1):
            raise CorruptCheckpoint(f"{what or path}: changed while being read (its size is not what it says)")
    return data


def is_text(strings) -> bool:
    """False when one of ``strings`` holds a lone surrogate, which no UTF-8 can hold (see :func:`parse_json`)."""
    try:
        "".join(strings).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def no_duplicates(pairs):
    seen = dict(pairs)
    if len(seen) != len(pairs):  # a key repeats: find the first, to name it
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise CorruptCheckpoint(f"duplicate name {k!r:.80} in JSON header")
            seen[k] = v
    return seen


def parse_json(raw: bytes, max_objects: int, too_many: Exception, what: str, compact=None, parse_int=None):
    """``raw`` as JSON, refusing duplicate keys and more than ``max_objects`` objects (``too_many`` is raised)
    while parsing, so a hostile header or index never builds millions of dicts. ``what`` opens each message.
    ``compact(pairs)``: a smaller value to keep for an object instead of its dict, or None to keep the dict.
    ``parse_int``: as for ``json.loads`` (a ValueError it raises refuses the text as not valid JSON)."""
    objects = 0

    def hook(pairs):
        nonlocal objects
        objects += 1
        if objects > max_objects:
            raise too_many
        if compact is not None:
            small = compact(pairs)
            if small is not None:
                return small
        return no_duplicates(pairs)

    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=hook, parse_int=parse_int)
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{what} has a {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{what} is not valid JSON ({str(exc)[:120]})") from None
    # Python's json makes a lone surrogate of a \\ud800-\\udfff escape that is not half of a pair, where serde_json
    # (the safetensors library) refuses the text, and every writer of UTF-8 (ckconv's included) fails on it later
    if _SURROGATE_ESCAPE.search(text) and not _encodable(value):
        raise CorruptCheckpoint(f"{what} holds a \\ud800-\\udfff escape that is not half of a surrogate pair (not "
                                "text, which serde_json and the safetensors library refuse too); the file was altered")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
