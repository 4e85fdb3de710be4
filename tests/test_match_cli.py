"""`ckconv match` and `ckconv convert --arch ...` on the command line: output, JSON, maps, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv.cli import cli
from matchcases import fresh, model, one_thread, same_outputs, spec_cache  # noqa: F401 - fixtures


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result, code=1):
    assert result.exit_code == code, result.output  # 2 for a usage error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="session")
def wrapped(tmp_path_factory):
    """A DataParallel-style resnet18 checkpoint without num_batches_tracked, in a training bundle."""
    sd = {f"module.{k}": v for k, v in model("resnet18").state_dict().items() if "num_batches" not in k}
    path = tmp_path_factory.mktemp("ckpt") / "wrapped.pth"
    torch.save({"state_dict": sd, "epoch": 9, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture(scope="session")
def tuned(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tuned.pth"
    torch.save(model("resnet18", num_classes=10).state_dict(), path)
    return path


def test_spec_without_checkpoint():
    result = invoke("match", "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "kind"]
    assert lines[1].split() == ["conv1.weight", "64x3x7x7", "float32", "parameter"]
    assert ["bn1.num_batches_tracked", "scalar", "int64", "buffer"] in [l.split() for l in lines]
    assert lines[-1] == "122 keys: 62 parameters (11,689,512 elements), 60 buffers"
    spec = json.loads(invoke("match", "--arch", "torchvision:resnet18", "--arch-option", "num_classes=10",
                             "--json").stdout)
    assert spec["arch"] == "torchvision:resnet18" and spec["options"] == {"num_classes": 10}
    assert spec["tensors"][-1] == {"name": "fc.bias", "shape": [10], "dtype": "float32", "kind": "parameter",
                                   "module": "fc", "module_type": "Linear"}


def test_select_prints_that_part_of_the_tree():
    result = invoke("match", "--arch", "vgg11", "--select", "features[16:]")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("torchvision:vgg11 features[16:]:\nSequential(\n  (16): Conv2d(512, 512")
    assert "(20): MaxPool2d" in out and "(15)" not in out
    assert "features.18.bias" in out and "classifier" not in out
    single = invoke("match", "--arch", "vgg11", "--select", "classifier[-1]").stdout
    assert "Linear(in_features=4096, out_features=1000, bias=True)" in single
    assert one_error_line(invoke("match", "--arch", "vgg11", "--select", "features[99]"), code=2).endswith(
        "index 99 is out of range (features has 21 children)")


def test_match_table_and_summary(wrapped):
    result = invoke("match", wrapped, "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{wrapped} [state_dict] -> torchvision:resnet18" in out
    assert any(l.split() == ["conv1.weight", "<-", "module.conv1.weight", "prefix", "64x3x7x7"]
               for l in out.splitlines())
    assert "filled with 0 (20):" in out and "  bn1.num_batches_tracked" in out
    assert out.splitlines()[-1].startswith("coverage: 100.0% of 122 target keys (102 matched, 20 filled)")


def test_match_json(tuned):
    result = invoke("match", tuned, "--arch", "resnet18", "--arch-option", "num_classes=1000", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"matched", "missing", "unexpected", "mismatched", "filled", "coverage"} <= set(report)
    assert report["matched"][0] == {"target": "conv1.weight", "source": "conv1.weight", "how": "exact",
                                    "steps": [], "shape": [64, 3, 7, 7], "reshape": None, "confidence": 1.0}
    assert report["mismatched"][0] == {"target": "fc.weight", "source": "fc.weight", "target_shape": [1000, 512],
                                       "source_shape": [10, 512], "how": "exact"}
    assert report["missing"] == [] and report["unexpected"] == []


def test_strict_exit_codes(tuned):
    result = invoke("match", tuned, "--arch", "resnet18", "--arch-option", "num_classes=1000", "--strict")
    line = one_error_line(result)
    assert "2 of 122 target keys" in line and "--strict" in line
    assert "mismatched: fc.weight 1000x512 <- fc.weight 10x512" in result.stdout
    assert "try --arch-option num_classes=10" in result.stdout
    ok = invoke("match", tuned, "--arch", "resnet18", "--arch-option", "num_classes=10", "--strict")
    assert ok.exit_code == 0, ok.output
    inferred = invoke("match", tuned, "--arch", "resnet18", "--strict")  # the head's shape says num_classes=10
    assert inferred.exit_code == 0, inferred.output
    assert "note: built torchvision:resnet18 with num_classes=10" in inferred.stdout


def test_errors_are_one_line(tmp_path, wrapped):
    assert "unknown architecture 'resnet1000'" in one_error_line(invoke("match", wrapped, "--arch", "resnet1000"),
                                                                 code=2)
    assert "--rename" in one_error_line(invoke("match", wrapped, "--arch", "resnet18", "--rename", "nope"), code=2)
    assert "needs a checkpoint" in one_error_line(invoke("match", "--arch", "auto"), code=2)
    assert "no such file" in one_error_line(invoke("match", tmp_path / "none.pth", "--arch", "resnet18"))
    assert "KEY=VALUE" in one_error_line(invoke("match", "--arch", "resnet18", "--arch-option", "x"), code=2)
    assert invoke("match", wrapped).exit_code == 2  # --arch is required: a usage error


def test_save_map_then_convert_with_it(tmp_path, wrapped):
    result = invoke("match", wrapped, "--arch", "resnet18", "--save-map", tmp_path / "map.json")
    assert result.exit_code == 0 and "wrote the mapping to" in result.stdout
    saved = json.loads((tmp_path / "map.json").read_text())
    assert saved["arch"] == "torchvision:resnet18" and saved["map"][0] == {
        "target": "conv1.weight", "source": "module.conv1.weight", "reshape": None}
    out = tmp_path / "out.pth"
    result = invoke("convert", wrapped, out, "--map", tmp_path / "map.json")
    assert result.exit_code == 0, result.output
    bundle = ckconv.load(out)
    assert bundle["epoch"] == 9 and "optimizer" in bundle  # other sections kept
    target = fresh("resnet18")
    target.load_state_dict(bundle["model"], strict=True)  # the map names an architecture: torch layout (issue 13)
    same_outputs(model("resnet18"), target)


def test_convert_arch_options_only_and_json(tmp_path, tuned):
    out = tmp_path / "head.safetensors"
    result = invoke("convert", tuned, out, "--arch", "resnet18", "--arch-option", "num_classes=10",
                    "--only", "fc", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["match"]["complete"] and info["tensors"] == 2
    assert list(ckconv.load(out)) == ["fc.weight", "fc.bias"]
    text = invoke("convert", tuned, tmp_path / "o.pth", "--arch", "resnet18", "--model-only")
    assert text.exit_code == 0 and "note: replaced" not in text.stdout
    assert "wrote only the remapped state_dict: 122 tensors under torchvision:resnet18's names" in text.stdout
    assert "note: built torchvision:resnet18 with num_classes=10" in text.stdout and not text.stderr
    strict = invoke("convert", tuned, tmp_path / "s.pth", "--arch", "resnet18", "--arch-option", "num_classes=1000",
                    "--strict")
    assert "--strict" in one_error_line(strict) and not (tmp_path / "s.pth").exists()


def test_convert_rename_without_arch(tmp_path, tuned):
    out = tmp_path / "renamed.safetensors"
    result = invoke("convert", tuned, out, "--rename", r"^fc\.=head.", "--drop", "layer4", "--model-only")
    assert result.exit_code == 0, result.output
    keys = list(ckconv.load(out))
    assert keys[-2:] == ["head.weight", "head.bias"] and not any(k.startswith("layer4.") for k in keys)


def test_auto_ranks_candidates(wrapped):
    result = invoke("match", wrapped, "--arch", "auto:resnet18,resnet34,squeezenet1_0")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["candidate", "fills", "uses", "score"]
    assert lines[1].split()[:3] == ["torchvision:resnet18", "100.0%", "100.0%"]
    assert lines[2].startswith("torchvision:resnet34")


def test_help_does_not_import_torch():
    code = "import sys; from ckconv.cli import cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert "match" in invoke("--help").stdout
