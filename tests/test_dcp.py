"""torch.distributed.checkpoint (DCP) folders: reading (lazy, restricted), writing, multi-rank conversion, memory.

Run as a script under torchrun (``torchrun --nproc-per-node 2 tests/test_dcp.py SPEC``) this file is also the
driver of the two-rank test: see ``_driver`` at the end.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from helpers import assert_deep_equal

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REPO = Path(__file__).resolve().parents[1]


# --- building checkpoints ----------------------------------------------------------------------------------

def small_run():
    """-> (model, optimizer, bundle): a training bundle of model state_dict (OrderedDict with _metadata), Adam state
    (int keys), scalars, tuples; and the live model and optimizer it was saved from."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    return model, opt, {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 3, "best": 0.25,
                        "history": [0.5, 0.25], "tag": ("run", 7), "extra": {"note": "hello", "empty": {}}}


def small_bundle():
    return small_run()[2]


def dcp_save(state, folder):
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def torch_reference(folder, tmp_path):
    """What torch's own converter makes of a DCP folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"ref-{Path(folder).name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)


def write_chunked_dcp(folder, tensors, boxes, extra=None, files=2):
    """A DCP folder whose tensors are split into chunks across ``files`` .distcp files, as sharded saves make them.

    ``tensors``: fqn -> full tensor; ``boxes``: fqn -> [(offsets, sizes)]; ``extra``: fqn -> non-tensor value.
    Uses torch's own metadata classes, and torch.save per item as FileSystemWriter does.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    folder = Path(folder)
    folder.mkdir()
    streams = [io.BytesIO() for _ in range(files)]
    sdm, storage, n = {}, {}, 0

    def put(obj):
        nonlocal n
        f = streams[n % files]
        name = f"__{n % files}_0.distcp"
        n += 1
        start = f.tell()
        torch.save(obj, f)
        return _StorageInfo(name, start, f.tell() - start)

    for fqn, value in (extra or {}).items():
        sdm[fqn] = BytesStorageMetadata()
        buf = io.BytesIO()
        torch.save(value, buf)
        storage[MetadataIndex(fqn)] = put_bytes(streams, n % files, buf.getvalue())
        n += 1
    for fqn, t in tensors.items():
        chunks = []
        for offs, sizes in boxes.get(fqn, [((0,) * t.dim(), tuple(t.shape))]):
            piece = t[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].clone()
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(sizes)))
            storage[MetadataIndex(fqn, offs)] = put(piece)
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape, chunks)
    planner = {fqn: tuple(fqn.split(".")) for fqn in sdm}
    md = Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage, version="1.0.0")
    for i, s in enumerate(streams):
        (folder / f"__{i}_0.distcp").write_bytes(s.getvalue())
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return folder


def put_bytes(streams, i, data):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    start = streams[i].tell()
    streams[i].write(data)
    return _StorageInfo(f"__{i}_0.distcp", start, len(data))


def nested(flat):
    out: dict = {}
    for fqn, v in flat.items():
        *head, last = fqn.split(".")
        cur = out
        for h in head:
            cur = cur.setdefault(h, {})
        cur[last] = v
    return out


def invoke(*args):
    from click.testing import CliRunner

    from ckconv.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


# --- reading ------------------------------------------------------------------------------------------------

def test_reads_torch_written_dcp_lazily_like_dcp_to_torch_save(tmp_path):
    import ckconv
    from ckconv import api, tree
    from ckconv.formats.dcp.chunked import DcpTensorStorage

    folder = dcp_save(small_bundle(), tmp_path / "ckpt")
    assert api.detect_format(folder) == "dcp"
    ckpt = api.read(folder)
    refs = [ref for _, ref in tree.tensors(ckpt.root)]
    assert refs and all(isinstance(r.storage, DcpTensorStorage) for r in refs)
    assert all(p._ref is None for r in refs for p in r.storage.pieces)  # no chunk archive opened yet
    assert_deep_equal(ckconv.load(folder), torch_reference(folder, tmp_path))


def test_convert_dcp_to_safetensors_and_pth(tmp_path):
    import ckconv

    folder = dcp_save(small_bundle(), tmp_path / "ckpt")
    expected = torch_reference(folder, tmp_path)
    result = invoke("convert", folder, tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    assert "(dcp) ->" in result.stdout
    assert_deep_equal(ckconv.load(tmp_path / "out.safetensors"), expected)
    assert invoke("convert", folder, tmp_path / "out.pth").exit_code == 0
    assert_deep_equal(torch.load(tmp_path / "out.pth", weights_only=True), expected)
    result = invoke("convert", folder, tmp_path / "model.safetensors", "--model-only", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    model = load_file(tmp_path / "model.safetensors")
    assert list(model) == list(expected["model"])
    assert model["0.weight"].dtype == torch.bfloat16
    assert model["1.num_batches_tracked"].dtype == torch.int64


def test_pth_to_dcp_round_trip_is_exact_and_torch_reads_it(tmp_path):
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import ckconv

    model, opt, bundle = small_run()
    bundle["tied"] = {"a": bundle["model"]["0.weight"], "b": bundle["model"]["0.weight"]}
    bundle["param"] = torch.nn.Parameter(torch.ones(3))
    bundle[5] = OrderedDict(z=torch.zeros(2, dtype=torch.bfloat16), y=[1, 2, {"k": torch.arange(4)}])
    torch.save(bundle, tmp_path / "in.pth")
    result = invoke("convert", tmp_path / "in.pth", tmp_path / "out", "--to", "dcp")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "out")) == [".metadata", "__0_0.distcp"]
    source = torch.load(tmp_path / "in.pth", weights_only=False)
    back = ckconv.load(tmp_path / "out")
    assert_deep_equal(back, source)  # OrderedDict + _metadata, int keys, tuples, empty dicts, Parameter
    assert back["tied"]["a"].data_ptr() == back["tied"]["b"].data_ptr()  # ties survive
    assert back["model"]._metadata == source["model"]._metadata

    # torch sees what it would have written itself (the optimizer keyed by parameter name, as torch's distributed
    # state_dict API saves it), and loads it into a live model
    plain = {k: (v.detach() if k == "param" else v) for k, v in bundle.items()}
    plain["optim"] = get_optimizer_state_dict(model, opt)
    assert set(plain["optim"]["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    theirs = dcp_save(plain, tmp_path / "theirs")
    ours_via_torch = torch_reference(tmp_path / "out", tmp_path)
    ours_via_torch["param"] = ours_via_torch["param"].detach()
    assert_deep_equal(ours_via_torch, torch_reference(theirs, tmp_path))
    target = {"model": {k: torch.zeros_like(v) for k, v in bundle["model"].items()}}
    dcp.load(target, checkpoint_id=str(tmp_path / "out"), no_dist=True)
    assert_deep_equal(target["model"], dict(bundle["model"]))


def test_dtypes_shapes_and_dcp_to_dcp(tmp_path):
    import ckconv

    state = {
        "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]),
        "i8": torch.arange(-3, 3, dtype=torch.int8), "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        "f8": torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn), "c128": torch.randn(3, dtype=torch.complex128),
        "view": torch.arange(24.0).reshape(4, 6)[:, 1:4], "t": torch.arange(6.0).reshape(2, 3).t(),
    }
    torch.save(state, tmp_path / "in.pth")
    assert invoke("convert", tmp_path / "in.pth", tmp_path / "a", "--to", "dcp").exit_code == 0
    assert invoke("convert", tmp_path / "a", tmp_path / "b", "--to", "dcp").exit_code == 0
    for name in ("a", "b"):
        assert_deep_equal(ckconv.load(tmp_path / name), state)
        assert_deep_equal(torch_reference(tmp_path / name, tmp_path), state)


def test_chunked_tensors_assemble_exactly(tmp_path):
    import ckconv
    from ckconv import api

    g = torch.Generator().manual_seed(1)
    tensors = {
        "m.rows": torch.randn(10, 6, generator=g),
        "m.cols": torch.randn(5, 9, generator=g).to(torch.bfloat16),
        "m.grid": torch.arange(7 * 8, dtype=torch.int32).reshape(7, 8),
        "m.cube": torch.randn(4, 3, 5, generator=g, dtype=torch.float64),
        "m.vec": torch.arange(11, dtype=torch.int64),
        "m.whole": torch.randn(3, 3, generator=g),
    }
    boxes = {
        "m.rows": [((0, 0), (4, 6)), ((4, 0), (6, 6))],
        "m.cols": [((0, 0), (5, 2)), ((0, 2), (5, 4)), ((0, 6), (5, 3))],
        "m.grid": [((0, 0), (3, 5)), ((0, 5), (3, 3)), ((3, 0), (4, 5)), ((3, 5), (4, 3))],
        "m.cube": [((0, 0, 0), (2, 3, 5)), ((2, 0, 0), (2, 1, 5)), ((2, 1, 0), (2, 2, 2)), ((2, 1, 2), (2, 2, 3))],
        "m.vec": [((6,), (5,)), ((0,), (6,))],
    }
    folder = write_chunked_dcp(tmp_path / "ck", tensors, boxes, extra={"step": 12})
    expected = nested({"step": 12, **tensors})
    assert_deep_equal(torch_reference(folder, tmp_path), expected)  # torch agrees it is a valid checkpoint
    assert_deep_equal(ckconv.load(folder), expected)
    # every byte range, in small blocks (blocks run along an inner dimension when a row is larger)
    ckpt = api.read(folder)
    for name, t in tensors.items():
        ref = ckpt.root["m"][name.split(".")[1]]
        full = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        for size in (ref.storage.nbytes, 8, 24, 5 * t.element_size()):
            for start, length in ((0, len(full)), (3, len(full) - 7), (len(full) // 2, 5)):
                got = b"".join(bytes(c) for c in ref.storage.chunks(start, length, size))
                assert got == full[start:start + length], (name, size, start, length)
    assert invoke("convert", folder, tmp_path / "out.safetensors").exit_code == 0
    assert_deep_equal(ckconv.load(tmp_path / "out.safetensors"), expected)


def test_arch_remapping_with_dcp_in_and_out(tmp_path):
    import torchvision

    import ckconv

    model = torchvision.models.squeezenet1_0()
    dcp_save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 2}, tmp_path / "in")
    result = invoke("convert", tmp_path / "in", tmp_path / "out", "--to", "dcp", "--arch", "squeezenet1_0")
    assert result.exit_code == 0, result.output
    out = ckconv.load(tmp_path / "out")
    assert out["epoch"] == 2
    fresh = torchvision.models.squeezenet1_0()
    fresh.load_state_dict(out["model"])  # --arch writes the torch layout {'model': ...} (issue 13)
    assert_deep_equal(dict(fresh.state_dict()), dict(model.state_dict()))


def test_bundle_through_dcp_restores_a_live_model_optimizer_and_scheduler(tmp_path):
    import ckconv

    def build():
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        model[0].weight.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 3)

    model, opt, sched = build()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    ckconv.save_bundle(tmp_path / "b.pth", model=model, optimizer=opt, scheduler=sched)
    assert invoke("convert", tmp_path / "b.pth", tmp_path / "b", "--to", "dcp").exit_code == 0
    model2, opt2, sched2 = build()
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    ckconv.load_bundle(tmp_path / "b", model=model2, optimizer=opt2, scheduler=sched2)
    assert_deep_equal(model2.state_dict(), model.state_dict())
    assert_deep_equal(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()


def test_inspect_reads_metadata_not_tensor_data(tmp_path):
    folder = dcp_save({"model": torch.nn.Linear(64, 32).state_dict(), "epoch": 1}, tmp_path / "ckpt")
    from ckconv.formats.dcp.metadata import load_metadata

    file, off, length = load_metadata(folder).locations[("model.weight", (0, 0))]
    with open(file, "r+b") as f:  # scribble over the weight's bytes (its archive's CRC would catch a read)
        f.seek(off + length - 2048)
        f.write(b"\xff" * 1024)
    result = invoke("inspect", folder)
    assert result.exit_code == 0, result.output
    assert "dcp checkpoint" in result.stdout and "model.weight" in result.stdout and "32x64" in result.stdout
    result = invoke("convert", folder, tmp_path / "out.safetensors")
    assert result.exit_code == 1
    assert "CRC mismatch" in result.stderr and not (tmp_path / "out.safetensors").exists()


# --- hostile and broken folders -----------------------------------------------------------------------------

def _tamper(folder, change):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    with open(folder / ".metadata", "rb") as f:
        md = pickle.load(f)
    change(md, _StorageInfo)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def _first(md, fqn):
    return next(k for k in md.storage_data if k.fqn == fqn)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


CASES = {
    "outside": (lambda md, SI: md.storage_data.update({_first(md, "w"): SI("../evil.distcp", 0, 10)}), "outside"),
    "absolute": (lambda md, SI: md.storage_data.update({_first(md, "w"): SI("/etc/passwd", 0, 10)}), "outside"),
    "past_end": (lambda md, SI: md.storage_data.update({_first(md, "w"): SI("__0_0.distcp", 0, 10**9)}),
                 "truncated"),
    "missing_file": (lambda md, SI: md.storage_data.update({_first(md, "w"): SI("__7_0.distcp", 0, 1)}), "missing"),
    "transform": (lambda md, SI: setattr(md.storage_data[_first(md, "w")], "transform_descriptors", ["zstd"]),
                  "transforms"),
    "overlap": (lambda md, SI: md.state_dict_metadata["w"].chunks.append(md.state_dict_metadata["w"].chunks[0]),
                "overlap"),
    "no_storage": (lambda md, SI: md.storage_data.pop(_first(md, "w")), "no storage entry"),
    "os_system": (lambda md, SI: setattr(md, "planner_data", _Boom()), "refusing"),
    "bad_path": (lambda md, SI: md.planner_data.update({"v": ("w", "x")}), "runs through"),
    "collision": (lambda md, SI: md.planner_data.update({"v": ("w",)}), "collides"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_metadata_is_refused(tmp_path, case):
    from ckconv import api

    folder = dcp_save({"w": torch.ones(4), "v": torch.zeros(2), "n": 1, "e": {"w": 2}}, tmp_path / "ckpt")
    change, message = CASES[case]
    _tamper(folder, change)
    with pytest.raises(Exception) as info:
        api.read(folder).root and api.load(folder)
    assert message in str(info.value), str(info.value)
    assert type(info.value).__module__ == "ckconv.errors"
    assert not (Path("/tmp") / "pwned").exists()


def test_an_archive_with_overlapping_records_inside_a_distcp_is_refused(tmp_path):
    """Every torch.save archive inside a .distcp gets all the checks a .pth file gets; here two records share
    bytes (the "overlapping files" zip bomb layout), in an archive that starts partway into the file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    from ckconv import api
    from ckconv.errors import CorruptCheckpoint

    hostile = (REPO / "fixtures" / "hostile" / "overlapping_records.pth").read_bytes()
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64 + hostile)
    md = Metadata(state_dict_metadata={"v": BytesStorageMetadata()}, planner_data={"v": ("v",)},
                  storage_data={MetadataIndex("v"): _StorageInfo("__0_0.distcp", 64, len(hostile))},
                  version="1.0.0")
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CorruptCheckpoint, match="overlaps"):
        api.read(folder)


def test_code_in_a_stored_value_is_refused(tmp_path):
    from ckconv import api
    from ckconv.errors import UnsafeCheckpoint

    folder = write_chunked_dcp(tmp_path / "ck", {"w": torch.ones(2)}, {}, extra={"evil": _Boom()})
    with pytest.raises(UnsafeCheckpoint, match="posix.system|os.system"):
        api.read(folder)


def test_wrong_inputs_are_clear(tmp_path):
    from ckconv import api
    from ckconv.errors import UnsupportedContent

    (tmp_path / "plain").mkdir()
    result = invoke("inspect", tmp_path / "plain")
    assert result.exit_code == 1 and "not a readable checkpoint" in result.stderr
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    result = invoke("convert", tmp_path / "list.pth", tmp_path / "out", "--to", "dcp")
    assert result.exit_code == 1 and "top level" in result.stderr and not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedContent, match="both named"):
        api.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, tmp_path / "clash", format="dcp")


# --- memory ---------------------------------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy  # noqa: F401  (assembles chunked tensors)
    import ckconv.api, ckconv.bundles, ckconv.storage.fastcopy, ckconv.formats.dcp, ckconv.plugins, ckconv.contents.sections
    ckconv.plugins.host()

    def vm(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    src, dst, headroom, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    base = vm("VmSize")  # everything the conversion needs is imported: the limit is what it may add
    resource.setrlimit(resource.RLIMIT_AS, (base + headroom, base + headroom))
    try:
        bytearray(total)
        sys.exit("the limit does not hold a checkpoint-sized buffer back")
    except MemoryError:
        pass
    ckconv.api.convert(src, dst)
    print(json.dumps({"base": base, "peak": vm("VmPeak"), "torch": "torch" in sys.modules}))
""")


def test_converting_a_checkpoint_larger_than_the_memory_limit(tmp_path):
    """dcp -> safetensors under RLIMIT_AS = (address space after imports) + 48 MB, for a 128 MB checkpoint whose
    two tensors are 64 MB each, one of them in four chunks: nothing may be materialised."""
    from safetensors import safe_open

    n = 16 << 20
    a = torch.arange(n, dtype=torch.float32).reshape(4096, -1)
    b = torch.arange(n, dtype=torch.int32).reshape(1024, -1)
    cols = b.shape[1] // 4
    folder = write_chunked_dcp(tmp_path / "big", {"a": a, "b": b},
                               {"b": [((0, i * cols), (1024, cols)) for i in range(4)]}, extra={"step": 1})
    headroom, total = 48 << 20, a.nbytes + b.nbytes
    env = {**os.environ, "CKCONV_LOAD_PLUGINS": "", "MALLOC_ARENA_MAX": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, folder, tmp_path / "out.safetensors", str(headroom),
                           str(total)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not stats["torch"] and stats["peak"] - stats["base"] < headroom
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)


# --- two ranks under torchrun ---------------------------------------------------------------------------------

DIST_CONVERSIONS = [  # (name, ckconv convert arguments relative to the work folder)
    ("sharded", ["torch_dcp", "dist/sharded", "--max-shard-size", "3KB"]),
    ("dcp", ["bundle.pth", "dist/dcp", "--to", "dcp"]),
    ("chunked", ["chunked_dcp", "dist/chunked.safetensors"]),
    ("pth", ["chunked_dcp", "dist/chunked.pth"]),
    ("dtensor", ["dtensor_dcp", "dist/dtensor.safetensors"]),
    ("exists", ["bundle.pth", "dist/dcp", "--to", "dcp"]),
]


def _dtensor_state():
    g = torch.Generator().manual_seed(3)
    return {"w0": torch.randn(6, 4, generator=g), "w1": torch.randn(3, 8, generator=g).to(torch.bfloat16),
            "b": torch.arange(5.0)}


def _driver(work):
    """Each rank: run CLI conversions the way ``torchrun -m ckconv convert ...`` does (the first starts the process
    group, later ones reuse it), save a DTensor-sharded checkpoint with DCP on that group and convert it too.
    Exit codes go to rank<N>.json."""
    import runpy

    import torch.distributed as dist

    work = Path(work)
    os.chdir(work)
    codes = {}

    def ckconv(name, args):
        sys.argv = ["ckconv", "convert", *args]
        try:
            runpy.run_module("ckconv", run_name="__main__", alter_sys=True)
            codes[name] = 0
        except SystemExit as exc:
            codes[name] = exc.code if isinstance(exc.code, int) else 1

    for name, args in DIST_CONVERSIONS[:4]:
        ckconv(name, args)
    assert dist.is_initialized()  # started by ckconv for the first conversion
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import torch.distributed.checkpoint as dcp

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = _dtensor_state()
    state = {"model": {"w0": distribute_tensor(full["w0"], mesh, [Shard(0)]),
                       "w1": distribute_tensor(full["w1"], mesh, [Shard(1)]),
                       "b": distribute_tensor(full["b"], mesh, [Replicate()])}, "step": 7}
    dcp.save(state, checkpoint_id="dtensor_dcp")
    dist.barrier()
    for name, args in DIST_CONVERSIONS[4:]:
        ckconv(name, args)
    dist.barrier()
    dist.destroy_process_group()
    Path(f"rank{os.environ['RANK']}.json").write_text(json.dumps(codes))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # one torchrun launch: about 20 s of its 35 s is three processes importing torch
def test_two_ranks_under_torchrun_match_one_process(tmp_path):
    import ckconv
    from ckconv import api

    work = tmp_path
    bundle = small_bundle()
    torch.save(bundle, work / "bundle.pth")
    dcp_save(bundle, work / "torch_dcp")
    g = torch.Generator().manual_seed(2)
    chunked = {"m.a": torch.randn(8, 6, generator=g), "m.b": torch.arange(30, dtype=torch.int16).reshape(5, 6)}
    write_chunked_dcp(work / "chunked_dcp", chunked, {"m.a": [((0, 0), (8, 2)), ((0, 2), (8, 4))],
                                                       "m.b": [((0, 0), (2, 6)), ((2, 0), (3, 6))]}, extra={"it": 4})
    (work / "dist").mkdir()
    path = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "CKCONV_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this tree's ckconv
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", __file__, str(work)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected_codes = {name: 0 for name, _ in DIST_CONVERSIONS} | {"exists": 1}
    assert codes == [expected_codes, expected_codes], codes
    assert proc.stdout.count("Converted ") == len(DIST_CONVERSIONS) - 1  # rank 0 reports, rank 1 stays quiet
    assert "already exists" in proc.stderr

    # the same conversions in one process
    single = work / "single"
    single.mkdir()
    for name, args in DIST_CONVERSIONS[:-1]:
        src, dst, *rest = args
        result = invoke("convert", work / src, single / Path(dst).name, *rest)
        assert result.exit_code == 0, (name, result.output)

    def files(root):
        root = Path(root)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
            if root.is_dir() else {"": root.read_bytes()}

    for name in ("sharded/", "chunked.safetensors", "dtensor.safetensors"):  # byte for byte
        a, b = files(work / "dist" / name), files(single / name)
        assert a == b, name
    assert len(files(work / "dist" / "sharded")) > 2  # several shards, written by both ranks, plus the index
    assert_deep_equal(ckconv.load(work / "dist" / "chunked.pth"), ckconv.load(single / "chunked.pth"))
    assert_deep_equal(ckconv.load(work / "dist" / "chunked.pth"), nested({"it": 4, **chunked}))

    # dcp written by two ranks: one file per rank, both with a share; same content as one process wrote
    out = work / "dist" / "dcp"
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert all((out / f"__{r}_0.distcp").stat().st_size > 1000 for r in (0, 1))
    assert_deep_equal(ckconv.load(out), torch.load(work / "bundle.pth", weights_only=False))
    assert_deep_equal(torch_reference(out, tmp_path), torch_reference(single / "dcp", tmp_path))

    # the DTensor-sharded checkpoint torch wrote on two ranks reads as the full tensors
    full = _dtensor_state()
    assert len(api.read(work / "dtensor_dcp").root["model"]["w1"].storage.pieces) == 2
    expected = {"model": {"w0": full["w0"], "w1": full["w1"], "b": full["b"]}, "step": 7}
    assert_deep_equal(ckconv.load(work / "dtensor_dcp"), expected)
    assert_deep_equal(torch_reference(work / "dtensor_dcp", tmp_path), expected)
    assert_deep_equal(ckconv.load(work / "dist" / "dtensor.safetensors"), expected)


if __name__ == "__main__":  # torchrun tests/test_dcp.py WORK: see _driver
    _driver(sys.argv[1])


def test_inspect_names_code_in_a_dcp_folder_without_running_it(tmp_path):
    from click.testing import CliRunner

    from ckconv.cli import cli

    folder = write_chunked_dcp(tmp_path / "ck", {"w": torch.ones(2)}, {}, extra={"evil": _Boom()})
    run = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert run.exit_code == 1, run.output  # dangerous: the report is printed, and a CI gate sees the status
    assert "DANGEROUS" in run.stdout and "system" in run.stdout
    assert not (Path("/tmp") / "pwned").exists()
