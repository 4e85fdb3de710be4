"""Architecture specs and model names from the disk cache: answers without torch, damaged entries rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ckconv
from ckconv import architectures_torchvision
from ckconv.errors import did_you_mean
from ckconv.matching import targets
from ckconv.storage import spec_cache
from ckconv.cli import cli
from ckconv.errors import UsageError
from ckconv.matching.selectors import filter_keys

# Runs the CLI and reports on stderr, at exit, which heavy modules the process imported.
CLI_WATCHING_IMPORTS = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('imported: ' + ','.join(m for m in ('torch', 'torchvision', 'timm') "
    "if m in sys.modules) + '\\n'))\n"
    "sys.argv = ['ckconv'] + sys.argv[1:]\n"
    "from ckconv.cli import main\n"
    "main()\n"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CKCONV_CACHE_DIR", str(root))
    monkeypatch.setattr(targets, "_SPECS", {})
    monkeypatch.setattr(targets, "_LISTS", {})
    return root


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    torch.save(sd, path)
    return path, sd


def ckconv_cli(*args, cache):
    env = dict(os.environ, CKCONV_CACHE_DIR=str(cache), CKCONV_LOAD_PLUGINS="")
    proc = subprocess.run([sys.executable, "-c", CLI_WATCHING_IMPORTS, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    *errors, imported = proc.stderr.strip().splitlines()
    assert imported.startswith("imported:"), proc.stderr
    return proc.returncode, proc.stdout, errors, imported[len("imported:"):].strip()


def test_match_with_a_warm_cache_never_imports_torch(resnet18_pth, cache):
    path, _ = resnet18_pth
    rc, cold, _, imported = ckconv_cli("match", path, "--arch", "resnet18", cache=cache)
    assert rc == 0 and "torch" in imported  # the first run builds the spec on the meta device
    rc, warm, _, imported = ckconv_cli("match", path, "--arch", "resnet18", "--json", cache=cache)
    assert rc == 0 and imported == ""
    report = json.loads(warm)
    assert report["coverage"] == 1.0 and report["arch"] == "torchvision:resnet18"
    rc, text, _, imported = ckconv_cli("match", path, "--arch", "resnet18", cache=cache)
    assert (rc, text, imported) == (0, cold, "")  # the same report, from the cache


def test_selectors_and_auto_from_the_cache_never_import_torch(resnet18_pth, cache):
    path, sd = resnet18_pth
    for args in (["--arch", "auto:resnet18,resnet34"], ["--arch", "resnet18", "--select", "layer4[1:]"]):
        assert ckconv_cli("match", path, *args, "--json", cache=cache)[0] == 0
        rc, out, _, imported = ckconv_cli("match", path, *args, "--json", cache=cache)
        assert rc == 0 and imported == "", args
    report = json.loads(out)
    assert [m["target"] for m in report["matched"]] == [k for k in sd if k.startswith("layer4.1.")]
    auto = json.loads(ckconv_cli("match", path, "--arch", "auto:resnet18,resnet34", "--json", cache=cache)[1])
    assert auto["arch"] == "torchvision:resnet18" and [c["arch"] for c in auto["candidates"]] == [
        "torchvision:resnet18", "torchvision:resnet34"]


def test_convert_arch_with_a_warm_cache_streams_bytes_without_torch(resnet18_pth, cache, tmp_path):
    path, sd = resnet18_pth
    renamed = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, renamed)
    assert ckconv_cli("match", renamed, "--arch", "resnet18", cache=cache)[0] == 0
    out = tmp_path / "out.safetensors"
    rc, _, errors, imported = ckconv_cli("convert", renamed, out, "--arch", "resnet18", cache=cache)
    assert rc == 0 and imported == "", errors
    back = ckconv.load(out)
    assert back["epoch"] == 3 and list(back["model"]) == list(sd)
    assert all(torch.equal(back["model"][k], v) and back["model"][k].dtype == v.dtype for k, v in sd.items())


def test_an_architecture_typo_is_answered_from_the_cache_with_a_suggestion(resnet18_pth, cache):
    path, _ = resnet18_pth
    ckconv_cli("match", path, "--arch", "resnet18", cache=cache)  # warms the list of names
    rc, out, errors, imported = ckconv_cli("match", path, "--arch", "vgg61", cache=cache)
    assert rc == 2 and out == "" and imported == ""  # a usage error
    assert len(errors) == 1 and errors[0].startswith("Error: unknown architecture 'vgg61'; did you mean vgg16?")
    rc, _, errors, imported = ckconv_cli("match", path, "--arch", "torchvision:resnt18", cache=cache)
    assert rc == 2 and imported == "" and "did you mean torchvision:resnet18?" in errors[0]


def test_suggestions():
    names = ["vgg11", "vgg16", "vgg19", "resnet18", "resnet34", "alexnet"]
    assert did_you_mean("vgg61", names) == "; did you mean vgg16?"  # a swap beats a changed digit
    assert did_you_mean("resnet81", names) == "; did you mean resnet18?"
    assert did_you_mean("alexnt", names) == "; did you mean alexnet?"
    assert did_you_mean("vgg", names) == ""  # too far from every name: no guess
    assert did_you_mean("zzzzzzzz", names) == ""


def test_a_bad_destination_is_refused_before_any_matching(resnet18_pth, cache, tmp_path):
    path, _ = resnet18_pth
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"the user's file")
    for dst, message in ((existing, "already exists"), (tmp_path / "no" / "out.safetensors", "does not exist")):
        result = CliRunner().invoke(cli, ["convert", str(path), str(dst), "--arch", "resnet18"])
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert not cache.exists()  # no spec was built or read: matching never started
    assert existing.read_bytes() == b"the user's file"


def spec_files(cache):
    return [p for p in cache.rglob("*.json") if p.name != "_models.json"]


def counting_builds(monkeypatch):
    builds = []
    real = targets.build
    monkeypatch.setattr(targets, "build", lambda *a, **k: builds.append(a) or real(*a, **k))
    return builds


def fresh_spec(monkeypatch, *args):
    monkeypatch.setattr(targets, "_SPECS", {})
    return targets.spec(*args)


DAMAGE = {
    "truncated": lambda text, data: text[: len(text) // 2],
    "not JSON": lambda text, data: "\x00\x01garbage",
    "a list": lambda text, data: "[]",
    "another arch": lambda text, data: json.dumps(dict(data, arch="torchvision:vgg16")),
    "another format": lambda text, data: json.dumps(dict(data, ckconv_spec=1)),
    "other options": lambda text, data: json.dumps(dict(data, options="{}")),
    "a string shape": lambda text, data: json.dumps(dict(data, tensors=[[*t[:1], "64x3", *t[2:]]
                                                                        for t in data["tensors"]])),
    "a negative dim": lambda text, data: json.dumps(dict(data, tensors=[[t[0], [-1], *t[2:]] for t in data["tensors"]])),
    "a float dim": lambda text, data: json.dumps(dict(data, tensors=[[t[0], [2.5], *t[2:]] for t in data["tensors"]])),
    "a bool dim": lambda text, data: json.dumps(dict(data, tensors=[[t[0], [True], *t[2:]] for t in data["tensors"]])),
    "an unknown dtype": lambda text, data: json.dumps(dict(data, tensors=[[*t[:2], "float99", *t[3:]]
                                                                          for t in data["tensors"]])),
    "a list as dtype": lambda text, data: json.dumps(dict(data, tensors=[[*t[:2], [1], *t[3:]]
                                                                         for t in data["tensors"]])),
    "an unknown kind": lambda text, data: json.dumps(dict(data, tensors=[[*t[:3], "weight", *t[4:]]
                                                                         for t in data["tensors"]])),
    "a short row": lambda text, data: json.dumps(dict(data, tensors=[t[:5] for t in data["tensors"]])),
    "duplicate keys": lambda text, data: json.dumps(dict(data, tensors=data["tensors"] + data["tensors"][:1])),
    "no tensors": lambda text, data: json.dumps({k: v for k, v in data.items() if k != "tensors"}),
    "modules not a list": lambda text, data: json.dumps(dict(data, modules={"a": 1})),
    "an unknown owner": lambda text, data: json.dumps(dict(data, tensors=[[*t[:4], "nowhere", t[5]]
                                                                          for t in data["tensors"]])),
    "an error that is not text": lambda text, data: json.dumps({k: v for k, v in data.items() if k != "tensors"}
                                                               | {"error": 3}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_spec_entry_is_ignored_and_rebuilt(cache, monkeypatch, damage):
    builds = counting_builds(monkeypatch)
    good = fresh_spec(monkeypatch, "squeezenet1_1", ["num_classes=7"])
    (entry,) = spec_files(cache)
    text = entry.read_text()
    entry.write_text(DAMAGE[damage](text, json.loads(text)))
    again = fresh_spec(monkeypatch, "squeezenet1_1", ["num_classes=7"])
    assert again == good and len(builds) == 2  # rebuilt, never trusted
    assert json.loads(entry.read_text()) == json.loads(text)  # and the entry repaired
    assert fresh_spec(monkeypatch, "squeezenet1_1", ["num_classes=7"]) == good and len(builds) == 2


def test_specs_are_keyed_by_options_and_version(cache, monkeypatch):
    builds = counting_builds(monkeypatch)
    seven = fresh_spec(monkeypatch, "squeezenet1_1", ["num_classes=7"])
    plain = fresh_spec(monkeypatch, "squeezenet1_1")
    assert seven.tensors[-1].shape == (7,) and plain.tensors[-1].shape == (1000,) and len(builds) == 2
    assert len(spec_files(cache)) == 2
    monkeypatch.setattr(architectures_torchvision.TorchvisionSource, "version", property(lambda self: "0.0-other"))
    monkeypatch.setattr(targets, "_LISTS", {})
    assert fresh_spec(monkeypatch, "squeezenet1_1").names == plain.names and len(builds) == 3  # another version
    assert not list(cache.rglob("*.tmp"))  # written atomically: no temporary file left


def test_the_spec_holds_the_module_tree_for_selectors(cache, monkeypatch):
    spec = fresh_spec(monkeypatch, "vgg16")
    model = targets.build("vgg16")
    tree = fresh_spec(monkeypatch, "vgg16").module_tree()  # read back from the disk cache
    for only, drop in ((["features[:10]"], []), (["classifier[-1]"], []), ([], ["features[2:]", "classifier.0"]),
                       (["features[0].weight"], [])):
        assert filter_keys(spec.names, only=only, drop=drop, model=tree) == \
            filter_keys(spec.names, only=only, drop=drop, model=model), (only, drop)
    assert [n for n, _ in tree.named_parameters()] == [n for n, _ in model.named_parameters()]
    with pytest.raises(UsageError, match="out of range"):
        filter_keys(spec.names, only=["features[99]"], model=tree)


def test_a_model_that_does_not_build_is_remembered(cache, monkeypatch):
    builds = counting_builds(monkeypatch)
    with pytest.raises(UsageError, match="cannot build") as first:
        fresh_spec(monkeypatch, "resnet18", ["no_such_option=1"])
    with pytest.raises(UsageError) as second:
        fresh_spec(monkeypatch, "resnet18", ["no_such_option=1"])
    assert str(second.value) == str(first.value) and len(builds) == 1


def test_the_list_of_names_is_cached_and_checked(cache, monkeypatch):
    source = targets.sources()["torchvision"]
    names = targets._list(source)
    assert "vgg16" in names and names == sorted(torchvision.models.list_models())
    path = spec_cache.names_path("torchvision", targets.source_version(source))
    assert json.loads(path.read_text())["models"] == names
    for damage in ('{"ckconv_names": 2, "models": "vgg16"}', "[", json.dumps(
            dict(json.loads(path.read_text()), models=["vgg16", "vgg16"]))):
        path.write_text(damage)
        monkeypatch.setattr(targets, "_LISTS", {})
        assert targets._list(source) == names
    monkeypatch.setattr(targets, "_LISTS", {})
    monkeypatch.setattr(type(source), "list", lambda self: pytest.fail("listed again"))
    assert targets._list(source) == names  # the repaired entry answers


def test_no_cache_or_an_unwritable_one_only_costs_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for setting in ("", str(blocker / "cache")):
        monkeypatch.setenv("CKCONV_CACHE_DIR", setting)
        monkeypatch.setattr(targets, "_SPECS", {})
        monkeypatch.setattr(targets, "_LISTS", {})
        assert targets.spec("squeezenet1_1").tensors[-1].shape == (1000,)
    assert blocker.read_text() == "not a folder"


def test_a_file_with_the_staged_name_is_never_written_over_nor_removed(tmp_path):
    """The cache's temporary file is made exclusively: a file already holding its name stays as it was (the entry
    is simply not cached this time); a free name gives the entry, and no temporary file is left."""
    entry = tmp_path / "cache" / "entry.json"
    entry.parent.mkdir()
    theirs = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    theirs.write_text("user data")
    spec_cache._write(entry, {"k": 1})
    assert theirs.read_text() == "user data" and not entry.exists()
    theirs.unlink()
    spec_cache._write(entry, {"k": 1})
    assert json.loads(entry.read_text()) == {"k": 1} and sorted(p.name for p in entry.parent.iterdir()) == ["entry.json"]
