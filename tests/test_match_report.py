"""The match report's one shape: every list holds frozen dataclasses (shapes as tuples), ``notes`` holds Notes,
and ``to_dict()`` / ``--json`` are byte for byte what they were when the lists held dicts (tests/data/match_report/,
written by the dict-based report before the change)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv.cli import cli
from ckconv.matching.engine import match_keys, pick
from ckconv.matching.report import Ambiguity, Candidate, Filled, KeyEntry, MatchReport
from ckconv.architectures import TensorSpec
from ckconv.model import Note
from matchcases import model, one_thread, spec_cache  # noqa: F401 - fixtures

GOLDEN = Path(__file__).resolve().parent / "data" / "match_report"
MATCH_ARGS = ("match", "src.pth", "--arch", "auto:resnet18,resnet34", "--arch-option", "num_classes=1000", "--json")
CONVERT_ARGS = ("convert", "src.pth", "out.safetensors", "--arch", "resnet18", "--arch-option", "num_classes=1000",
                "--json")


def odd_checkpoint(path):
    """A resnet18 state_dict with something in every list of the report: no num_batches_tracked (filled), a
    running_var gone (missing), an extra key (unexpected), a 10-way head (mismatched against 1000 classes), one
    downsample weight under two prefixes (ambiguous), a float16 conv (a dtype note)."""
    sd = {k: v for k, v in model("resnet18", num_classes=10).state_dict().items() if "num_batches" not in k}
    del sd["layer4.1.bn2.running_var"]
    sd["conv1.weight"] = sd["conv1.weight"].half()
    down = sd.pop("layer3.0.downsample.0.weight")
    sd["x.layer3.0.downsample.0.weight"] = down
    sd["y.layer3.0.downsample.0.weight"] = down.clone()
    sd["extra.proj.weight"] = torch.ones(3, 3)
    torch.save(sd, path)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{name: stdout} of ``match --json`` (with --arch auto, so candidates too) and ``convert --arch --json``."""
    where = tmp_path_factory.mktemp("report")
    odd_checkpoint(where / "src.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)  # relative names: the JSON holds no temporary path
        out = {}
        for name, args in (("match", MATCH_ARGS), ("convert", CONVERT_ARGS)):
            result = CliRunner().invoke(cli, list(args))
            assert result.exit_code in (0, 1), result.output
            out[name] = result.stdout
    return out


def test_match_json_is_byte_identical_to_the_dict_based_report(outputs):
    assert outputs["match"] == (GOLDEN / "match.json").read_text(encoding="utf-8")


def test_convert_json_is_byte_identical_to_the_dict_based_report(outputs):
    """All of it, bar the conversion's own ``notes`` and ``warnings`` (not the report's: other work may reword
    them); those are put back from the saved output and the whole is compared byte for byte."""
    want = (GOLDEN / "convert.json").read_text(encoding="utf-8")
    doc, ref = json.loads(outputs["convert"]), json.loads(want)
    assert doc["match"]["notes"] == ref["match"]["notes"] and list(doc) == list(ref)
    doc["notes"], doc["warnings"] = ref["notes"], ref["warnings"]
    assert json.dumps(doc, indent=2) + "\n" == want


def test_the_golden_report_has_something_in_every_list(outputs):
    """Otherwise the byte comparison above would not cover every type's to_dict."""
    doc = json.loads(outputs["match"])
    for key in ("matched", "filled", "missing", "unexpected", "mismatched", "ambiguous", "notes", "candidates"):
        assert doc[key], key
    assert {"target", "source"} <= {k for a in doc["ambiguous"] for k in a}
    assert json.loads(outputs["convert"])["match"]["mismatched"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("typed") / "src.pth"
    odd_checkpoint(path)
    return ckconv.match(path, "auto:resnet18,resnet34", arch_options={"num_classes": 1000})


def test_every_list_holds_frozen_dataclasses(report):
    kinds = {"matched": ckconv.Match, "mismatched": ckconv.Mismatch, "filled": ckconv.Filled,
             "missing": ckconv.KeyEntry, "unexpected": ckconv.KeyEntry, "ambiguous": ckconv.Ambiguity,
             "candidates": ckconv.Candidate, "notes": Note}
    for key, kind in kinds.items():
        items = getattr(report, key)
        assert items and all(type(x) is kind for x in items), (key, items)
    for key in ("mismatched", "filled", "missing", "unexpected", "ambiguous", "candidates"):
        item = getattr(report, key)[0]
        field = dataclasses.fields(item)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(item, field, "other")


def test_typed_values(report):
    assert report.arch == "torchvision:resnet18"
    assert report.filled[0] == Filled("bn1.num_batches_tracked")
    assert report.filled[0].shape == () and report.filled[0].dtype == "int64" and report.filled[0].value == 0
    assert report.missing == [KeyEntry("layer3.0.downsample.0.weight", (256, 128, 1, 1), "float32"),
                              KeyEntry("layer4.1.bn2.running_var", (512,), "float32")]
    assert report.missing_keys == ["layer3.0.downsample.0.weight", "layer4.1.bn2.running_var"]
    assert KeyEntry("extra.proj.weight", (3, 3), "float32") in report.unexpected
    assert "extra.proj.weight" in report.unexpected_keys
    assert all(isinstance(e.shape, tuple) for e in report.missing + report.unexpected)
    assert Ambiguity("suffix", ("x.layer3.0.downsample.0.weight", "y.layer3.0.downsample.0.weight"),
                     target="layer3.0.downsample.0.weight") in report.ambiguous
    assert all(a.name == (a.target or a.source) for a in report.ambiguous)
    best = report.candidates[0]
    assert best.arch == "torchvision:resnet18" and 0 < best.score < 1 and 0 < best.coverage < 1
    assert [c.arch for c in report.candidates] == ["torchvision:resnet18", "torchvision:resnet34"]
    assert any("float16" in n.text and not n.warning for n in report.notes)
    assert any("10-way head" in n.text and n.warning for n in report.notes)


def test_to_dict_of_each_type():
    assert Filled("bn.num_batches_tracked").to_dict() == {"target": "bn.num_batches_tracked", "shape": [],
                                                          "dtype": "int64", "value": 0}
    assert KeyEntry("fc.weight", (10, 8), "float16").to_dict() == {"name": "fc.weight", "shape": [10, 8],
                                                                   "dtype": "float16"}
    assert Ambiguity("suffix", ("a.w", "b.w"), target="w").to_dict() == {"step": "suffix", "target": "w",
                                                                         "candidates": ["a.w", "b.w"]}
    assert list(Ambiguity("structural", ("p", "q"), source="m").to_dict()) == ["step", "source", "candidates"]
    assert Candidate("torchvision:resnet18", 1.0, 0.5, 0.666667).to_dict() == {
        "arch": "torchvision:resnet18", "coverage": 1.0, "used": 0.5, "score": 0.666667}
    with pytest.raises(ValueError, match="target or a source"):
        Ambiguity("suffix", ("a", "b"))
    with pytest.raises(ValueError, match="target or a source"):
        Ambiguity("suffix", ("a", "b"), target="t", source="s")


def test_lists_passed_as_lists_are_kept_as_tuples():
    """Shapes and candidates given as lists (a JSON map, a plugin) are stored as tuples: hashable, immutable."""
    e = KeyEntry("w", [2, 3], "float32")
    assert e.shape == (2, 3) and hash(e) == hash(KeyEntry("w", (2, 3), "float32"))
    assert Ambiguity("suffix", ["a", "b"], target="t").candidates == ("a", "b")


def test_notes_are_only_ever_notes():
    """A plain string put in ``notes`` (a plugin, older code) is a Note when the report is finished."""
    spec = [TensorSpec("conv.weight", (8, 3), "float32", "parameter", "conv", "Conv2d")]
    r = MatchReport("x", "<keys>", "<root>", 0, 0, notes=["a plain string"])
    r = match_keys([("conv.weight", (8, 3), "float16")], spec, arch="x", report=r)
    assert all(type(n) is Note for n in r.notes) and str(r.notes[0]) == "a plain string"
    assert r.to_dict()["notes"][0] == "a plain string" and "float16" in r.to_dict()["notes"][1]


def test_pick_reads_candidates():
    assert pick([Candidate("a", 1.0, 0.9, 0.9), Candidate("b", 1.0, 0.5, 0.5)]) == "a"
    with pytest.raises(ckconv.errors.UsageError, match="ambiguous"):
        pick([Candidate("a", 1.0, 0.9, 0.9), Candidate("b", 1.0, 0.9, 0.9)])
