"""Bounded work on every input (issue 14): special files, links out of the folder, amplification, big integers.

Hostile inputs are built here in ``tmp_path``. The ones that used to hang or eat gigabytes run as a real ``ckconv``
subprocess measured with ``os.wait4`` (its own peak RSS and wall time) under generous limits: a regression shows
up as many gigabytes or minutes, far past them, and a hang is killed instead of stalling the suite.
"""

from __future__ import annotations

import json
from collections import OrderedDict
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv import tree
from ckconv.cli import cli
from ckconv.errors import CorruptCheckpoint, LimitExceeded
from ckconv.formats.dcp.metadata import check_tiling
from helpers import assert_deep_equal

CKCONV = Path(sys.executable).with_name("ckconv")
MAX_RSS_MB = 1536  # what the hostile inputs below are allowed, at most (each used several GB before)
MAX_SECONDS = 60


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    rss_mb: float
    seconds: float


def run_measured(tmp_path, *args, timeout=MAX_SECONDS * 3, env=None) -> Run:
    """``ckconv ARGS`` in a subprocess; its own peak RSS and wall time. Killed (rc -9) past ``timeout``."""
    out, err = tmp_path / "run.stdout", tmp_path / "run.stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        start = time.monotonic()
        proc = subprocess.Popen([str(CKCONV), *map(str, args)], stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(proc.returncode, out.read_text(), err.read_text(), usage.ru_maxrss / 1024, time.monotonic() - start)


def assert_refused(run: Run, *words, code=1):
    """One ``Error:`` line, exit 1 (2 for a usage error), no traceback, naming what is wrong."""
    assert run.rc == code, (run.rc, run.stdout[-500:], run.stderr[-500:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr[-1000:]
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    for word in words:
        assert word in lines[0], lines[0]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def save_sharded(folder, n=3):
    state = {f"layer{i}.weight": torch.full((64,), float(i)) for i in range(n)}
    ckconv.save(state, folder, max_shard_size=300)
    assert (folder / "model.safetensors.index.json").is_file()
    return state


def fifo(path):
    os.mkfifo(path)
    return path


# --- special files: never opened ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "convert", "scan"])
def test_a_fifo_given_as_the_checkpoint_is_refused_without_opening_it(tmp_path, command):
    src = fifo(tmp_path / "model.pth")
    args = [command, src] + ([tmp_path / "out.safetensors"] if command == "convert" else [])
    run = run_measured(tmp_path, *args, timeout=MAX_SECONDS)
    assert run.rc == 1, (run.rc, run.stdout, run.stderr)
    assert "FIFO" in run.stdout + run.stderr or "not a regular file" in run.stdout + run.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_link_to_dev_zero_given_as_the_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.safetensors").symlink_to("/dev/zero")
    run = run_measured(tmp_path, "convert", tmp_path / "model.safetensors", tmp_path / "out.pth",
                       timeout=MAX_SECONDS)
    assert_refused(run, "character device", "not a regular file")
    assert not (tmp_path / "out.pth").exists()


def test_a_fifo_index_in_a_sharded_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    save_sharded(folder)
    (folder / "model.safetensors.index.json").unlink()
    fifo(folder / "model.safetensors.index.json")
    run = run_measured(tmp_path, "convert", folder, tmp_path / "out.pth", timeout=MAX_SECONDS)
    assert_refused(run, "FIFO")
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_index_linked_to_dev_zero_is_refused(tmp_path):
    folder = tmp_path / "model"
    save_sharded(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model.safetensors.index.json").symlink_to("/dev/zero")
    run = run_measured(tmp_path, "inspect", folder, timeout=MAX_SECONDS)
    assert run.rc == 1 and run.rss_mb < MAX_RSS_MB, run
    assert "not a regular file" in run.stdout + run.stderr or "links outside" in run.stdout + run.stderr
    # given directly, the index is a device: refused before anything opens it
    assert_refused(run_measured(tmp_path, "convert", folder / "model.safetensors.index.json", tmp_path / "o.pth",
                                timeout=MAX_SECONDS), "character device")


def test_a_fifo_shard_is_refused(tmp_path):
    folder = tmp_path / "model"
    save_sharded(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    fifo(shard)
    run = run_measured(tmp_path, "convert", folder, tmp_path / "out.pth", timeout=MAX_SECONDS)
    assert_refused(run, shard.name, "FIFO")
    assert not (tmp_path / "out.pth").exists()


def test_a_fifo_dcp_storage_file_is_refused(tmp_path):
    folder = dcp_folder(tmp_path / "ck", {"a": torch.ones(3)})
    (folder / "__0_0.distcp").unlink()
    fifo(folder / "__0_0.distcp")
    run = run_measured(tmp_path, "convert", folder, tmp_path / "out.pth", timeout=MAX_SECONDS)
    assert_refused(run, "__0_0.distcp", "FIFO")


def test_a_dcp_metadata_that_is_a_fifo_or_device_is_never_opened(tmp_path):
    folder = dcp_folder(tmp_path / "ck", {"a": torch.ones(3)})
    (folder / ".metadata").unlink()
    fifo(folder / ".metadata")
    assert run_measured(tmp_path, "inspect", folder, timeout=MAX_SECONDS).rc == 1
    assert_refused(run_measured(tmp_path, "inspect", folder / ".metadata", timeout=MAX_SECONDS), "FIFO")


# --- links never leave the checkpoint folder ------------------------------------------------------------------

def test_a_shard_linked_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    save_sharded(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard.rename(elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)
    result = invoke("convert", folder, tmp_path / "out.pth")
    assert result.exit_code == 1
    assert "links outside the checkpoint folder" in result.output and shard.name in result.output
    assert not (tmp_path / "out.pth").exists()


def test_a_lone_model_safetensors_linked_outside_the_folder_is_refused(tmp_path):
    ckconv.save({"w": torch.ones(2)}, tmp_path / "real.safetensors")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    result = invoke("inspect", tmp_path / "model")
    assert result.exit_code == 1 and "links outside the checkpoint folder" in result.output
    # the same file given by its own name is the user's choice: read
    assert invoke("inspect", tmp_path / "model" / "model.safetensors").exit_code == 0


def test_links_inside_the_folder_are_read(tmp_path):
    folder = tmp_path / "model"
    state = save_sharded(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    (folder / "real").mkdir()
    shard.rename(folder / "real" / shard.name)
    shard.symlink_to(Path("real") / shard.name)
    assert_deep_equal(ckconv.load(folder), state)


def test_a_huggingface_hub_cache_snapshot_links_into_blobs_and_is_read(tmp_path):
    """huggingface_hub stores every file once in ``<repo>/blobs`` and links it from ``snapshots/<revision>``."""
    made = tmp_path / "made"
    state = save_sharded(made)
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(made.iterdir())):
        f.rename(repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    assert_deep_equal(ckconv.load(snapshot), state)
    # but not a link from the snapshot to anywhere else
    outside = tmp_path / "outside.safetensors"
    os.replace(repo / "blobs" / "blob0", outside)
    (repo / "blobs" / "blob0").symlink_to(outside)
    with pytest.raises(CorruptCheckpoint, match="links outside the checkpoint folder"):
        ckconv.read(snapshot)


def test_a_dcp_storage_file_linked_outside_the_folder_is_refused(tmp_path):
    folder = dcp_folder(tmp_path / "ck", {"a": torch.ones(3)})
    (folder / "__0_0.distcp").rename(tmp_path / "stolen")
    (folder / "__0_0.distcp").symlink_to(tmp_path / "stolen")
    result = invoke("convert", folder, tmp_path / "out.pth")
    assert result.exit_code == 1 and "links outside the checkpoint folder" in result.output
    assert not (tmp_path / "out.pth").exists()


def test_a_dcp_metadata_linked_outside_the_folder_is_refused(tmp_path):
    folder = dcp_folder(tmp_path / "ck", {"a": torch.ones(3)})
    (folder / ".metadata").rename(tmp_path / "elsewhere.metadata")
    (folder / ".metadata").symlink_to(tmp_path / "elsewhere.metadata")
    result = invoke("inspect", folder)
    assert result.exit_code == 1 and "links outside the checkpoint folder" in result.output, result.output


# --- walks cost O(nodes) memory -------------------------------------------------------------------------------

def test_a_wide_tree_190_levels_deep_is_walked_in_bounded_memory(tmp_path):
    """1.5 M Nones inside 190 nested lists: a full path tuple per node was 2.4 GB; a TreePath is O(1) a node."""
    value = [None] * 1_500_000
    for _ in range(190):
        value = [value]
    torch.save(value, tmp_path / "wide.pth")
    assert (tmp_path / "wide.pth").stat().st_size < 3_000_000
    run = run_measured(tmp_path, "convert", tmp_path / "wide.pth", tmp_path / "out.safetensors")
    assert run.rc == 0, run.stderr[-500:]
    assert run.rss_mb < MAX_RSS_MB and run.seconds < MAX_SECONDS * 2, run


def test_walk_paths_behave_as_tuples():
    root = {"a": [10, {"b": 20}], 3: ("x",)}
    seen = []
    assert tree.walk(root, lambda p, n: seen.append((p, n))) == 7
    paths = [p for p, _ in seen]
    assert [tuple(p) for p in paths] == [(), ("a",), ("a", 0), ("a", 1), ("a", 1, "b"), (3,), (3, 0)]
    p = paths[4]
    assert p == ("a", 1, "b") and len(p) == 3 and p[-1] == "b" and p[:2] == ("a", 1) and "b" in p
    assert p + ("c",) == ("a", 1, "b", "c") and hash(p) == hash(("a", 1, "b")) and p.index(1) == 1
    assert tree.format_path(p) == "a.1.b" and tree.format_path(paths[0]) == "<root>"
    assert [(tree.format_path(p), r) for p, r in tree.tensors({"x": [1]})] == []


def test_walk_still_refuses_cycles_depth_and_size(monkeypatch):
    a: list = []
    a.append(a)
    with pytest.raises(LimitExceeded, match="self-referencing"):
        tree.walk(a)
    deep: list = []
    for _ in range(tree.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(LimitExceeded, match="too deep"):
        tree.walk(deep)
    monkeypatch.setattr(tree, "MAX_NODES", 100)
    with pytest.raises(LimitExceeded, match="too large"):
        tree.walk([[None] * 60, [None] * 60])
    shared = [None] * 10
    assert tree.walk([shared, shared, shared]) == 34  # shared, not cyclic: visited each time


# --- pickle opcodes: capped before allocating -----------------------------------------------------------------

def test_twenty_million_memoize_opcodes_are_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x04N" + b"\x94" * 20_000_000 + b".")
    run = run_measured(tmp_path, "inspect", path)
    assert_refused(run, "memo entries")
    assert run.rss_mb < MAX_RSS_MB and run.seconds < MAX_SECONDS, run


def test_memo_entries_are_capped_at_max_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(tree, "MAX_NODES", 1000)
    (tmp_path / "few.pkl").write_bytes(b"\x80\x04N" + b"\x94" * 900 + b".")
    (tmp_path / "many.pkl").write_bytes(b"\x80\x04N" + b"\x94" * 1100 + b".")
    (tmp_path / "puts.pkl").write_bytes(b"\x80\x02N" + b"".join(b"r" + i.to_bytes(4, "little") for i in range(1100))
                                        + b".")
    assert invoke("inspect", tmp_path / "few.pkl").exit_code == 0
    for name in ("many.pkl", "puts.pkl"):
        result = invoke("inspect", tmp_path / name)
        assert result.exit_code == 1 and "more than 1000 memo entries" in result.output, result.output


def test_memo_indices_out_of_order_still_resolve(tmp_path):
    # LONG_BINPUT 1, LONG_BINPUT 0, then BINGET 1 and BINGET 0: a sparse memo that fills in later
    data = (b"\x80\x02(X\x01\x00\x00\x00ar\x01\x00\x00\x00X\x01\x00\x00\x00br\x00\x00\x00\x00"
            b"h\x01h\x00l.")
    assert pickle.loads(data) == ["a", "b", "a", "b"]
    (tmp_path / "sparse.pkl").write_bytes(data)
    assert ckconv.read(tmp_path / "sparse.pkl").root == ["a", "b", "a", "b"]


# --- DCP: caps before allocating, tiling in O(n log n), no shared byte ranges ----------------------------------

def dcp_folder(folder, state):
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def rewrite_metadata(folder, change):
    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)  # noqa: S301 - written by torch in this test
    change(md)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_planner_data_cannot_extend_lists_to_millions_of_slots(tmp_path):
    folder = dcp_folder(tmp_path / "ck", {f"t{i}": torch.ones(1) for i in range(50)})

    def stretch(md):  # 50 entries x 4.9 M list slots each: 2 GB of None before anything was counted
        md.planner_data = {fqn: (fqn, 4_900_000) for fqn in md.state_dict_metadata}

    rewrite_metadata(folder, stretch)
    run = run_measured(tmp_path, "inspect", folder)
    assert_refused(run, "CKCONV_MAX_NODES")
    assert run.rss_mb < MAX_RSS_MB and run.seconds < MAX_SECONDS, run


def test_planner_data_lists_rebuild_as_before(tmp_path):
    state = {"opt": {"groups": [{"lr": torch.tensor(0.1)}, {"lr": torch.tensor(0.2)}]}, "w": torch.arange(4)}
    folder = dcp_folder(tmp_path / "ck", state)
    assert_deep_equal(ckconv.load(folder), state)


def staircase(n):
    """2n - 1 chunks tiling an n x n tensor: column j split at row j + 1. Sorted by their first dimension, n of them
    start at row 0 and stay open together: a sweep compares every pair (n**2 / 2)."""
    boxes = []
    for j in range(n):
        boxes.append(((0, j), (j + 1, 1)))
        if j + 1 < n:
            boxes.append(((j + 1, j), (n - j - 1, 1)))
    return boxes


def write_chunked_metadata(folder, shape, boxes, span=1):
    """A DCP folder whose one tensor has ``boxes`` as chunks, each at its own ``span``-byte range (only the
    metadata is checked; chunk archives are read only when tensor bytes are)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    folder.mkdir()
    chunks, storage = [], {}
    for i, (offs, sizes) in enumerate(boxes):
        chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes)))
        storage[MetadataIndex("w", torch.Size(offs))] = _StorageInfo("__0_0.distcp", i * span, span)
    sdm = {"w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)}
    md = Metadata(state_dict_metadata=sdm, planner_data={"w": ("w",)}, storage_data=storage, version="1.0.0")
    (folder / "__0_0.distcp").write_bytes(b"\0" * (len(boxes) * span))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return folder


def test_twelve_thousand_staircase_chunks_are_checked_quickly(tmp_path):
    n = 6000  # the pairwise sweep this replaced took minutes here
    folder = write_chunked_metadata(tmp_path / "ck", (n, n), staircase(n))
    run = run_measured(tmp_path, "inspect", folder, "--json")
    assert run.rc == 0, run.stderr[-500:]
    assert json.loads(run.stdout)["tensor_count"] == 1
    assert run.seconds < MAX_SECONDS, run


@pytest.mark.parametrize("boxes, ok", [
    (staircase(4), True),
    ([((0, 0), (2, 4)), ((2, 0), (2, 4))], True),
    ([((0, 0), (4, 2)), ((0, 2), (4, 2))], True),
    ([((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2)), ((2, 2), (2, 2))], True),
    ([((0, 0), (3, 3)), ((0, 3), (3, 1)), ((3, 0), (1, 4)), ((0, 0), (0, 4))], True),  # an empty chunk is fine
    ([((0, 0), (2, 4)), ((1, 0), (2, 4))], False),  # overlap and gap, same element count
    ([((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2)), ((1, 1), (2, 2))], False),
    ([((0, 0), (4, 4)), ((0, 0), (4, 4))], False),
    ([((0, 0), (2, 4))], False),
])
def test_check_tiling_accepts_exact_covers_only(boxes, ok):
    if ok:
        check_tiling(boxes, (4, 4), "t")
    else:
        with pytest.raises(CorruptCheckpoint, match="overlap"):
            check_tiling(boxes, (4, 4), "t")


def test_check_tiling_in_three_dimensions():
    cubes = [((x, y, z), (1, 1, 1)) for x in range(2) for y in range(2) for z in range(2)]
    check_tiling(cubes, (2, 2, 2), "t")
    check_tiling([((0, 0, 0), (2, 2, 1)), ((0, 0, 1), (2, 1, 1)), ((0, 1, 1), (2, 1, 1))], (2, 2, 2), "t")
    with pytest.raises(CorruptCheckpoint, match="overlap"):  # an element twice, another never
        check_tiling(cubes[:-1] + [cubes[0]], (2, 2, 2), "t")


def test_dcp_byte_ranges_may_not_overlap(tmp_path):
    folder = dcp_folder(tmp_path / "ck", {"a": torch.arange(1000.0), "b": torch.arange(1000.0).reshape(10, 100)})

    def share(md):  # b read from a's bytes: one range for many entries multiplies the work
        keys = {k.fqn: k for k in md.storage_data}
        md.storage_data[keys["b"]] = md.storage_data[keys["a"]]

    rewrite_metadata(folder, share)
    result = invoke("convert", folder, tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "overlapping bytes" in result.output, result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_dcp_byte_ranges_overlapping_partly_are_refused(tmp_path):
    boxes = [((0,), (2,)), ((2,), (2,))]
    folder = write_chunked_metadata(tmp_path / "ck", (4,), boxes, span=10)

    def shift(md):
        key = [k for k in md.storage_data if tuple(k.offset) == (2,)][0]
        info = md.storage_data[key]
        info.offset = 5
        md.storage_data[key] = info

    rewrite_metadata(folder, shift)
    result = invoke("inspect", folder)
    assert result.exit_code == 1 and "overlapping bytes" in result.output, result.output


def test_tied_tensors_written_by_ckconv_still_share_one_range(tmp_path):
    w = torch.arange(6.0)
    state = {"a": w, "b": w, "c": torch.ones(2)}
    ckconv.save(state, tmp_path / "ck", format="dcp")
    out = ckconv.load(tmp_path / "ck")
    assert_deep_equal(out, state)
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()


# --- big integers ----------------------------------------------------------------------------------------------

BIG = 2 ** 20000


def test_deep_equal_names_huge_int_keys_and_values_by_size():
    assert_deep_equal({BIG: [1, BIG]}, {BIG: [1, BIG]})
    with pytest.raises(AssertionError, match=r"<root>\.<20001-bit int 0x10000000\.\.\.00000000>\[1\]: "
                                             r"<20001-bit int .*> != <20001-bit int .*00000001>"):
        assert_deep_equal({BIG: [1, BIG]}, {BIG: [1, BIG + 1]})


def test_huge_ints_survive_every_format_and_inspect_diff_show_them(tmp_path):
    state = {"w": torch.ones(2), "big": BIG, "neg": -(3 ** 30000), BIG + 1: "a key", "small": 5}
    torch.save(state, tmp_path / "big.pth")
    for dst, extra in (("big.safetensors", []), ("dcp", ["--to", "dcp"]), ("sharded", ["--max-shard-size", "1MB"])):
        result = invoke("convert", tmp_path / "big.pth", tmp_path / dst, *extra)
        assert result.exit_code == 0, result.output
        assert_deep_equal(ckconv.load(tmp_path / dst), state)
        assert invoke("convert", tmp_path / dst, tmp_path / f"back-{dst}.pth").exit_code == 0
        assert_deep_equal(torch.load(tmp_path / f"back-{dst}.pth", weights_only=False), state)
        diff = invoke("diff", tmp_path / "big.pth", tmp_path / dst)
        assert diff.exit_code == 0, diff.output
    text = json.loads(ckconv.read(tmp_path / "big.safetensors").metadata["ckconv.structure"])
    assert {"$int": format(BIG, "x")} in [v for _, v in text["$dict"]]
    shown = invoke("inspect", tmp_path / "big.safetensors")
    assert shown.exit_code == 0 and "<20001-bit int 0x10000000...00000001>" in shown.output, shown.output
    as_json = invoke("inspect", tmp_path / "big.safetensors", "--json")
    assert as_json.exit_code == 0 and "<20001-bit int 0x10000000...00000000>" in as_json.output
    torch.save({**state, "big": BIG + 2}, tmp_path / "other.pth")
    diff = invoke("diff", tmp_path / "big.pth", tmp_path / "other.pth")
    assert diff.exit_code == 1 and "...00000000> vs <20001-bit int 0x10000000...00000002>" in diff.output
    assert invoke("diff", tmp_path / "big.pth", tmp_path / "other.pth", "--json").exit_code == 1


def test_ints_below_the_limit_stay_plain_json(tmp_path):
    value = 10 ** 3000
    ckconv.save({"w": torch.ones(1), "n": value, "m": -value}, tmp_path / "x.safetensors")
    text = ckconv.read(tmp_path / "x.safetensors").metadata["ckconv.structure"]
    assert "$int" not in text and str(value) in text


@pytest.mark.parametrize("bad", ['"xyz"', '""', '"-"', "12", '"0x1f"', '"1F"'])
def test_a_malformed_int_tag_is_refused(tmp_path, bad):
    from ckconv.formats.safetensors_file import write_file

    ckconv.save({"w": torch.ones(1), "n": BIG}, tmp_path / "ok.safetensors")
    ckpt = ckconv.read(tmp_path / "ok.safetensors")
    text = ckpt.metadata["ckconv.structure"].replace(f'"{format(BIG, "x")}"', bad)
    write_file(tmp_path / "bad.safetensors", [("w", ckpt.root["w"])], {"format": "pt", "ckconv.structure": text})
    result = invoke("convert", tmp_path / "bad.safetensors", tmp_path / "out.pth")
    assert result.exit_code == 1 and "bad $int" in result.output, result.output
    assert not (tmp_path / "out.pth").exists()


def test_io_helpers_refuse_a_growing_file(tmp_path):
    from ckconv.storage.files import read_capped

    path = tmp_path / "index.json"
    path.write_bytes(b"{}")
    assert read_capped(path, 10) == b"{}"
    path.write_bytes(b"x" * 11)
    with pytest.raises(LimitExceeded):
        read_capped(path, 10)


# --- user-given side files: regular files of bounded size --------------------------------------------------------

def test_a_fifo_given_as_the_map_is_refused_without_opening_it(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "src.pth")
    run = run_measured(tmp_path, "convert", tmp_path / "src.pth", tmp_path / "out.pth", "--map",
                       fifo(tmp_path / "map.json"), timeout=MAX_SECONDS)
    assert_refused(run, "map ", "FIFO", code=2)
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_torch_index_read_as_a_fifo_or_dev_zero_is_refused(tmp_path):
    """``load_index`` itself (reached from sniffing and from an earlier output's index): never open() a FIFO."""
    fifo(tmp_path / "a.bin.index.json")
    (tmp_path / "b.bin.index.json").symlink_to("/dev/zero")
    probe = ("import sys\nfrom pathlib import Path\nfrom ckconv.errors import CkconvError\n"
             "from ckconv.formats.hub_folder import load_index\n"
             "for name in sys.argv[1:]:\n"
             "    try:\n        load_index(Path(name))\n    except CkconvError as exc:\n        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", probe, tmp_path / "a.bin.index.json", tmp_path / "b.bin.index.json"],
                          capture_output=True, text=True, timeout=MAX_SECONDS)
    assert done.returncode == 0, done.stderr[-500:]
    assert "FIFO" in done.stdout and "character device" in done.stdout, done.stdout


# --- diff and inspect: O(nodes) work, names only for what is reported --------------------------------------------

def wide(n, last=None, leaf=None, depth=190):
    value = [leaf] * n
    if last is not None:
        value[-1] = last
    for _ in range(depth):
        value = [value]
    return value


def test_diff_of_a_wide_tree_190_levels_deep_is_bounded(tmp_path):
    """1.5 M Nones in 190 nested lists, one changed: a dotted name per node was minutes and gigabytes."""
    torch.save(wide(1_500_000), tmp_path / "a.pth")
    torch.save(wide(1_500_000, last=1), tmp_path / "b.pth")
    run = run_measured(tmp_path, "diff", tmp_path / "a.pth", tmp_path / "b.pth")
    assert run.rc == 1, run.stderr[-500:]
    assert f"differs: {'0.' * 190}1499999: None vs 1" in run.stdout
    assert run.stdout.splitlines()[-1] == "different (0 tensors, 1500000 values compared; 1 value differ)"
    assert run.rss_mb < MAX_RSS_MB and run.seconds < MAX_SECONDS, run


def test_a_tensor_referenced_many_times_deep_down_is_compared_once_and_listed_within_caps(tmp_path):
    torch.save(wide(150_000, leaf=torch.arange(4.0), depth=100), tmp_path / "a.pth")
    torch.save(wide(150_000, leaf=torch.arange(4.0), depth=100), tmp_path / "b.pth")
    env = dict(os.environ, CKCONV_DIFF_MAX_LISTED="1000", CKCONV_INSPECT_MAX_ROWS="1000")
    run = run_measured(tmp_path, "diff", tmp_path / "a.pth", tmp_path / "b.pth", "--json", env=env)
    assert run.rc == 0, run.stderr[-500:]
    report = json.loads(run.stdout)
    assert report["equal"] and report["tensors_compared"] == 150_000 and len(report["tensors"]) == 1000
    assert report["omitted"] == {"tensors": 149_000}
    assert run.rss_mb < MAX_RSS_MB and run.seconds < MAX_SECONDS, run
    run = run_measured(tmp_path, "inspect", tmp_path / "a.pth", "--json", env=env)
    assert run.rc == 0, run.stderr[-500:]
    info = json.loads(run.stdout)
    assert info["tensor_count"] == 150_000 and info["bytes"] == 16 and info["dtypes"] == {"float32": 150_000}
    assert len(info["tensors"]) == 1000 and info["tensors_omitted"] == 149_000
    assert info["tensors"][0]["name"] == "0." * 100 + "0"
    assert run.rss_mb < MAX_RSS_MB and run.seconds < MAX_SECONDS, run


def test_inspect_table_says_how_many_rows_it_left_out(tmp_path, monkeypatch):
    from ckconv.reports import inspection

    monkeypatch.setattr(inspection, "MAX_TENSOR_ROWS", 3)
    t = torch.ones(2)
    torch.save({"a": t, "b": t, "c": [t, t, torch.zeros(1)]}, tmp_path / "x.pth")
    result = invoke("inspect", tmp_path / "x.pth")
    assert result.exit_code == 0, result.output
    assert "tensors: 5, 12 B" in result.output and "c.0" in result.output and "c.1" not in result.output
    assert "... and 2 more tensor references (the first 3 listed)" in result.output


def test_diff_lists_are_capped_and_counted(tmp_path, monkeypatch):
    from ckconv.reports import diff_report, diffing

    monkeypatch.setattr(diff_report, "MAX_LISTED", 5)
    torch.save({"w": torch.ones(1), "x": list(range(20)), "y": {f"k{i}": i for i in range(8)}}, tmp_path / "a.pth")
    torch.save({"w": torch.ones(1), "x": [-i for i in range(20)]}, tmp_path / "b.pth")
    report = diffing.diff(tmp_path / "a.pth", tmp_path / "b.pth")
    assert not report.equal and len(report.values_differ) == 5 and report.omitted["values_differ"] == 14
    assert report.only_in_a == ["y.k0", "y.k1", "y.k2", "y.k3", "y.k4"] and report.omitted["only_in_a"] == 3
    assert report.to_dict()["values_differing"] == 19 and report.values_compared == 20
    text = diffing.render(report)
    assert "19 values differ" in text.splitlines()[-1] and "8 only in A" in text.splitlines()[-1]


def test_diff_still_matches_differently_held_parts_by_dotted_name(tmp_path):
    t = torch.arange(3.0)
    cases = [({"a.b": t, "c": 1}, {"a": {"b": t}, "c": 1}), ({"m": [t, 5]}, {"m": {"0": t, "1": 5}}),
             ({"x": {"a.b": {"c": t}}}, {"x": {"a": {"b.c": t}}})]
    for a, b in cases:
        report = ckconv.diff(a, b)
        assert report.equal and report.tensors_compared == 1 and report.notes, (a, report)
        assert not ckconv.diff(a, b, strict=True).equal
    report = ckconv.diff({"a.b": t}, {"a": {"b": t + 1}})
    assert [d.name for d in report.tensors_differ] == ["a.b"]


def test_a_name_that_repeats_a_long_key_at_every_level_is_shortened():
    key = "k" * 100_000
    node: object = torch.ones(1)
    for _ in range(50):
        node = {key: node}
    name = tree.short_path((key,) * 50)
    assert len(name) < tree.MAX_NAME_CHARS + 100 and "...<5000049 characters>..." in name
    assert tree.short_path(("a", 1, "b")) == "a.1.b" and tree.short_path(()) == "<root>"
    report = ckconv.diff(node, {key: {}})
    assert len(report.only_in_a) == 1 and len(report.only_in_a[0]) < tree.MAX_NAME_CHARS + 100


def test_a_walks_remembered_names_are_the_names_short_path_gives():
    """TreePath.name() joins a remembered parent name and a key (issue 24): the same text as short_path of the whole
    key tuple, at every length around the limit, for paths asked in any order (parents first or last)."""
    import random

    rng = random.Random(24)
    near = [tree.MAX_NAME_CHARS - 2, tree.MAX_NAME_CHARS - 1, tree.MAX_NAME_CHARS, tree.MAX_NAME_CHARS + 1]
    keys = ["a", "b.c", "", 3, -7, 2 ** 20_000, "x" * 30_000, *("k" * n for n in near)]
    for _ in range(400):
        path, made = tree.ROOT, []
        for _ in range(rng.randint(1, 12)):
            path = tree.TreePath(path, rng.choice(keys))
            made.append(path)
        rng.shuffle(made)
        for p in made + made:
            assert p.name() == tree.short_path(p.as_tuple()) == tree.short_path(p)
    assert tree.ROOT.name() == "<root>" == tree.short_path(tree.ROOT)
    long = tree.TreePath(tree.TreePath(tree.ROOT, "k" * tree.MAX_NAME_CHARS), "b")  # 65,538 characters: shortened
    assert "...<65538 characters>..." in long.name() and len(long.name()) < tree.MAX_NAME_CHARS + 100


def test_records_of_a_flat_state_dict_are_found_without_a_walk_but_within_its_node_limit(monkeypatch):
    """tree.foreign_objects answers a dict of tensors without walking it (issue 24), only where the walk would not
    have refused it: at MAX_NODES nodes (the root and its tensors) it is still refused."""
    ref = ckconv.model.TensorRef(ckconv.model.Storage("0", "float32", 4, buffer=bytearray(4)), "float32", (1,))
    monkeypatch.setattr(tree, "MAX_NODES", 10)
    assert tree.foreign_objects({str(i): ref for i in range(9)}) == []  # 10 nodes
    with pytest.raises(LimitExceeded, match="more than 10 objects"):
        tree.foreign_objects({str(i): ref for i in range(10)})
    od = OrderedDict(w=ref)  # its _metadata is walked: a record there is found
    od._metadata = OrderedDict({"": ckconv.model.foreign_class("somepkg", "Thing")()})
    assert tree.flat_tensors(od) is None and tree.foreign_objects(od) == [("@attrs._metadata.", "somepkg.Thing")]
