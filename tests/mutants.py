"""Structured mutations of real torch.save files, for the differential harness (tests/test_differential.py) and
the committed fixtures built from what it found (fixtures/hostile/differential/make_differential.py).

An archive is rebuilt from its records the way torch's writer (miniz) lays them out: stored records from byte 0,
each local header padded with an "FB" extra field so the bytes start 64-aligned, a data descriptor after the
bytes, the central directory, the zip64 end records and the end record. :func:`archive` takes knobs that each
produce one kind of file two zip readers can read differently (names, case, directory offsets, extra records,
junk before, between and after records). :func:`legacy` and the pickle helpers do the same for the legacy
format and plain pickles (frames, memo games, junk). Nothing here runs a pickle.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import random
import struct
import zlib

CANARY = "CKCONV_PWNED"


class Armed:
    """Pickles as a call to ``builtins.exec`` that creates the canary file in the current folder."""

    def __reduce__(self):
        return exec, (f"open({CANARY!r}, 'w').close()",)


def armed_pickle(protocol=2) -> bytes:
    """A pickle that runs code when loaded, with a tensor-free body torch's loader accepts."""
    return pickle.dumps({"config": Armed()}, protocol=protocol)


def records_of(data: bytes) -> list:
    """[(name, bytes)] of a stored zip archive, in central directory order (read with zipfile: our own files)."""
    import zipfile

    zf = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, zf.read(i.filename)) for i in zf.infolist()]


def _record(name: bytes, data: bytes, pos: int, local_name=None, descriptor=True):
    lname = name if local_name is None else local_name
    pad = (-(pos + 30 + len(lname) + 4)) % 64
    extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    flags = 0x808 if descriptor and data else 0x800
    crc = zlib.crc32(data)
    fields = (0, 0, 0) if flags & 8 else (crc, len(data), len(data))
    header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, *fields, len(lname), len(extra))
    tail = struct.pack("<IIII", 0x08074B50, crc, len(data), len(data)) if flags & 8 else b""
    return header + lname + extra + data + tail, (name, flags, crc, len(data), pos)


def _central(entry, name=None) -> bytes:
    ename, flags, crc, size, offset = entry
    ename = ename if name is None else name
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0, crc, size, size, len(ename), 0, 0,
                       0, 0, 0, offset) + ename


def _end(n, cd_size, cd_offset, end64_at, zip64=True) -> bytes:
    out = b""
    if zip64:
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, end64_at, 1)
    return out + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0)


def archive(records, *, before=b"", between=None, after=b"", cd_names=None, local_names=None, drop_from_cd=(),
            cd_junk=b"", extra_cd=b"", cd_offset_delta=0, zip64=True, shadow=None) -> bytes:
    """A torch-layout zip of ``records`` [(name str, bytes)], with knobs:

    ``before``/``after``: bytes before the first record / after the end record; ``between``: {i: bytes} after
    record i; ``cd_names``/``local_names``: {i: name} spelling record i otherwise in the directory / its local
    header; ``drop_from_cd``: records present in the file but not listed; ``cd_junk``: bytes between the
    directory and the end records; ``extra_cd``: bytes inside the directory's declared size, past its declared
    entry count;
    ``cd_offset_delta``: added to the declared directory offset; ``shadow``: a second record list whose own
    directory sits right before the end record while the end record declares the first one's offset.
    """
    between = between or {}
    out = bytearray(before)
    entries = []
    for i, (name, data) in enumerate(records):
        lname = (local_names or {}).get(i)
        raw, entry = _record(name.encode(), data, len(out), None if lname is None else lname.encode())
        out += raw
        if i not in drop_from_cd:
            entries.append((i, entry))
        out += between.get(i, b"")
    cd_offset = len(out)
    cd = b"".join(_central(e, None if (cd_names or {}).get(i) is None else cd_names[i].encode())
                  for i, e in entries)
    n = len(entries)
    if shadow is not None:  # a second archive: its records, then the first directory, then its own
        shadow_entries = []
        for name, data in shadow:
            raw, entry = _record(name.encode(), data, len(out))
            out += raw
            shadow_entries.append(entry)
        cd_offset = len(out)
        out += cd
        shadow_cd = b"".join(_central(e) for e in shadow_entries)
        assert len(shadow_cd) == len(cd) and len(shadow_entries) == n, "the shadow directory must match in size"
        out += shadow_cd
        at = len(out)
        return bytes(out + _end(n, len(cd), cd_offset, at, zip64))
    out += cd + extra_cd + cd_junk
    at = len(out)
    return bytes(out + _end(n, len(cd) + len(extra_cd), cd_offset + cd_offset_delta, at, zip64) + after)


def central_entry(name: str, data: bytes, offset: int) -> bytes:
    """A central directory entry for ``name`` claiming ``data`` at ``offset`` (to list one record twice)."""
    return _central((name.encode(), 0x808, zlib.crc32(data), len(data), offset))


def tar_polyglot(payload: bytes) -> bytes:
    """One pickle (``BINBYTES`` holding everything, then ``STOP``) that is also a tar archive (no ustar magic, as
    old tars) whose member ``storages`` is ``payload``: torch.load tries tarfile first and unpickles the member."""
    import tarfile

    def build(length):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            head = (b"\x80\x03B" + struct.pack("<I", length)).decode("utf-8", "surrogateescape")
            for name, data in ((head, b""), ("storages", payload)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = bytearray(buf.getvalue())
        for start in range(0, len(data), 512):  # blank the ustar magic of each header, fix its checksum
            block = data[start:start + 512]
            if block[257:262] == b"ustar":
                block[257:265] = b"\0" * 8
                block[148:156] = b" " * 8
                block[148:156] = b"%06o\0 " % sum(block)
                data[start:start + 512] = block
        return bytes(data)

    size = len(build(0))
    return build(size - 7) + b"."


# --- pickles -----------------------------------------------------------------------------------------------------

def stop_position(data: bytes, start=0) -> int:
    """The offset just after the STOP that ends the pickle starting at ``start``."""
    for op, _, pos in pickletools.genops(io.BytesIO(data[start:])):
        if op.name == "STOP":
            return start + pos + 1
    raise ValueError("no STOP")


def frame_past_stop(pkl: bytes, tail: bytes) -> bytes:
    """Protocol 4+ pickle whose last FRAME also holds ``tail`` after its STOP: a reader that consumes whole
    frames (no ``peek``) swallows ``tail``, torch's buffered file leaves it for the next pickle."""
    assert pkl[2:3] == pickle.FRAME[:1] if len(pkl) > 2 else False
    length = struct.unpack_from("<Q", pkl, 3)[0]
    assert 11 + length == len(pkl), "one frame"
    return pkl[:3] + struct.pack("<Q", length + len(tail)) + pkl[11:] + tail


def legacy(parts) -> bytes:
    """A legacy torch.save stream from its parts: magic, protocol, sys_info, object pickle, keys pickle, data."""
    return b"".join(parts)


def legacy_parts(data: bytes) -> list:
    """Split a legacy torch.save file into [magic, protocol, sys_info, object, keys] pickles and the storage data."""
    parts, pos = [], 0
    for _ in range(5):
        end = stop_position(data, pos)
        parts.append(data[pos:end])
        pos = end
    return parts + [data[pos:]]


def reframe(pkl: bytes, protocol=4) -> bytes:
    """A protocol-2 pickle re-emitted as one protocol-``protocol`` FRAME (the opcodes unchanged)."""
    body = pkl[2:]
    return bytes([0x80, protocol]) + b"\x95" + struct.pack("<Q", len(body)) + body


def memo_swap(pkl: bytes, rng: random.Random) -> bytes:
    """Flip one BINGET index to another memo slot: the same opcodes, a different object graph."""
    gets = [pos for op, arg, pos in pickletools.genops(pkl) if op.name == "BINGET"]
    if not gets:
        return pkl
    pos = rng.choice(gets)
    data = bytearray(pkl)
    data[pos + 1] = rng.randrange(0, max(1, data[pos + 1] + 2))
    return bytes(data)


# --- the harness's random mutations ------------------------------------------------------------------------------

def _recase(name: str, rng: random.Random) -> str:
    """``name`` with some ASCII letters' case flipped (at least one when it has letters)."""
    head, _, tail = name.rpartition("/")
    letters = [i for i, c in enumerate(tail) if c.isalpha()]
    if not letters:
        return name
    flip = set(rng.sample(letters, rng.randint(1, len(letters))))
    return head + "/" + "".join(c.swapcase() if i in flip else c for i, c in enumerate(tail))


def _junk(rng, recs):
    return rng.choice([b"\0" * rng.randint(1, 80), armed_pickle(), bytes(rng.randrange(256) for _ in range(40)),
                       _record(recs[0][0].encode(), armed_pickle(), 0)[0]])


def _zip_mutation(recs, rng):
    top = recs[0][0].split("/")[0]
    pkl = next(i for i, (n, _) in enumerate(recs) if n.endswith("/data.pkl"))
    kind = rng.choice(["case_dup", "case_rename", "shadow", "before", "between", "after", "cd_junk", "extra_cd",
                       "cd_offset", "outside", "local_name", "cd_name", "hidden", "no_zip64", "memo", "frame",
                       "dup_exact", "reframe"])
    if kind == "case_dup":
        i = rng.randrange(len(recs))
        name, data = recs[i]
        data = armed_pickle() if i == pkl or rng.random() < 0.3 else bytes(rng.randrange(256) for _ in data)
        new = list(recs)
        new.insert(rng.randrange(len(new) + 1), (_recase(name, rng), data))
        return kind, archive(new)
    if kind == "case_rename":
        i = rng.randrange(len(recs))
        new = list(recs)
        data = b"big" if recs[i][0].endswith("/byteorder") and rng.random() < 0.5 else recs[i][1]
        new[i] = (_recase(recs[i][0], rng), data)
        return kind, archive(new)
    if kind == "shadow":
        armed = [(n, armed_pickle() if j == pkl else d) for j, (n, d) in enumerate(recs)]
        pair = (armed, recs) if rng.random() < 0.5 else (recs, armed)
        return kind, archive(pair[0], shadow=pair[1])
    if kind in ("before", "between", "after", "cd_junk"):
        junk = _junk(rng, recs)
        knob = {"before": {"before": b"PK\x03\x04" + junk}, "after": {"after": junk}, "cd_junk": {"cd_junk": junk},
                "between": {"between": {rng.randrange(len(recs)): junk}}}[kind]
        return kind, archive(recs, **knob)
    if kind == "extra_cd":
        return kind, archive(recs, extra_cd=central_entry(recs[pkl][0], recs[pkl][1], 0))
    if kind == "cd_offset":
        return kind, archive(recs, cd_offset_delta=rng.choice([-46, -1, 1, 64]))
    if kind == "outside":
        return kind, archive(recs + [(rng.choice(["other", top.upper(), top + "x"]) + "/data.pkl", armed_pickle())])
    if kind == "local_name":
        i = rng.randrange(len(recs))
        return kind, archive(recs, local_names={i: _recase(recs[i][0], rng)})
    if kind == "cd_name":
        i = rng.randrange(len(recs))
        return kind, archive(recs, cd_names={i: _recase(recs[i][0], rng)})
    if kind == "hidden":  # an armed data.pkl in the file, listed nowhere
        return kind, archive([(recs[pkl][0], armed_pickle())] + recs, drop_from_cd={0})
    if kind == "no_zip64":
        return kind, archive(recs, zip64=False)
    if kind == "dup_exact":
        return kind, archive(recs + [(recs[pkl][0], armed_pickle())])
    new = list(recs)
    name, data = recs[pkl]
    if kind == "memo":
        new[pkl] = (name, memo_swap(data, rng))
    elif kind == "frame":
        new[pkl] = (name, frame_past_stop(reframe(data) if data[1] == 2 else _one_frame(data), armed_pickle()))
    else:  # "reframe": a valid protocol-4 frame around the same opcodes
        new[pkl] = (name, reframe(data) if data[1] == 2 else data)
    return kind, archive(new)


def _one_frame(pkl: bytes) -> bytes:
    """A protocol 4/5 pickle re-emitted with every opcode in one frame (its FRAME opcodes dropped)."""
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [ops[-1][2] + 1]
    body = b"".join(pkl[pos:end] for (op, _, pos), end in zip(ops, ends) if op.name not in ("PROTO", "FRAME"))
    return pkl[:2] + b"\x95" + struct.pack("<Q", len(body)) + body


def _stream_mutation(parts, rng, legacy_file):
    """Mutations of a stream of pickles (a legacy file: 5 pickles and the storage data; a plain pickle: 1)."""
    pickles, data = (parts[:5], parts[5]) if legacy_file else ([parts[0]], b"")
    i = rng.randrange(len(pickles))
    kind = rng.choice(["frame", "insert", "trailing", "leading", "memo", "reframe", "drop", "tar"])
    if kind == "tar":  # the whole stream inside a pickle that is also a tar archive holding a payload
        return kind, tar_polyglot(armed_pickle())
    new = list(pickles)
    if kind == "frame":
        nxt = pickles[i + 1] if i + 1 < len(pickles) else armed_pickle()
        tail = rng.choice([armed_pickle(), nxt, b"\0" * 8])
        body = reframe(new[i]) if new[i][1] == 2 else _one_frame(new[i])
        new[i] = frame_past_stop(body, tail)
    elif kind == "insert":
        new.insert(i + 1, rng.choice([armed_pickle(), pickle.dumps(1001, 2), pickles[i]]))
    elif kind == "leading":
        new.insert(0, armed_pickle())
    elif kind == "memo":
        new[i] = memo_swap(new[i], rng)
    elif kind == "reframe":
        new[i] = reframe(new[i]) if new[i][1] == 2 else _one_frame(new[i])
    elif kind == "drop" and len(new) > 1:
        del new[i]
    out = b"".join(new) + data
    if kind == "trailing":
        out += rng.choice([armed_pickle(), b"\0" * 7, archive([("a/data.pkl", armed_pickle())])])
    return kind, out


def mutate(bases: dict, rng: random.Random):
    """One random mutant of one of ``bases`` ({name: torch.save or pickle bytes}): (kind, bytes)."""
    name = rng.choice(sorted(bases))
    data = bases[name]
    if name.startswith("zip"):
        kind, out = _zip_mutation(records_of(data), rng)
    elif name.startswith("legacy"):
        kind, out = _stream_mutation(legacy_parts(data), rng, True)
    else:
        kind, out = _stream_mutation([data], rng, False)
    return f"{name}-{kind}", out
