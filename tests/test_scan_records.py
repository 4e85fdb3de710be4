"""The scan's fast path for torch's tensor records (pickling.records) gives exactly the handlers' answers.

Differential: every pickle is scanned twice, with the fast path and with the handlers alone, and everything the
scan decides must agree: where the pickle ends, each global's role, the measures of the value left on the stack
(which the limits of everything around it add up), and, swept across every limit value near the thresholds, which
limit refuses and with which message. Positive controls show the fast path really read the records.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile

import pytest
import torch

from ckconv.errors import CkconvError
from ckconv.pickling import records, scan as scan_module
from ckconv.pickling.scan import _table
from ckconv.pickling.shadow import Scanner


def data_pkl(obj, legacy=False) -> bytes:
    buf = io.BytesIO()
    if legacy:  # the legacy format: magic, protocol and sys-info pickles before the object's
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        raw = buf.getvalue()
        f = io.BytesIO(raw)
        import pickle
        for _ in range(3):
            pickle.load(f)
        return raw[f.tell():]
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def run(data, fast, max_depth=200, max_nodes=5_000_000):
    """Everything a scan decides: (end, roles, measures of the stack's values), or the refusal's type and text."""
    s = Scanner(data, "x", max_depth, max_nodes)
    s.fast = fast
    s.table = _table(s)
    try:
        end = s.run(0)
    except records.Restart:
        return "restart"
    except CkconvError as exc:
        return type(exc).__name__, str(exc), dict(s.roles)
    values = [(v.depth, v.weight, v.hcost, v.keywork, v.mutable, v.collidable, v.fn, v.text) for v in s.stack]
    return end, dict(s.roles), values


def decided(data, fast, **limits):
    """What ckconv.pickling.scan.scan decides: a restart is the handlers' answer."""
    answer = run(data, fast, **limits)
    return run(data, False, **limits) if answer == "restart" else answer


def entries_read(data, monkeypatch) -> int:
    """How many bytes the runs of entries (pickling.records.entries) read."""
    read = []
    real = scan_module.entries

    def counting(s, pos):
        end = real(s, pos)
        read.append(end - pos)
        return end

    monkeypatch.setattr(scan_module, "entries", counting)
    run(data, True)
    return sum(read)


def used_fast_path(data, monkeypatch) -> int:
    hits = []
    real = scan_module.tensor_record

    def counting(s, pos):
        end = real(s, pos)
        hits.append(end is not None)
        return end

    monkeypatch.setattr(scan_module, "tensor_record", counting)
    run(data, True)
    return sum(hits)


g = torch.Generator().manual_seed(0)
CASES = {
    "tiny tensors": {f"layers.{i // 10}.w{i % 10}": torch.randn(4, generator=g) for i in range(40)},
    "shapes of 0 to 9 dimensions": {f"t{n}": torch.zeros((2,) * n) for n in range(10)},
    "large dimensions (BININT2, BININT)": {"wide": torch.zeros(300, 2), "long": torch.zeros(70000, 1),
                                           "strided": torch.zeros(70000, 3).t()},
    "dtypes": {f"{d}{i}": torch.ones(3, dtype=d) for d in (torch.float16, torch.bfloat16, torch.int64, torch.bool,
                                                           torch.uint8, torch.float64) for i in range(2)},
    "views and shared storages": (lambda base: {"a": base, "b": base[1:], "c": base.view(2, 5), "d": base[::2]})(
        torch.arange(10.0)),
    "parameters": {"p": torch.nn.Parameter(torch.ones(2, 3)), "q": torch.nn.Parameter(torch.ones(4),
                                                                                      requires_grad=False)},
    "a tensor saved twice": (lambda t: {"first": torch.zeros(1), "a": t, "b": t, "c": [t, t]})(torch.ones(3)),
    "over 256 memo entries (LONG_BINPUT)": {f"k{i}": torch.full((2,), float(i)) for i in range(300)},
    "long names": {"n" * 250: torch.ones(1), "m" * 300: torch.ones(2)},
    "an optimizer's state": (lambda m: (lambda o: (m(torch.ones(2, 4)).sum().backward(), o.step(),
                                                   o.state_dict())[-1])(torch.optim.Adam(m.parameters())))(
        torch.nn.Linear(4, 3)),
    "a model's state_dict": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict(),
    # runs of entries (pickling.records.entries): past 256 memo entries, every PUT a LONG_BINPUT
    "key strings shared by two dicts (BINGET keys)": (lambda keys: {
        "model": {k: torch.randn(2, generator=g) for k in keys},
        "ema": {k: torch.randn(3, generator=g) for k in keys}})([f"block.{i}.weight" for i in range(48)]),
    "a run of views and long names": (lambda base: {
        **{f"w{i}": torch.zeros((1,) * (i % 10)) for i in range(40)}, **{f"v{i}": base[i:] for i in range(40)},
        **{"n" * (195 + i) + str(i): torch.ones(i % 3 + 1) for i in range(12)}, "é€🙂": torch.ones(1)})(
        torch.arange(60.0)),
    "an optimizer's state of many parameters": (lambda ps: (lambda o: (sum(p.sum() for p in ps).backward(),
                                                                        o.step(), o.state_dict())[-1])(
        torch.optim.Adam(ps)))([torch.nn.Parameter(torch.ones(i % 3 + 1)) for i in range(40)]),
}
RUNS = ["over 256 memo entries (LONG_BINPUT)", "key strings shared by two dicts (BINGET keys)",
        "a run of views and long names", "an optimizer's state of many parameters"]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_path_decides_what_the_handlers_decide(case, legacy, monkeypatch):
    data = data_pkl(CASES[case], legacy)
    assert run(data, True) == run(data, False)
    assert used_fast_path(data, monkeypatch) > 0  # the records after the first were read whole


@pytest.mark.parametrize("case", RUNS)
def test_runs_of_entries_are_read_whole(case, monkeypatch):
    """Positive control: most of each pickle is read by the runs of entries, not the handlers."""
    data = data_pkl(CASES[case])
    assert entries_read(data, monkeypatch) > len(data) // 2


@pytest.mark.parametrize("case", ["tiny tensors", "views and shared storages", "a tensor saved twice",
                                  "an optimizer's state", *RUNS])
def test_every_limit_near_its_threshold_refuses_the_same_way(case):
    """Every value of max_nodes up to past the pickle's size, and of max_depth up to past its depth: the same
    refusals, the same messages, the same roles seen when refused."""
    data = data_pkl(CASES[case])
    end, _, values = run(data, False)
    top_weight = max(v[1] for v in values)
    memo_entries = sum(1 for op, _, _ in pickletools.genops(data) if "PUT" in op.name or op.name == "MEMOIZE")
    for max_nodes in sorted({*range(1, 40), *range(top_weight - 30, top_weight + 3),
                             *range(memo_entries - 5, memo_entries + 3)} - {0}):
        if max_nodes > 0:
            assert run(data, True, max_nodes=max_nodes) == run(data, False, max_nodes=max_nodes), max_nodes
    for max_depth in range(0, 8):
        assert run(data, True, max_depth=max_depth) == run(data, False, max_depth=max_depth), max_depth


def test_a_pickle_that_reads_back_an_unbuilt_value_is_scanned_again_by_the_handlers(monkeypatch):
    """A BINGET of a memo entry the fast path did not build (the second record's storage reference here)
    restarts the scan without it: the same answer as the handlers alone, and the restart really happened."""
    data = data_pkl({"w": torch.ones(2), "v": torch.ones(3)})
    ops = list(pickletools.genops(data))
    key = next(i for i, (op, arg, _) in enumerate(ops) if arg == "v")
    pid = next(i for i in range(key, len(ops)) if ops[i][0].name == "TUPLE")
    assert ops[pid + 1][0].name == "BINPUT" and ops[pid + 2][0].name == "BINPERSID"
    index = ops[pid + 1][1]
    assert data.endswith(b"u.")
    crafted = data[:-2] + b"X\x01\x00\x00\x00z" + b"h" + bytes([index]) + b"u."
    scanners = []
    monkeypatch.setattr(scan_module, "Scanner", lambda *a: scanners.append(1) or Scanner(*a))
    end, roles = scan_module.scan(crafted, where="x", max_depth=200, max_nodes=5_000_000)
    assert len(scanners) == 2  # restarted
    assert end == len(crafted) and roles == scan_module.scan(crafted, where="x", max_depth=200,
                                                              max_nodes=5_000_000)[1]
    assert run(crafted, True) == "restart"
    assert run(crafted, False)[0] == len(crafted)


def test_every_memo_limit_refuses_a_run_where_the_handlers_do():
    """Every value of max_nodes from 1 to past the memo's size: a run of entries stops before the entry whose PUT
    would reach the limit, at every entry, and the handlers refuse it with their message."""
    data = data_pkl(CASES["key strings shared by two dicts (BINGET keys)"])
    memo_entries = sum(1 for op, _, _ in pickletools.genops(data) if "PUT" in op.name)
    for max_nodes in range(1, memo_entries + 3):
        assert run(data, True, max_nodes=max_nodes) == run(data, False, max_nodes=max_nodes), max_nodes


def _entry_bytes(data: bytes) -> range:
    """Three entries well inside the first run of a pickle: their keys, BINGETs, records and PUTs."""
    start = data.index(b"block.40.weight") - 5
    return range(start, data.index(b"block.43.weight") - 5)


@pytest.mark.parametrize("replacement", [lambda b: (b + 1) % 256, lambda b: (b - 1) % 256, lambda b: 0,
                                         lambda b: 0xFF, lambda b: ord("h"), lambda b: ord("r"), lambda b: ord("X")],
                         ids=["+1", "-1", "0", "0xff", "BINGET", "LONG_BINPUT", "BINUNICODE"])
def test_every_byte_of_a_run_mutated_decides_as_the_handlers_do(replacement):
    """Each byte of three entries of a run replaced (memo indices out of order or naming the record's own
    values, lengths that disagree with the string, strings that are not UTF-8, other opcodes): the scan decides
    exactly what the handlers alone decide, refusal messages included."""
    data = data_pkl(CASES["key strings shared by two dicts (BINGET keys)"])
    for i in _entry_bytes(data):
        mutant = data[:i] + bytes([replacement(data[i])]) + data[i + 1:]
        assert decided(mutant, True) == run(mutant, False), (i, data[i - 8:i + 8])


@pytest.mark.parametrize("which", ["one entry", "every entry"])
@pytest.mark.parametrize("named", ["a deep tuple", "a heavy tuple"])
def test_a_storage_key_that_names_another_value_is_measured_as_the_handlers_measure_it(named, which):
    """A storage key that is a BINGET of a value other than a string, in the middle of a run or in every entry of
    it: a tuple deeper (((((((((),),),),),),),),) or larger (2000 ints) than anything else in the pickle, stored
    as memo entry 0 and popped before the state_dict. The persistent id's depth and size limits refuse exactly
    where the handlers' do, at and around their thresholds."""
    data = data_pkl(CASES["a run of views and long names"])
    assert data.startswith(b"\x80\x02}q\x00(")  # the top-level dict is memo entry 0, never read back
    value = b")" + b"\x85" * 9 if named == "a deep tuple" else b"(" + b"K\x00" * 2000 + b"t"
    data = data[:2] + value + b"q\x000}" + data[5:]
    keys = [m.start(1) for m in re.finditer(rb"\(\(h.h.j(....)h", data, re.DOTALL)]  # the views' storage key
    later = [k for k in keys if k > data.index(b"v20")]
    assert len(later) > 5
    crafted = bytearray(data)
    for k in later[:1] if which == "one entry" else later:
        crafted[k:k + 4] = bytes(4)
    crafted = bytes(crafted)
    assert decided(crafted, True) == run(crafted, False) and run(crafted, False)[0] == len(crafted)
    for max_depth in range(0, 14):
        assert decided(crafted, True, max_depth=max_depth) == run(crafted, False, max_depth=max_depth), max_depth
    for max_nodes in (*range(1, 20), *range(1990, 2012)):
        assert decided(crafted, True, max_nodes=max_nodes) == run(crafted, False, max_nodes=max_nodes), max_nodes
    assert "too large" in run(crafted, False, max_nodes=2005)[1] if named == "a heavy tuple" else True


@pytest.mark.parametrize("grow", [b"K\x01a", b"}b", b"(K\x01K\x02u"], ids=["APPEND", "BUILD", "SETITEMS"])
def test_a_pickle_that_grows_a_tensor_of_a_run_is_scanned_again_by_the_handlers(grow):
    """The tensors of a run share one value (equal measures); a pickle that then grows one of them (an APPEND, a
    BUILD, a SETITEMS onto it, which torch.save never writes) restarts the scan without the fast path: each
    tensor measured on its own, the same answer as the handlers alone."""
    data = data_pkl(CASES["over 256 memo entries (LONG_BINPUT)"])
    last = re.compile(rb"Rr(....)u\.$", re.DOTALL).search(data)  # the last entry's tensor, read by a run
    crafted = data[:-1] + b"j" + last.group(1) + grow + b"0" + b"."
    assert run(crafted, True) == "restart"
    assert decided(crafted, True) == run(crafted, False) and run(crafted, False)[0] == len(crafted)
    assert scan_module.scan(crafted, where="x", max_depth=200, max_nodes=5_000_000)[0] == len(crafted)


def test_a_put_where_a_run_expects_a_key_is_left_to_the_handlers():
    """A LONG_BINPUT between two entries, in place of the next one's key (BINGET rebuild and a record follow, as an
    entry's key PUT would be followed): the handlers store the previous tensor there; the run ends before it."""
    data = data_pkl(CASES["key strings shared by two dicts (BINGET keys)"])
    ema = data.index(b"ema")
    key = re.compile(rb"Rr....(h.)h.\(\(", re.DOTALL).search(data, data.index(b"Rr", ema + 100))
    previous = int.from_bytes(data[key.start() + 2:key.start() + 6], "little")
    for index in (previous + 1, 65535, previous):  # in order, sparse, stored over
        crafted = data[:key.start(1)] + b"r" + index.to_bytes(4, "little") + data[key.end(1):]
        if index == previous + 1:  # and the entry's own PUTs after it, in order
            end = crafted.index(b"R", crafted.index(b"t", crafted.index(b"\x89h", key.start(1)))) + 6
            for op, arg, pos in pickletools.genops(crafted[key.start(1):end] + b"."):
                if op.name == "LONG_BINPUT" and pos > 0:
                    at = key.start(1) + pos + 1
                    crafted = crafted[:at] + (arg + 1).to_bytes(4, "little") + crafted[at + 4:]
        assert decided(crafted, True) == run(crafted, False)


def test_a_run_whose_records_call_a_value_that_grows_between_runs_is_measured_as_the_handlers_measure_it():
    """Records whose rebuild BINGET names the top-level dict (a value that grows) rather than a global, in two
    batches of SETITEMS: the dict grows between the two runs, and each tensor's size follows it as the handlers'
    does (a run never reuses what it worked out from a value that can grow)."""
    data = data_pkl(CASES["over 256 memo entries (LONG_BINPUT)"])
    assert data.startswith(b"\x80\x02}q\x00(") and data.count(b"h\x02((") == 299
    half = data.index(b"X\x04\x00\x00\x00k150")
    first = data.index(b"X\x04\x00\x00\x00k100")
    crafted = (data[:first] + data[first:half].replace(b"h\x02((", b"h\x00((") + b"u("
               + data[half:].replace(b"h\x02((", b"h\x00(("))
    assert decided(crafted, True) == run(crafted, False) and run(crafted, False)[0] == len(crafted)
