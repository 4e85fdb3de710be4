"""Third red-team pass: pickles a folder checkpoint's own loader runs, which ckconv's verdict did not see.

A folder is many pickles: each shard of a sharded ``.bin`` folder (``torch.load`` of every shard), each bytes item
of a DCP folder (``torch.load(weights_only=False)`` in DCP's ``load_bytes``) and DCP's ``.metadata``
(``pickle.load``). A payload whose result the pickle discards (``REDUCE POP``) never reaches the tree ckconv builds,
so only the pickle's own globals, with their roles, can say what loading it runs. Every case has its positive
control (the loader, in a subprocess, creates the canary file) and ckconv's answer: ``scan`` exits 1 naming the
global, ``convert`` refuses a dangerous one with one line and writes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckconv.cli import cli
from ckconv.model import Checkpoint
from ckconv.reports.inspection import verdicts

HOSTILE = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"
_spec = importlib.util.spec_from_file_location("make_hostile", HOSTILE / "make_hostile.py")
GEN = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(GEN)
CANARY = GEN.CANARY
FILE_HANDLER = GEN.call("logging", "FileHandler", CANARY) + b"0"  # opens (creates) the canary; result popped


def _dcp_folder(folder: Path, state) -> pickle.Unpickler:
    import torch.distributed.checkpoint as dcp
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # our own, just written


def _metadata_with(folder: Path, payload: bytes):
    """DCP's .metadata re-pickled (protocol 2 opcodes under a protocol 4 header, so dotted GLOBAL names resolve)
    with ``payload`` run first."""
    meta = _dcp_folder(folder, {"w": torch.zeros(2)})
    (folder / ".metadata").write_bytes(b"\x80\x04" + payload + pickle.dumps(meta, protocol=2)[2:])


def build_sharded(folder: Path):
    folder.mkdir()
    w = GEN.D((GEN.S("w"), GEN.tensor("0", 2, [2], [1])))
    v = GEN.D((GEN.S("v"), GEN.tensor("0", 2, [2], [1])))
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(GEN.torch_zip(GEN.P(FILE_HANDLER + w), {"0": b"\0" * 8}))
    (folder / "pytorch_model-00002-of-00002.bin").write_bytes(GEN.torch_zip(GEN.P(v), {"0": b"\0" * 8}))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": {
        "w": "pytorch_model-00001-of-00002.bin", "v": "pytorch_model-00002-of-00002.bin"}}))


def build_dcp_bytes_item(folder: Path):
    """A DCP bytes item (a non-tensor value) whose torch.save archive runs a payload and keeps only an int."""
    meta = _dcp_folder(folder, {"w": torch.zeros(2), "extra": {"a": 1}})
    crafted = GEN.torch_zip(GEN.P(FILE_HANDLER + b"K\x07"))
    (index, info), = [(i, s) for i, s in meta.storage_data.items() if i.fqn == "extra.a"]
    file = folder / info.relative_path
    meta.storage_data[index] = dataclasses.replace(info, offset=file.stat().st_size, length=len(crafted))
    with open(file, "ab") as f:
        f.write(crafted)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def build_dcp_mkdir(folder: Path):
    """DCP's own module, but a function of it called: FileSystem.mkdir(None, path) makes the folder."""
    _metadata_with(folder, b"ctorch.distributed.checkpoint.filesystem\nFileSystem.mkdir\n(N" + GEN.S(CANARY) + b"tR0")


def build_dcp_save(folder: Path):
    """save_state_dict({}, FileSystemWriter(path), None, 0, True): writes a whole checkpoint while loading one."""
    _metadata_with(folder, b"ctorch.distributed.checkpoint.state_dict_saver\nsave_state_dict\n(}"
                   b"ctorch.distributed.checkpoint.filesystem\nFileSystemWriter\n(" + GEN.S(CANARY)
                   + b"tRNK\x00\x88tR0")


def build_dcp_tofile(folder: Path):
    """numpy.ndarray.tofile, safe as a reference, called: writes the array to the canary."""
    array = pickle.dumps(np.zeros(2, dtype=np.uint8), protocol=2)[2:-1]
    _metadata_with(folder, b"cnumpy\nndarray.tofile\n(" + array + GEN.S(CANARY) + b"tR0")


TORCH_LOAD = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
DCP_LOAD = ("import sys, warnings, torch, torch.distributed.checkpoint as dcp; warnings.simplefilter('ignore');"
            "dcp.load({'w': torch.ones(2), 'extra': {'a': 5}}, checkpoint_id=sys.argv[1], no_dist=True)")
# name -> (builder, what torch runs: code and the file it loads (relative to the folder), scan's verdict, needle)
CASES = {
    "sharded_shard_payload": (build_sharded, TORCH_LOAD, "pytorch_model-00001-of-00002.bin", "UNKNOWN",
                              "logging.FileHandler"),
    "dcp_bytes_item_payload": (build_dcp_bytes_item, DCP_LOAD, ".", "UNKNOWN", "logging.FileHandler"),
    "dcp_metadata_filesystem_mkdir": (build_dcp_mkdir, DCP_LOAD, ".", "DANGEROUS",
                                      "torch.distributed.checkpoint.filesystem.FileSystem.mkdir"),
    "dcp_metadata_save_state_dict": (build_dcp_save, DCP_LOAD, ".", "DANGEROUS",
                                     "torch.distributed.checkpoint.state_dict_saver.save_state_dict"),
    "dcp_metadata_ndarray_tofile": (build_dcp_tofile, DCP_LOAD, ".", "DANGEROUS", "numpy.ndarray.tofile"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam3")
    out = {}
    for name, (build, *_) in CASES.items():
        build(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_positive_control_the_loader_runs_the_payload(name, folders, tmp_path):
    _, code, target, _, _ = CASES[name]
    path = (folders[name] / target).resolve()
    ran = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert (tmp_path / CANARY).exists(), f"torch did not run the payload of {name}: {ran.stderr[-2000:]}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_names_the_payload(name, folders, tmp_path):
    _, _, _, verdict, needle = CASES[name]
    result = CliRunner().invoke(cli, ["scan", str(folders[name])])
    assert result.exit_code == 1, result.output
    line = result.stdout.splitlines()[0]
    assert line.startswith(verdict) and needle in line, line
    assert not (Path.cwd() / CANARY).exists()


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n][3] == "DANGEROUS"))
def test_convert_refuses_a_dangerous_metadata(name, folders, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(folders[name]), str(out / "x.pth")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: refusing to load") and CASES[name][4] in lines[0], lines
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["sharded_shard_payload", "dcp_bytes_item_payload"])
def test_convert_output_runs_nothing(name, folders, tmp_path):
    """The discarded call is not in the tree: the converted file holds the weights and nothing that runs."""
    out = tmp_path / "out.pth"
    result = CliRunner().invoke(cli, ["convert", str(folders[name]), str(out)])
    assert result.exit_code == 0, result.output
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    subprocess.run([sys.executable, "-c", TORCH_LOAD, str(out)], cwd=sandbox, check=True, timeout=300)
    assert not (sandbox / CANARY).exists()


def test_a_name_called_in_one_file_and_referenced_in_another_is_called():
    """A folder's globals come from many pickles (DeepSpeed's rank files): the roles add up, the last does not win.
    ``numpy.ndarray.tofile`` referenced is safe, called it writes a file."""
    called = ("numpy", "ndarray.tofile", pickle_role("CALLED"))
    referenced = ("numpy", "ndarray.tofile", pickle_role("REFERENCED"))
    for order in ([called, referenced], [referenced, called]):
        found = verdicts(Checkpoint(root={}, format="deepspeed", path="x", globals=order))
        assert "numpy.ndarray.tofile" in found["unknown"] and "numpy.ndarray.tofile" not in found["safe"], found


def pickle_role(name):
    from ckconv.pickling.allowlist import Role

    return Role[name]


def test_canary_absent_from_the_test_folder():
    assert not (Path(os.getcwd()) / CANARY).exists()


# --- a torch.export archive that torch.load reads as a torch.save file -------------------------------------------

PT2_CONFIG = {"config": {"w": {"path_name": "weight_0", "is_param": True, "use_pickle": False, "tensor_meta": {
    "dtype": 7, "sizes": [{"as_int": 2}], "requires_grad": False, "device": {"type": "cpu"},
    "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}}}}


def pt2_polyglot(path: Path, pickle_name="archive/DATA.PKL"):
    """A .pt2 (archive_format, weights config, a weight) that also holds a data.pkl spelt in capitals: ckconv read it
    as torch.export (its data.pkl regex was case-sensitive) and said SAFE; torch.load finds the record ignoring case
    (miniz) and runs the pickle."""
    path.write_bytes(GEN.zip_bytes([
        ("archive/archive_format", b"pt2"), (pickle_name, GEN.P(GEN.call("os", "system", GEN.SHELL))),
        ("archive/data/weights/model_weights_config.json", json.dumps(PT2_CONFIG).encode()),
        ("archive/data/weights/weight_0", b"\0" * 8), ("archive/version", b"3\n")]))
    return path


@pytest.mark.parametrize("name", ["archive/DATA.PKL", "archive/Data.pkl"])
def test_pt2_with_a_data_pkl_in_capitals(name, tmp_path):
    src = pt2_polyglot(tmp_path / "m.pt2", name)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    subprocess.run([sys.executable, "-c", TORCH_LOAD, str(src)], cwd=sandbox, capture_output=True, timeout=300)
    assert (sandbox / CANARY).exists(), "torch did not run the payload: the fixture proves nothing"
    result = CliRunner().invoke(cli, ["scan", str(src)])
    assert result.exit_code == 1 and result.stdout.startswith("BROKEN") and "is stored as" in result.stdout, \
        result.output
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(src), str(out / "x.safetensors")])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "is stored as" in lines[0], result.output
    assert list(out.iterdir()) == []


def test_a_torch_file_whose_name_claims_nothing_is_still_scanned(tmp_path):
    """In a folder walk, files that are not checkpoints are skipped: one torch.load reads (its data.pkl in another
    case) is a checkpoint, whatever its name."""
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "weights.data").write_bytes(GEN.zip_bytes([
        ("archive/DATA.PKL", GEN.P(GEN.call("os", "system", GEN.SHELL))), ("archive/version", b"3\n")]))
    result = CliRunner().invoke(cli, ["scan", str(folder)])
    assert result.exit_code == 1 and "weights.data" in result.stdout and "BROKEN" in result.stdout, result.output


def test_pt2_forced_reading_refuses_a_data_pkl(tmp_path):
    from ckconv.errors import CorruptCheckpoint
    from ckconv.formats import torch_export

    src = pt2_polyglot(tmp_path / "m.pt2", "archive/data.pkl")
    with pytest.raises(CorruptCheckpoint, match="holding a data.pkl"):
        torch_export.read(src)


# --- a .metadata torch cannot read: DCP falls back to a rank's __0.metadata ----------------------------------------

def build_rank_fallback(folder: Path):
    """.metadata names a DCP class that does not exist (ckconv read it as an inert record); torch's pickle.load fails
    on it, and DCP reads ``__0.metadata`` instead, here one that runs a payload: two readings of one folder."""
    meta = _dcp_folder(folder, {"w": torch.zeros(2)})
    body = pickle.dumps(meta, protocol=2)[2:]
    (folder / "__0.metadata").write_bytes(b"\x80\x04" + FILE_HANDLER + body)
    (folder / ".metadata").write_bytes(b"\x80\x04ctorch.distributed.checkpoint.metadata\nNoSuchRecord\n)\x810" + body)


def test_dcp_metadata_torch_cannot_read_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    build_rank_fallback(folder)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    ran = subprocess.run([sys.executable, "-c", DCP_LOAD, str(folder)], cwd=sandbox, capture_output=True, text=True,
                         timeout=300)
    assert (sandbox / CANARY).exists(), f"torch did not fall back to __0.metadata: {ran.stderr[-2000:]}"
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(folder), str(out / "x.safetensors")])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "also holds __0.metadata" in lines[0], lines  # whatever makes torch fail on .metadata
    (folder / "__0.metadata").unlink()
    result = CliRunner().invoke(cli, ["convert", str(folder), str(out / "x.safetensors")])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "torch.distributed.checkpoint.metadata.NoSuchRecord" in lines[0], lines  # a name DCP does not define
    assert list(out.iterdir()) == []


def test_dcp_metadata_beside_a_rank_metadata_is_refused(tmp_path):
    """An enum value DCP does not define (torch's pickle.load raises) in a .metadata ckconv reads: with a
    __0.metadata beside it, torch reads that one instead."""
    folder = tmp_path / "ckpt"
    meta = _dcp_folder(folder, {"w": torch.zeros(2)})
    body = pickle.dumps(meta, protocol=2)[2:]
    (folder / "__0.metadata").write_bytes(b"\x80\x02" + body)
    (folder / ".metadata").write_bytes(
        b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n(K\x63tR0" + body)
    with pytest.raises(ValueError):
        pickle.loads((folder / ".metadata").read_bytes())  # what torch meets first
    result = CliRunner().invoke(cli, ["scan", str(folder)])
    assert result.exit_code == 1 and "also holds __0.metadata" in result.stdout, result.output


# --- a legacy torch.save file is five pickles, and torch.load runs every one -----------------------------------------

LEGACY_PARTS = ("magic", "protocol", "sys_info", "object", "storage_keys")


def legacy_with_payload_in(part: str) -> bytes:
    """A legacy (torch < 1.6) file of ``{"a": 1}`` with a popped payload at the start of one of its five pickles;
    ckconv judged only the fourth (the object)."""
    pickles = [pickle.dumps(0x1950A86A20F9469CFC6C, 2), pickle.dumps(1001, 2),
               pickle.dumps({"little_endian": True}, 2), pickle.dumps({"a": 1}, 2), pickle.dumps([], 2)]
    i = LEGACY_PARTS.index(part)
    pickles[i] = pickles[i][:2] + FILE_HANDLER + pickles[i][2:]
    return b"".join(pickles)


@pytest.mark.parametrize("part", LEGACY_PARTS)
def test_legacy_payload_in_any_of_its_pickles(part, tmp_path):
    src = tmp_path / "old.pth"
    src.write_bytes(legacy_with_payload_in(part))
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    ran = subprocess.run([sys.executable, "-c", TORCH_LOAD, str(src)], cwd=sandbox, capture_output=True, text=True,
                         timeout=300)
    assert (sandbox / CANARY).exists(), f"torch did not run the payload: {ran.stderr[-2000:]}"
    result = CliRunner().invoke(cli, ["scan", str(src)])
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("UNKNOWN") and "logging.FileHandler" in result.stdout.splitlines()[0], result.output


@pytest.mark.parametrize("module, refused", [("pathlib", False), ("pathlib._local", False), ("pathlib.evil", True),
                                             ("pathlib_evil", True)])
def test_dcp_metadata_path_classes_only_from_the_modules_that_define_them(module, refused, tmp_path):
    """A checkpoint_id pickles as ``pathlib.PosixPath`` (``pathlib._local`` from Python 3.13); any other module of
    that spelling is a global like every other, judged by the allowlist."""
    folder = tmp_path / "ckpt"
    meta = _dcp_folder(folder, {"w": torch.zeros(2)})
    body = pickle.dumps(meta, protocol=2)[2:]
    path = b"c" + module.encode() + b"\nPosixPath\n(X\x02\x00\x00\x00/atR0"  # called, then popped
    (folder / ".metadata").write_bytes(b"\x80\x02" + path + body)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(folder), str(out / "x.safetensors")])
    if refused:
        assert result.exit_code == 1 and f"{module}.PosixPath" in result.stderr, result.output
        assert list(out.iterdir()) == []
    else:
        assert result.exit_code == 0, result.output
