"""Sharded torch checkpoints: the ``pytorch_model.bin.index.json`` layout, read and written (issue 17).

Folders come from the real writers (huggingface_hub's ``save_torch_state_dict(..., safe_serialization=False)``,
``torch.save`` per shard); ckconv's output is loaded back by huggingface_hub and transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from huggingface_hub import load_torch_model, save_torch_state_dict, split_torch_state_dict_into_shards
from safetensors.torch import load_file

import ckconv
from ckconv import api
from ckconv.cli import cli
from ckconv.formats import hub_folder, torch_archive, torch_sharded
from helpers import assert_deep_equal

HOSTILE = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"
MANIFEST = json.loads((HOSTILE / "expected.json").read_text())
CANARY = "CKCONV_PWNED"
INDEX = "pytorch_model.bin.index.json"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def resnet18_state_dict():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def hub_save(sd, folder, max_shard_size, safe=False):
    folder.mkdir()
    save_torch_state_dict(dict(sd), folder, max_shard_size=max_shard_size, safe_serialization=safe)
    return folder


def index_of(folder, name=INDEX):
    return json.loads((folder / name).read_text())


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def is_tied(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """resnet18's state_dict as ref.pth (torch.save) and as hub/ (huggingface_hub's .bin shards, 20MB)."""
    root = tmp_path_factory.mktemp("resnet")
    sd = resnet18_state_dict()
    torch.save(sd, root / "ref.pth")
    hub_save(sd, root / "hub", "20MB")
    return root


# --- reading what huggingface_hub writes ----------------------------------------------------------------------

def test_reads_a_huggingface_hub_bin_folder_and_its_index(resnet):
    sd = torch.load(resnet / "ref.pth", weights_only=True)
    assert len(index_of(resnet / "hub")["weight_map"]) == len(sd) and len(files(resnet / "hub")) == 4
    for path in (resnet / "hub", resnet / "hub" / INDEX):
        assert api.detect_format(path) == "torch-sharded"
        assert_deep_equal(dict(sd), ckconv.load(path))


def test_inspect_diff_match_and_arch_work_on_bin_folders(resnet, tmp_path):
    info = ckconv.inspect(resnet / "hub")
    assert info.format == "torch-sharded" and info.tensor_count == 122 and info.bytes == 46_796_608
    result = invoke("diff", resnet / "hub", resnet / "ref.pth")
    assert result.exit_code == 0 and "equal (122 tensors" in result.stdout, result.output
    report = ckconv.match(resnet / "hub", "resnet18")
    assert report.coverage == 1.0 and not report.missing and not report.unexpected
    result = invoke("convert", resnet / "hub", tmp_path / "r.safetensors", "--arch", "resnet18", "--strict")
    assert result.exit_code == 0, result.output
    assert_deep_equal(dict(torch.load(resnet / "ref.pth", weights_only=True)),
                      dict(ckconv.load(tmp_path / "r.safetensors")))


def test_bin_folder_to_sharded_safetensors_matches_save_torch_state_dict(resnet, tmp_path):
    result = invoke("convert", resnet / "hub", tmp_path / "ours", "--max-shard-size", "20MB")
    assert result.exit_code == 0, result.output
    theirs = hub_save(torch.load(resnet / "ref.pth", weights_only=True), tmp_path / "theirs", "20MB", safe=True)
    assert files(tmp_path / "ours") == files(theirs)
    ours_index, their_index = (index_of(f, "model.safetensors.index.json") for f in (tmp_path / "ours", theirs))
    assert ours_index["weight_map"] == their_index["weight_map"]
    assert ours_index["metadata"]["total_size"] == their_index["metadata"]["total_size"]
    for name in set(their_index["weight_map"].values()):
        theirs_shard, ours_shard = load_file(theirs / name), load_file(tmp_path / "ours" / name)
        assert_deep_equal({k: theirs_shard[k] for k in sorted(theirs_shard)},
                          {k: ours_shard[k] for k in sorted(ours_shard)})


def test_a_safetensors_index_stays_safetensors(resnet, tmp_path):
    st = hub_save(torch.load(resnet / "ref.pth", weights_only=True), tmp_path / "st", "20MB", safe=True)
    assert api.detect_format(st / "model.safetensors.index.json") == "safetensors"
    for name in os.listdir(resnet / "hub"):  # both layouts in one folder, as many hub repos have: the safe one
        shutil.copy(resnet / "hub" / name, st / name)
    assert api.detect_format(st) == "safetensors"
    assert api.detect_format(st / INDEX) == "torch-sharded"


# --- writing the layout huggingface_hub and transformers read ---------------------------------------------------

def test_writes_the_layout_of_save_torch_state_dict(resnet, tmp_path):
    result = invoke("convert", resnet / "ref.pth", tmp_path / "out", "--to", "torch", "--max-shard-size", "20MB")
    assert result.exit_code == 0 and "(torch-sharded)" in result.stdout, result.output
    out, hub = tmp_path / "out", resnet / "hub"
    assert files(out) == files(hub) == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)] + [INDEX]
    ours, theirs = index_of(out), index_of(hub)
    assert list(ours["weight_map"].items()) == list(theirs["weight_map"].items())
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    for name in set(theirs["weight_map"].values()):
        assert_deep_equal(torch.load(hub / name, weights_only=True), torch.load(out / name, weights_only=True))
    model = torchvision.models.resnet18(weights=None)
    load_torch_model(model, out, strict=True, safe=False)
    assert_deep_equal(dict(torch.load(resnet / "ref.pth", weights_only=True)), dict(model.state_dict()))


def test_transformers_from_pretrained_reads_the_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config)
    torch.save(model.state_dict(), tmp_path / "bert.pth")
    ckconv.convert(tmp_path / "bert.pth", tmp_path / "bert", to="torch", max_shard_size="20KB")
    config.save_pretrained(tmp_path / "bert")
    assert len([n for n in files(tmp_path / "bert") if n.endswith(".bin")]) > 3
    loaded = transformers.BertModel.from_pretrained(tmp_path / "bert", use_safetensors=False)
    assert_deep_equal(dict(model.state_dict()), dict(loaded.state_dict()))


def test_shards_are_planned_like_split_torch_state_dict_into_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(100, 100, generator=g)  # 40 KB
    sd = {"a": torch.randn(50, 100, generator=g), "big": torch.randn(300, 100, generator=g),  # big: 120 KB
          "b": base, "c": torch.randn(60, 100, generator=g), "view": base[:10],  # a view: counted once
          "d": torch.randn(80, 100, generator=g), "tied": base, "e": torch.randn(10, generator=g)}
    torch.save(sd, tmp_path / "sd.pth")
    ckconv.convert(tmp_path / "sd.pth", tmp_path / "out", to="torch", max_shard_size="70KB")
    split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size="70KB")
    index = index_of(tmp_path / "out")
    assert index["weight_map"] == split.tensor_to_filename and len(split.filename_to_tensors) == 3
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    back = ckconv.load(tmp_path / "out")
    assert_deep_equal(sd, back)  # key order too, though shard order differs from it (a ckconv.structure record)
    assert is_tied(back["b"], back["tied"]) and is_tied(back["b"], back["view"])
    shard = torch.load(tmp_path / "out" / index["weight_map"]["b"], weights_only=True)
    assert list(shard) == ["a", "b", "view", "tied"] and is_tied(shard["b"], shard["tied"])  # tied within a shard


def test_one_shard_is_a_lone_pytorch_model_bin(tmp_path):
    sd = OrderedDict(w=torch.arange(6.0), b=torch.ones(2))
    torch.save(sd, tmp_path / "a.pth")
    assert ckconv.convert(tmp_path / "a.pth", tmp_path / "out", to="torch-sharded").destination_format \
        == "torch-sharded"
    assert files(tmp_path / "out") == ["pytorch_model.bin"]  # huggingface_hub's name for one shard, no index
    assert_deep_equal(sd, torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True))
    assert api.detect_format(tmp_path / "out") == "torch-sharded"
    assert_deep_equal(sd, ckconv.load(tmp_path / "out"))


def test_resnet18_pth_to_sharded_bin_to_safetensors_is_bit_exact(resnet, tmp_path):
    ckconv.convert(resnet / "ref.pth", tmp_path / "bin", to="torch", max_shard_size="20MB")
    ckconv.convert(tmp_path / "bin", tmp_path / "final.safetensors")
    ckconv.convert(tmp_path / "final.safetensors", tmp_path / "final.pth")
    ref = torch.load(resnet / "ref.pth", weights_only=True)  # an OrderedDict with _metadata: kept through all
    assert_deep_equal(ref, ckconv.load(tmp_path / "final.safetensors"))
    assert_deep_equal(ref, torch.load(tmp_path / "final.pth", weights_only=True))


def test_a_bundle_split_across_shards_comes_back_deep_equal(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 6 * 6, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    bundle = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "tag": "run-1",
              "history": (1.0, 0.5)}
    torch.save(bundle, tmp_path / "bundle.pth")
    ckconv.convert(tmp_path / "bundle.pth", tmp_path / "out", to="torch", max_shard_size="10KB")
    index = index_of(tmp_path / "out")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and "ckconv.structure" in index["metadata"]
    assert "optimizer.state.3.weight.exp_avg" in index["weight_map"]  # slots named by their parameter
    for name in shards:  # every shard is a plain name -> tensor dict, as transformers' shards are
        shard = torch.load(tmp_path / "out" / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in shard.values()) and set(shard) == {
            k for k, v in index["weight_map"].items() if v == name}
    assert_deep_equal(bundle, ckconv.load(tmp_path / "out"))
    ckconv.convert(tmp_path / "out", tmp_path / "back.pth")
    assert_deep_equal(bundle, torch.load(tmp_path / "back.pth", weights_only=True))
    ckconv.convert(tmp_path / "bundle.pth", tmp_path / "one", to="torch", max_shard_size="5GB")
    assert files(tmp_path / "one") == ["pytorch_model.bin"]
    assert_deep_equal(bundle, torch.load(tmp_path / "one" / "pytorch_model.bin", weights_only=True))


def test_tied_weights_saved_in_two_shards_stay_two_tensors(tmp_path):
    """torch.save per shard writes a storage shared by keys of two shards twice: both copies are read, none
    dropped, and they are not tied (the files hold two independent copies)."""
    folder = tmp_path / "tied"
    folder.mkdir()
    emb = torch.randn(10, 4)
    torch.save({"embed.weight": emb, "x": torch.ones(3)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"lm_head.weight": emb}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 332}, "weight_map": {
        "embed.weight": "pytorch_model-00001-of-00002.bin", "x": "pytorch_model-00001-of-00002.bin",
        "lm_head.weight": "pytorch_model-00002-of-00002.bin"}}))
    back = ckconv.load(folder)
    assert list(back) == ["embed.weight", "x", "lm_head.weight"] and not is_tied(back["embed.weight"],
                                                                                 back["lm_head.weight"])
    assert torch.equal(back["embed.weight"], emb) and torch.equal(back["lm_head.weight"], emb)
    ckconv.convert(folder, tmp_path / "t.safetensors")
    assert sorted(load_file(tmp_path / "t.safetensors")) == ["embed.weight", "lm_head.weight", "x"]


def test_output_is_staged_and_indexed_last(tmp_path, monkeypatch):
    torch.save({f"w{i}": torch.randn(64, 64) for i in range(6)}, tmp_path / "src.pth")
    dst = tmp_path / "sharded"
    order = []
    real_write_zip, real_write_index = torch_archive.write_zip, hub_folder.write_index

    def write_zip(root, path, *args):
        assert not dst.exists() and ".ckconv-tmp-" in Path(path).parent.name
        order.append(Path(path).name)
        return real_write_zip(root, path, *args)

    def write_index(folder, layout, *args):
        assert not dst.exists()
        order.append(layout.index)
        return real_write_index(folder, layout, *args)

    monkeypatch.setattr(torch_archive, "write_zip", write_zip)
    monkeypatch.setattr(hub_folder, "write_index", write_index)
    result = invoke("convert", tmp_path / "src.pth", dst, "--to", "torch", "--max-shard-size", "40KB")
    assert result.exit_code == 0, result.output
    assert len(order) == 4 and order[-1] == INDEX and files(dst) == sorted(order)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded", "src.pth"]


# --- options that do not apply are refused ----------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--to", "dcp", "--max-shard-size", "1MB"], "--max-shard-size does not apply to format dcp"),
    (["--to", "torch", "--max-shard-size", "1MB"], None),
    (["--to", "torch-sharded", "--max-shard-size", "nonsense"], "invalid size"),
])
def test_max_shard_size_is_refused_where_it_does_not_apply(tmp_path, args, expected):
    torch.save({"w": torch.randn(10)}, tmp_path / "a.pth")
    result = invoke("convert", tmp_path / "a.pth", tmp_path / "out", *args)
    if expected is None:
        assert result.exit_code == 0 and files(tmp_path / "out") == ["pytorch_model.bin"], result.output
        return
    assert result.exit_code != 0 and expected in result.stderr, result.output
    assert files(tmp_path) == ["a.pth"]


# --- hostile folders: the sharded-safetensors cases and more, with .bin shards -----------------------------------

def _shard(folder, name="pytorch_model-00001-of-00001.bin", sd=None):
    torch.save(sd if sd is not None else {"w": torch.ones(2)}, folder / name)
    return name


def _index(folder, weight_map, metadata=None, name=INDEX):
    (folder / name).write_text(json.dumps({"metadata": metadata or {}, "weight_map": weight_map}))


def _outside(folder):
    target = folder.parent / "elsewhere.bin"
    torch.save({"w": torch.ones(2)}, target)
    return target


def _fixture_shard(name):
    def build(folder):
        shutil.copy(HOSTILE / name, folder / "pytorch_model-00001-of-00001.bin")
        try:
            keys = list(ckconv.read(HOSTILE / name).root)
        except Exception:  # noqa: BLE001 - unreadable on purpose: any key will do
            keys = ["w"]
        _index(folder, {k: "pytorch_model-00001-of-00001.bin" for k in keys})
    return build


def _symlinked(target_of):
    def build(folder):
        os.symlink(target_of(folder), folder / "pytorch_model-00001-of-00001.bin")
        _index(folder, {"w": "pytorch_model-00001-of-00001.bin"})
    return build


def _fifo(folder):
    os.mkfifo(folder / "pytorch_model-00001-of-00001.bin")
    _index(folder, {"w": "pytorch_model-00001-of-00001.bin"})


def _fifo_behind_link(folder):
    os.mkfifo(folder / "pipe")
    os.symlink("pipe", folder / "pytorch_model-00001-of-00001.bin")
    _index(folder, {"w": "pytorch_model-00001-of-00001.bin"})


HOSTILE_FOLDERS = {
    "dotdot_passwd": (lambda f: _index(f, {"w": "../../etc/passwd"}), MANIFEST["sharded_dotdot_passwd"]),
    "absolute_path": (lambda f: _index(f, {"w": "/etc/passwd"}), MANIFEST["sharded_absolute_path"]),
    "subfolder_escape": (lambda f: _index(f, {"w": "sub/../../model.bin"}), MANIFEST["sharded_subfolder_escape"]),
    "backslash_escape": (lambda f: _index(f, {"w": "..\\..\\secret.bin"}), MANIFEST["sharded_backslash_escape"]),
    "missing_shard": (lambda f: _index(f, {"w": "pytorch_model-00001-of-00002.bin"}),
                      MANIFEST["sharded_missing_shard"]),
    "unmapped_tensor": (lambda f: _index(f, {"a": _shard(f, sd={"a": torch.ones(1), "b": torch.ones(1)})}),
                        MANIFEST["sharded_unmapped_tensor"]),
    "mapped_but_absent": (lambda f: _index(f, {"w": _shard(f), "v": "pytorch_model-00001-of-00001.bin"}),
                          "tensor 'v' is missing from shard"),
    "tensor_in_wrong_shard": (lambda f: _index(f, {"w": _shard(f, "pytorch_model-00002-of-00002.bin",
                                                               {"x": torch.ones(1)}),
                                                   "x": _shard(f, "pytorch_model-00001-of-00002.bin")}),
                              "holds tensor 'w' that the index does not map"),
    "index_not_json": (lambda f: (f / INDEX).write_text("{weight_map: nope"), MANIFEST["sharded_index_not_json"]),
    "structure_not_str": (lambda f: _index(f, {"w": _shard(f)}, {"ckconv.structure": {"a": 1}}),
                          MANIFEST["sharded_structure_not_str"]),
    "structure_names_missing_tensor": (
        lambda f: _index(f, {"w": _shard(f)}, {"ckconv.structure": '{"w": {"$tensor": "nope"}}'}),
        "refers to missing tensor"),
    "duplicate_names": (lambda f: (_shard(f), (f / INDEX).write_text(
        '{"weight_map": {"w": "pytorch_model-00001-of-00001.bin", "w": "pytorch_model-00001-of-00001.bin"}}')),
        "duplicate name 'w'"),
    "weight_map_not_str": (lambda f: _index(f, {"w": 3}), "weight_map of tensor name -> shard file name"),
    "json_object_bomb": (lambda f: (f / INDEX).write_text(
        '{"weight_map": {}, "metadata": {"x": [' + ",".join(["{}"] * 20_000) + "]}}"), "JSON objects"),
    "symlink_leaves_folder": (_symlinked(_outside), "links outside the checkpoint folder"),
    "symlink_to_dev_zero": (_symlinked(lambda f: "/dev/zero"), "links outside the checkpoint folder"),
    "dangling_symlink": (_symlinked(lambda f: f / "gone.bin"), "missing from the folder"),
    "fifo_shard": (_fifo, "is a FIFO (named pipe), not a regular file"),
    "fifo_behind_link": (_fifo_behind_link, "is a FIFO (named pipe), not a regular file"),
    "folder_as_shard": (lambda f: ((f / "pytorch_model-00001-of-00001.bin").mkdir(),
                                   _index(f, {"w": "pytorch_model-00001-of-00001.bin"})), "is a folder, not a regular file"),
    "safetensors_shard_after_a_torch_one": (
        lambda f: (_shard(f, "pytorch_model-00001-of-00002.bin"),
                   shutil.copy(HOSTILE / "sharded_unmapped_tensor" / "model-00001-of-00001.safetensors",
                               f / "pytorch_model-00002-of-00002.bin"),
                   _index(f, {"w": "pytorch_model-00001-of-00002.bin", "a": "pytorch_model-00002-of-00002.bin"})),
        "is not a torch.save file"),
    "shard_not_a_dict": (lambda f: _index(f, {"w": _shard(f, sd=[torch.ones(1)])}), "not a dict of name -> tensor"),
    "shard_value_not_a_tensor": (lambda f: _index(f, {"w": _shard(f, sd={"w": 3})}), "not a tensor"),
    "two_torch_indexes": (lambda f: (_index(f, {"w": _shard(f)}, name="a.bin.index.json"),
                                     _index(f, {"w": "pytorch_model-00001-of-00001.bin"}, name="b.bin.index.json")),
                          "pass the one to read"),
    "os_system_shard": (_fixture_shard("os_system.pth"), MANIFEST["os_system.pth"]),
    "crc_flipped_shard": (_fixture_shard("crc_flipped_tensor.pth"), MANIFEST["crc_flipped_tensor.pth"]),
    "deflated_shard": (_fixture_shard("deflated_members.pth"), MANIFEST["deflated_members.pth"]),
    "truncated_zip_shard": (_fixture_shard("truncated_zip.pth"), MANIFEST["truncated_zip.pth"]),
    "storage_size_mismatch_shard": (_fixture_shard("storage_size_mismatch.pth"),
                                    MANIFEST["storage_size_mismatch.pth"]),
    "torchscript_shard": (_fixture_shard("torchscript.pt"), "TorchScript"),  # a shard is a torch.save file
    "legacy_truncated_shard": (_fixture_shard("legacy_truncated.pth"), MANIFEST["legacy_truncated.pth"]),
    "png_shard": (_fixture_shard("png_named.pth"), "is not a torch.save file"),
    "empty_shard": (_fixture_shard("empty.pth"), "is not a torch.save file"),
}


def test_a_huggingface_hub_cache_snapshot_of_bin_shards_is_read(resnet, tmp_path):
    """The hub's cache: ``snapshots/<rev>/<file> -> ../../blobs/<hash>``, index and shards alike. Links into the
    same repo's blobs/ are what the hub writes; a blob that leads anywhere else is still refused."""
    repo = tmp_path / "hub" / "models--org--resnet"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((resnet / "hub").iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    for path in (snapshot, snapshot / INDEX):
        assert api.detect_format(path) == "torch-sharded"
        assert_deep_equal(dict(torch.load(resnet / "ref.pth", weights_only=True)), ckconv.load(path))
    assert invoke("diff", snapshot, resnet / "ref.pth").exit_code == 0
    shard = sorted(snapshot.glob("pytorch_model-*.bin"))[0]
    blob = (snapshot / os.readlink(shard)).resolve()
    os.replace(blob, tmp_path / "elsewhere.bin")
    blob.symlink_to(tmp_path / "elsewhere.bin")
    result = invoke("convert", snapshot, tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "links outside the checkpoint folder" in result.stderr, result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_an_index_linked_out_of_its_folder_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _index(tmp_path, {"w": _shard(folder)})
    (folder / INDEX).symlink_to(tmp_path / INDEX)
    result = invoke("convert", folder, tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "index file links outside the checkpoint folder" in result.stderr, result.output


@pytest.mark.parametrize("case, as_index", [(c, i) for c in sorted(HOSTILE_FOLDERS) for i in (False, True)
                                            if not (i and c == "two_torch_indexes")])
def test_hostile_bin_folders_are_refused_cleanly(case, as_index, tmp_path, monkeypatch):
    """Each case given as the folder and as its index file."""
    build, expected = HOSTILE_FOLDERS[case]
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    build(folder)
    src = folder
    if as_index:
        (src,) = folder.glob("*.index.json")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("convert", src, out / "out.safetensors")
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert "internal error" not in lines[0] and "Traceback" not in result.output
    assert list(out.iterdir()) == [] and not (tmp_path / CANARY).exists()
    result = invoke("inspect", src)  # a report (exit 1 when dangerous) or one error line
    assert result.exit_code in (0, 1) and "Traceback" not in result.output and not (tmp_path / CANARY).exists()
    assert len(result.stderr.splitlines()) <= 1, result.stderr


def test_an_earlier_output_is_replaced_only_where_named_like_the_layout(tmp_path):
    names = ["pytorch_model-00001-of-00002.bin", "../x.bin", ".hidden.bin", "notes.txt",
             "pytorch_model-00002-of-00002.bin"]
    for name in names[2:]:
        (tmp_path / name).write_bytes(b"x")
    _index(tmp_path, {chr(97 + i): n for i, n in enumerate(names)})
    layout = torch_sharded.TorchShardedFormat().folder_layout(ckconv.formats.WriteOptions())
    assert layout.survey(tmp_path) == ([INDEX, "pytorch_model-00002-of-00002.bin"], [".hidden.bin", "notes.txt"])
    (tmp_path / INDEX).write_text("not json")
    assert layout.survey(tmp_path) == ([INDEX], [])


def test_writing_into_a_model_folder_keeps_its_other_files(tmp_path):
    torch.save({f"w{i}": torch.randn(64, 64) for i in range(6)}, tmp_path / "src.pth")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert invoke("convert", tmp_path / "src.pth", folder, "--to", "torch", "--max-shard-size", "40KB").exit_code == 0
    assert files(folder) == ["config.json"] + [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)] + [INDEX]
    result = invoke("convert", tmp_path / "src.pth", folder, "--to", "torch", "--max-shard-size", "5GB")
    assert result.exit_code == 1 and "--force" in result.stderr and len(files(folder)) == 5
    result = invoke("convert", tmp_path / "src.pth", folder, "--to", "torch", "--max-shard-size", "5GB", "--force")
    assert result.exit_code == 0, result.output
    assert files(folder) == ["config.json", "pytorch_model.bin"]  # the earlier shards and index replaced
    assert invoke("diff", folder, tmp_path / "src.pth").exit_code == 0
