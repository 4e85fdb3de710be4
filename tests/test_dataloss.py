"""No data loss, ever (issue 14): an existing destination folder keeps every file ckconv does not own, the source is
never overwritten or removed (even with --force), and a refusal or a failure leaves the tree byte for byte as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv.storage import atomic
from ckconv.cli import cli
from ckconv.errors import OutputExists, UsageError, WriteFailed
from ckconv.formats import safetensors_file as sf
from helpers import assert_deep_equal

INDEX = sf.LAYOUT.index


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (hidden ones included): file hashes, link targets, folders."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def refused(result, *needles, code=1):
    assert result.exit_code == code, result.output  # 2 for a usage error
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(8)}  # 16 KiB each


@pytest.fixture
def model_folder(tmp_path):
    """A huggingface-style model folder: config.json, the torch checkpoint, a README."""
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(weights(), hf / "pytorch_model.bin")
    (hf / "config.json").write_text('{"model_type": "toy"}\n')
    (hf / "README.md").write_text("my notes\n")
    return hf


def shards_in(folder: Path):
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def named_by_index(folder: Path):
    return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))


# --- sharded output into an existing folder ----------------------------------------------------------------

def test_sharded_into_a_model_folder_keeps_user_files_and_the_source(model_folder):
    before = snapshot(model_folder)
    result = invoke("convert", model_folder / "pytorch_model.bin", model_folder, "--max-shard-size", "40KB")
    assert result.exit_code == 0, result.output
    after = snapshot(model_folder)
    for name in ("config.json", "README.md", "pytorch_model.bin"):
        assert after[name] == before[name], name
    assert len(shards_in(model_folder)) == 4 and named_by_index(model_folder) == shards_in(model_folder)
    assert set(after) == set(before) | {INDEX, *shards_in(model_folder)}, "a temp file or folder was left behind"
    assert_deep_equal(ckconv.load(model_folder / INDEX), weights())


def test_force_over_an_earlier_sharded_output_replaces_only_what_its_index_named(model_folder):
    src = model_folder / "pytorch_model.bin"
    assert invoke("convert", src, model_folder, "--max-shard-size", "40KB").exit_code == 0
    old = shards_in(model_folder)
    assert len(old) == 4
    (model_folder / "model-00009-of-00009.safetensors").write_bytes(b"a shard no index names: not ours")
    user = snapshot(model_folder)
    result = invoke("convert", src, model_folder, "--max-shard-size", "70KB", "--force")
    assert result.exit_code == 0, result.output
    after = snapshot(model_folder)
    new = named_by_index(model_folder)
    assert new == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not any((model_folder / n).exists() for n in old), "stale shards named by the old index were kept"
    for name in ("config.json", "README.md", "pytorch_model.bin", "model-00009-of-00009.safetensors"):
        assert after[name] == user[name], name
    assert set(after) == {"config.json", "README.md", "pytorch_model.bin", "model-00009-of-00009.safetensors",
                          INDEX, *new}
    assert_deep_equal(ckconv.load(model_folder / INDEX), weights())


def test_without_force_an_earlier_output_is_refused_before_writing(model_folder, monkeypatch):
    src = model_folder / "pytorch_model.bin"
    assert invoke("convert", src, model_folder, "--max-shard-size", "40KB").exit_code == 0
    before = snapshot(model_folder)
    monkeypatch.setattr(sf, "write_file", lambda *a, **k: pytest.fail("wrote a shard before refusing"))
    line = refused(invoke("convert", src, model_folder, "--max-shard-size", "70KB"), "already exists", "--force")
    assert INDEX in line
    assert snapshot(model_folder) == before


def test_one_shard_over_an_earlier_sharded_output_removes_the_old_index(model_folder):
    """model.safetensors beside a stale index would be read as the old checkpoint: the index goes too."""
    src = model_folder / "pytorch_model.bin"
    assert invoke("convert", src, model_folder, "--max-shard-size", "40KB").exit_code == 0
    torch.save(weights(1), src)
    result = invoke("convert", src, model_folder, "--max-shard-size", "10GB", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in model_folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                              "pytorch_model.bin"]
    assert_deep_equal(ckconv.load(model_folder / "model.safetensors"), weights(1))


def test_an_index_naming_other_files_never_costs_them(model_folder):
    """A hand-edited (or hostile) old index naming config.json or a file outside: neither is touched."""
    outside = model_folder.parent / "outside.safetensors"
    outside.write_bytes(b"not in the folder")
    (model_folder / "notes.safetensors.txt").write_bytes(b"mine")
    (model_folder / INDEX).write_text(json.dumps({"weight_map": {
        "a": "config.json", "b": "../outside.safetensors", "c": "notes.safetensors.txt", "d": "/etc/passwd"}}))
    before = snapshot(model_folder.parent)
    result = invoke("convert", model_folder / "pytorch_model.bin", model_folder, "--max-shard-size", "40KB",
                    "--force")
    assert result.exit_code == 0, result.output
    after = snapshot(model_folder.parent)
    for rel in ("hf/config.json", "hf/README.md", "hf/pytorch_model.bin", "hf/notes.safetensors.txt",
                "outside.safetensors"):
        assert after[rel] == before[rel], rel
    assert named_by_index(model_folder) == shards_in(model_folder)


def test_dcp_into_an_existing_folder_replaces_the_rank_files_its_metadata_named(tmp_path):
    from ckconv.formats.dcp import write as dcp

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    bundle = {"model": weights(), "step": 3}
    plan = dcp.plan_write(ckconv.io.as_checkpoint(bundle).root, world=2)  # an earlier two-rank output
    locations = {}
    for rank in (0, 1):
        locations.update(dcp.write_rank_file(out, rank, plan.blobs_for(rank)))
    dcp.write_metadata(out, plan, locations)
    (out / "__7_0.distcp").write_bytes(b"named by no metadata")
    assert dcp.earlier_output(out) == ["__0_0.distcp", "__1_0.distcp"]
    torch.save(bundle, tmp_path / "in.pth")
    before = snapshot(out)
    refused(invoke("convert", tmp_path / "in.pth", out, "--to", "dcp"), "already exists", ".metadata")
    assert snapshot(out) == before
    result = invoke("convert", tmp_path / "in.pth", out, "--to", "dcp", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == [".metadata", "__0_0.distcp", "__7_0.distcp", "config.json"]
    assert snapshot(out)["__7_0.distcp"] == before["__7_0.distcp"]
    assert snapshot(out)["config.json"] == before["config.json"]
    assert_deep_equal(ckconv.load(out), bundle)


# --- single-file output into a folder: cp semantics ---------------------------------------------------------

def test_single_file_into_a_folder_is_named_like_cp_does(tmp_path):
    torch.save(weights(), tmp_path / "x.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = invoke("convert", tmp_path / "x.pth", out, "--to", "safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["destination"] == str(out / "x.safetensors")
    assert sorted(os.listdir(out)) == ["config.json", "x.safetensors"]
    assert_deep_equal(ckconv.load(out / "x.safetensors"), weights())
    before = snapshot(tmp_path)
    refused(invoke("convert", tmp_path / "x.pth", out, "--to", "safetensors"),
            f"{out / 'x.safetensors'} already exists; pass --force")
    assert snapshot(tmp_path) == before
    torch.save(weights(2), tmp_path / "x.pth")
    assert invoke("convert", tmp_path / "x.pth", out, "--to", "safetensors", "--force").exit_code == 0
    assert_deep_equal(ckconv.load(out / "x.safetensors"), weights(2))
    assert sorted(os.listdir(out)) == ["config.json", "x.safetensors"]
    # a torch output keeps the source's own torch extension
    (tmp_path / "bins").mkdir()
    torch.save(weights(), tmp_path / "pytorch_model.bin")
    assert invoke("convert", tmp_path / "pytorch_model.bin", tmp_path / "bins", "--to", "torch").exit_code == 0
    assert os.listdir(tmp_path / "bins") == ["pytorch_model.bin"]


def test_single_file_into_a_folder_where_that_name_is_a_folder_is_refused(tmp_path):
    torch.save(weights(), tmp_path / "x.pth")
    (tmp_path / "out" / "x.safetensors").mkdir(parents=True)
    (tmp_path / "out" / "x.safetensors" / "keep").write_text("mine")
    before = snapshot(tmp_path)
    refused(invoke("convert", tmp_path / "x.pth", tmp_path / "out", "--to", "safetensors", "--force"),
            "is a folder")
    assert snapshot(tmp_path) == before


def test_saving_torch_objects_into_a_folder_asks_for_a_file_name(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="name the output file"):
        ckconv.save(weights(), tmp_path, format="safetensors", force=True)
    assert snapshot(tmp_path) == before


# --- the source is sacred ------------------------------------------------------------------------------------

def test_src_equals_dst_is_refused_even_with_force(tmp_path):
    torch.save(weights(), tmp_path / "x.pth")
    before = snapshot(tmp_path)
    refused(invoke("convert", tmp_path / "x.pth", tmp_path / "x.pth", "--force"), "is the source", "never")
    os.link(tmp_path / "x.pth", tmp_path / "hardlink.pth")  # another name, same inode
    (tmp_path / "symlink.pth").symlink_to("x.pth")
    before = snapshot(tmp_path)
    for other in ("hardlink.pth", "symlink.pth"):
        refused(invoke("convert", tmp_path / "x.pth", tmp_path / other, "--force"), "is the source")
    refused(invoke("convert", tmp_path / "hardlink.pth", tmp_path / "./x.pth", "--force"), "is the source")
    assert snapshot(tmp_path) == before


def test_a_sharded_source_folder_is_never_its_own_destination(tmp_path):
    torch.save(weights(), tmp_path / "x.pth")
    hf = tmp_path / "hf"
    assert invoke("convert", tmp_path / "x.pth", hf, "--max-shard-size", "40KB").exit_code == 0
    before = snapshot(tmp_path)
    refused(invoke("convert", hf, hf, "--max-shard-size", "70KB", "--force"), "is the source")
    refused(invoke("convert", hf / INDEX, hf, "--max-shard-size", "40KB", "--force"), "is the source")
    # a file inside the source that the source reads from
    refused(invoke("convert", hf, hf / "model-00002-of-00004.safetensors", "--force"), "is the source")
    assert snapshot(tmp_path) == before


def test_sharding_a_model_file_in_its_own_folder_is_refused(tmp_path):
    """DIR/model.safetensors -> DIR --max-shard-size: the output's layout would replace the source."""
    hf = tmp_path / "hf"
    hf.mkdir()
    ckconv.save(weights(), hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    line = refused(invoke("convert", hf / "model.safetensors", hf, "--max-shard-size", "40KB", "--force"),
                   "is the source")
    assert "model.safetensors" in line
    assert snapshot(tmp_path) == before


def test_single_file_into_the_folder_holding_a_same_named_source_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ckconv.save(weights(), out / "x.safetensors")
    before = snapshot(tmp_path)
    refused(invoke("convert", out / "x.safetensors", out, "--to", "safetensors", "--dtype", "fp16", "--force"),
            f"{out / 'x.safetensors'} is the source")
    assert snapshot(tmp_path) == before


def test_a_link_in_the_folder_pointing_at_the_source_is_not_replaced(tmp_path):
    torch.save(weights(), tmp_path / "x.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").symlink_to(tmp_path / "x.pth")
    before = snapshot(tmp_path)
    refused(invoke("convert", tmp_path / "x.pth", out, "--max-shard-size", "10GB", "--force"), "is the source")
    assert snapshot(tmp_path) == before


# --- spelling -------------------------------------------------------------------------------------------------

def test_a_file_name_for_a_folder_output_is_refused_with_the_right_spelling(tmp_path):
    torch.save(weights(), tmp_path / "x.pth")
    before = snapshot(tmp_path)
    line = refused(invoke("convert", tmp_path / "x.pth", tmp_path / "out.safetensors", "--max-shard-size", "40KB"),
                   "--max-shard-size", code=2)
    assert line.endswith(f"pass {tmp_path / 'out'} instead"), line
    refused(invoke("convert", tmp_path / "x.pth", tmp_path / "out.pth", "--to", "dcp"), f"pass {tmp_path / 'out'}",
            code=2)
    assert snapshot(tmp_path) == before
    (tmp_path / "old.safetensors").write_bytes(b"an existing file")
    before = snapshot(tmp_path)
    refused(invoke("convert", tmp_path / "x.pth", tmp_path / "old.safetensors", "--max-shard-size", "40KB",
                   "--force"), f"pass {tmp_path / 'old'} instead", code=2)
    (tmp_path / "plainfile").write_bytes(b"a file without extension")
    before = snapshot(tmp_path)
    refused(invoke("convert", tmp_path / "x.pth", tmp_path / "plainfile", "--to", "dcp", "--force"),
            "never replaces a file with a folder")
    assert snapshot(tmp_path) == before


# --- failures put everything back ------------------------------------------------------------------------------

def _earlier_output(model_folder):
    assert invoke("convert", model_folder / "pytorch_model.bin", model_folder, "--max-shard-size", "40KB",
                  ).exit_code == 0
    return snapshot(model_folder)


def test_a_failure_while_moving_files_in_puts_everything_back(model_folder, monkeypatch):
    before = _earlier_output(model_folder)
    real_rename = os.rename
    moved_in = []

    def rename(a, b):
        if ".ckconv-tmp-" in str(a):  # a staged file moving into the folder
            if len(moved_in) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            moved_in.append(b)
        return real_rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(WriteFailed, match="Input/output error"):
        ckconv.convert(model_folder / "pytorch_model.bin", model_folder, max_shard_size="70KB", force=True)
    monkeypatch.undo()
    assert len(moved_in) == 2
    assert snapshot(model_folder) == before, "the folder is not as it was"


def test_a_full_disk_while_writing_shards_leaves_the_folder_as_it_was(model_folder, monkeypatch):
    before = _earlier_output(model_folder)
    real_write_file = sf.write_file
    calls = []

    def write_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_file(path, *args, **kwargs)

    monkeypatch.setattr(sf, "write_file", write_file)
    result = invoke("convert", model_folder / "pytorch_model.bin", model_folder, "--max-shard-size", "70KB",
                    "--force")
    refused(result, "no space left on device")
    assert ".ckconv-tmp-" in str(calls[0].parent)
    assert snapshot(model_folder) == before


def test_staged_file_never_replaces_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExists, match="is a folder"):
        with atomic.staged_file(tmp_path / "d", force=True) as tmp:
            Path(tmp).write_text("x")
    with pytest.raises(OutputExists, match="is a folder"):
        with atomic.staged(tmp_path / "d", directory=False, force=True) as tmp:
            Path(tmp).write_text("x")
    assert snapshot(tmp_path) == before


def test_staged_folder_contract_for_other_writers(tmp_path, monkeypatch):
    """The helper a multi-file writer (sharded torch .bin) uses: index last, earlier files replaced, rest kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "old.idx").write_text("part-1 part-2")
    (out / "part-1").write_text("old 1")
    (out / "part-2").write_text("old 2")
    layout = atomic.FolderLayout(index=("old.idx",), earlier=lambda f: (f / "old.idx").read_text().split(),
                                 shards="part-{}")
    order = []
    real_rename = os.rename

    def rename(a, b):
        if ".ckconv-tmp-" in str(a):
            order.append(Path(b).name)
        return real_rename(a, b)

    with pytest.raises(OutputExists, match="already exists and holds old.idx and 2 more files"):
        with atomic.staged_folder(out, force=False, layout=layout):
            pytest.fail("the block ran although the refusal was known")
    monkeypatch.setattr(atomic.os, "rename", rename)
    with atomic.staged_folder(out, force=True, layout=layout) as tmp:
        assert tmp.parent == out and tmp.name.startswith(".ckconv-tmp-")
        (tmp / "old.idx").write_text("part-1")
        (tmp / "part-1").write_text("new 1")
    monkeypatch.undo()
    assert order == ["part-1", "old.idx"]
    assert sorted(os.listdir(out)) == ["keep.txt", "old.idx", "part-1"]
    assert (out / "part-1").read_text() == "new 1" and (out / "keep.txt").read_text() == "mine"


# --- an index in the destination is untrusted input (issue 21) ------------------------------------------------

def _stale_index(folder: Path, index: str, names: list):
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 1},
                                            "weight_map": {f"t{i}": n for i, n in enumerate(names)}}))


def _left_alone(result, folder: Path, *names):
    """Exit 0, and one warning line naming every file left in place."""
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: left ")]
    assert len(warnings) == 1, result.stderr
    for name in names:
        assert name in warnings[0], warnings[0]
    assert str(folder) in warnings[0] and "ckconv replaces only files of its own output" in warnings[0]
    return warnings[0]


@pytest.mark.parametrize("source_named", [False, True], ids=["other-source", "source-named-by-the-index"])
def test_a_stale_safetensors_index_never_costs_the_files_it_names(tmp_path, source_named):
    """A user's precious.safetensors listed by an old model.safetensors.index.json: --force leaves it."""
    hf = tmp_path / "hf"
    hf.mkdir()
    ckconv.save(weights(3), hf / "precious.safetensors")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"an old shard of this layout")
    _stale_index(hf, INDEX, ["precious.safetensors", "model-00001-of-00002.safetensors"])
    if source_named:
        src = hf / "precious.safetensors"
    else:
        src = tmp_path / "x.pth"
        torch.save(weights(3), src)
    before = snapshot(hf)
    line = _left_alone(invoke("convert", src, hf, "--max-shard-size", "40KB", "--force"), hf, "precious.safetensors")
    assert "model-NNNNN-of-NNNNN.safetensors" in line, line
    after = snapshot(hf)
    assert after["precious.safetensors"] == before["precious.safetensors"]
    assert set(after) == {"precious.safetensors", INDEX, *shards_in(hf)}, "a temp file was left, or a file lost"
    assert len(shards_in(hf)) == 4 and named_by_index(hf) == shards_in(hf)  # the old shard was ours to replace
    assert_deep_equal(ckconv.load(hf / INDEX), weights(3))
    assert_deep_equal(ckconv.load(hf / "precious.safetensors"), weights(3))
    # one shard: model.safetensors, the stale index replaced, precious.safetensors still kept
    _stale_index(hf, INDEX, ["precious.safetensors", *shards_in(hf)])
    _left_alone(invoke("convert", src, hf, "--max-shard-size", "10GB", "--force"), hf, "precious.safetensors")
    assert sorted(os.listdir(hf)) == ["model.safetensors", "precious.safetensors"]
    assert snapshot(hf)["precious.safetensors"] == before["precious.safetensors"]


@pytest.mark.parametrize("source_named", [False, True], ids=["other-source", "source-named-by-the-index"])
def test_a_stale_torch_index_never_costs_the_files_it_names(tmp_path, source_named):
    """The torch-sharded twin: weights.bin listed by an old pytorch_model.bin.index.json."""
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(weights(4), folder / "weights.bin")
    (folder / "config.json").write_text("{}")
    _stale_index(folder, "pytorch_model.bin.index.json",
                 ["weights.bin", "config.json", "pytorch_model-00001-of-00002.bin"])
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"an old shard of this layout")
    src = folder / "weights.bin" if source_named else tmp_path / "x.pth"
    if not source_named:
        torch.save(weights(4), src)
    before = snapshot(folder)
    line = _left_alone(invoke("convert", src, folder, "--to", "torch", "--max-shard-size", "40KB", "--force"),
                       folder, "weights.bin", "config.json")
    assert "pytorch_model-NNNNN-of-NNNNN.bin" in line, line
    after = snapshot(folder)
    for name in ("weights.bin", "config.json"):
        assert after[name] == before[name], name
    shards = sorted(p.name for p in folder.glob("pytorch_model-*.bin"))
    assert shards == [f"pytorch_model-0000{i}-of-00004.bin" for i in range(1, 5)]
    assert set(after) == {"weights.bin", "config.json", "pytorch_model.bin.index.json", *shards}
    assert_deep_equal(ckconv.load(folder), weights(4))
    assert_deep_equal(torch.load(folder / "weights.bin", weights_only=True), weights(4))


@pytest.mark.parametrize("source_named", [False, True], ids=["other-source", "source-named-by-the-index"])
def test_a_stale_dcp_metadata_never_costs_the_files_it_names(tmp_path, source_named):
    """The DCP twin: an old .metadata whose storage_data names precious.distcp (and the source) beside __0_0.distcp."""
    from ckconv.formats.dcp import write as dcp

    out = tmp_path / "out"
    out.mkdir()
    bundle = {"model": weights(5), "step": 3}
    torch.save(bundle, out / "precious.pth")
    plan = dcp.plan_write(ckconv.io.as_checkpoint(bundle).root, world=2)
    locations = dcp.write_rank_file(out, 0, plan.blobs_for(0))
    os.rename(out / "__0_0.distcp", out / "precious.distcp")
    locations = {k: ("precious.distcp", start, n) for k, (_, start, n) in locations.items()}
    for i, (k, (_, start, n)) in enumerate(dcp.write_rank_file(out, 1, plan.blobs_for(1)).items()):
        locations[k] = ("__1_0.distcp" if i == 0 else "precious.pth", start, n)  # the source named too
    dcp.write_metadata(out, plan, locations)
    src = out / "precious.pth" if source_named else tmp_path / "in.pth"
    if not source_named:
        torch.save(bundle, src)
    before = snapshot(out)
    line = _left_alone(invoke("convert", src, out, "--to", "dcp", "--force"), out, "precious.distcp", "precious.pth")
    assert "__N_N.distcp" in line and ".metadata" in line, line
    after = snapshot(out)
    for name in ("precious.distcp", "precious.pth"):
        assert after[name] == before[name], name
    assert sorted(after) == [".metadata", "__0_0.distcp", "precious.distcp", "precious.pth"]  # __1_0 was ours
    assert_deep_equal(ckconv.load(out), bundle)


def test_a_layout_replaces_only_its_own_names(tmp_path):
    """FolderLayout itself: whatever ``earlier`` says, only index names and the shard template are replaced."""
    for name in ("model-00001-of-00002.safetensors", "model-1-of-2.safetensors", "model-123456-of-123456.safetensors",
                 "precious.safetensors", "Model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (tmp_path / name).write_bytes(b"x")
    layout = atomic.FolderLayout(index=("model.safetensors", "model.safetensors.index.json"),
                                 shards="model-{:05d}-of-{:05d}.safetensors", earlier=lambda f: sorted(os.listdir(f)))
    replace, left = layout.survey(tmp_path)
    assert replace == ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                       "model-123456-of-123456.safetensors"]
    assert left == ["Model-00001-of-00002.safetensors", "model-1-of-2.safetensors", "precious.safetensors"]
    assert layout.describe() == "model-NNNNN-of-NNNNN.safetensors, model.safetensors, model.safetensors.index.json"

    def hostile(folder):
        raise RuntimeError("an index ckconv cannot read")

    assert atomic.FolderLayout(index=("i",), earlier=hostile, shards="s{}").survey(tmp_path) == ([], [])
    assert atomic.FolderLayout(earlier=lambda f: ["precious.safetensors"]).survey(tmp_path) == \
        ([], ["precious.safetensors"])  # no shard template: an index replaces nothing


def test_a_user_file_with_the_staged_name_is_never_touched(tmp_path, monkeypatch):
    """The temporary name beside the output is made exclusively: a file already there with the name the random draw
    gives (however unlikely) is skipped, never written over nor removed, whether the write succeeds or fails."""
    names = iter(["taken", "taken", "free-1", "taken", "free-2"])
    monkeypatch.setattr(atomic, "_tmp_name", lambda stem: f".{stem}.ckconv-tmp-{next(names)}")
    theirs = tmp_path / ".out.bin.ckconv-tmp-taken"
    theirs.write_bytes(b"user data")
    dst = tmp_path / "out.bin"
    with atomic.staged_file(dst, force=False) as tmp:
        assert tmp.name.endswith("free-1")
        tmp.write_bytes(b"new")
    with pytest.raises(RuntimeError):
        with atomic.staged_file(dst, force=True) as tmp:
            assert tmp.name.endswith("free-2")
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert theirs.read_bytes() == b"user data" and dst.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.bin.ckconv-tmp-taken", "out.bin"]
