"""``ckconv scan`` as a CI gate: JSON with a summary, SARIF 2.1.0 valid against the official schema, ``-o``,
include/exclude patterns, huggingface_hub cache names, and the pre-commit hook."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv.cli import cli
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).resolve().parent / "data" / "sarif-schema-2.1.0.json"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """models/good.pth (safe), models/sub dir/evil.pth (dangerous), models/odd.pth (unknown global),
    models/cut.safetensors (broken), models/notes.txt (skipped)."""
    root = tmp_path_factory.mktemp("gate") / "models"
    (root / "sub dir").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, root / "good.pth")
    canary = root.parent / "canary"
    torch.save({"w": torch.ones(2), "hook": Payload(f"touch '{canary}'")}, root / "sub dir" / "evil.pth")
    torch.save({"w": torch.ones(2), "cfg": pickle.loads(pickle.dumps(_odd()))}, root / "odd.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64)}, str(root / "whole.safetensors"))
    (root / "cut.safetensors").write_bytes((root / "whole.safetensors").read_bytes()[:-40])
    (root / "whole.safetensors").unlink()
    (root / "notes.txt").write_text("not a checkpoint")
    return root


def _odd():
    from fractions import Fraction  # a global ckconv does not know to be benign, and harmless

    return Fraction(1, 3)


def test_positive_control_torch_runs_the_payload(tree):
    canary = tree.parent / "canary"
    assert invoke("scan", tree).exit_code == 1 and not canary.exists()  # scanning runs nothing
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(tree / "sub dir" / "evil.pth")], check=True, capture_output=True)
    assert canary.exists()
    canary.unlink()


def test_json_has_summary_versions_and_equals_format_json(tree):
    as_flag = invoke("scan", tree, "--json")
    as_format = invoke("scan", tree, "--format", "json")
    assert as_flag.exit_code == as_format.exit_code == 1
    assert as_flag.stdout == as_format.stdout
    doc = json.loads(as_flag.stdout)
    assert doc["schema_version"] == 1 and doc["ckconv_version"] == ckconv.__version__
    assert doc["summary"] == {"checkpoints": 4, "safe": 1, "unknown": 1, "code": 0, "dangerous": 1, "broken": 1,
                              "skipped": 1}
    verdicts = {Path(r["path"]).name: r["verdict"] for r in doc["results"]}
    assert verdicts == {"good.pth": "safe", "evil.pth": "dangerous", "odd.pth": "unknown",
                        "cut.safetensors": "broken", "notes.txt": "skipped"}
    assert doc["exit_code"] == 1


def test_sarif_is_valid_2_1_0_with_a_rule_per_kind_and_a_result_per_finding(tree, monkeypatch):
    jsonschema = pytest.importorskip("jsonschema")
    monkeypatch.chdir(tree.parent)
    result = invoke("scan", "models", "--format", "sarif")
    assert result.exit_code == 1
    log = json.loads(result.stdout)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker()).validate(log)
    run = log["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert len({r["id"] for r in rules}) == len(rules) == 4
    by_rule = {r["id"]: r["properties"]["verdict"] for r in rules}
    found = {(by_rule[r["ruleId"]], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
             for r in run["results"]}
    assert found == {("dangerous", "sub%20dir/evil.pth"), ("unknown", "odd.pth"), ("broken", "cut.safetensors")}
    assert run["originalUriBaseIds"]["SCANROOT"]["uri"] == tree.resolve().as_uri() + "/"
    evil = next(r for r in run["results"] if by_rule[r["ruleId"]] == "dangerous")
    assert "posix.system" in evil["message"]["text"] and evil["level"] == "error"
    clean = invoke("scan", tree / "good.pth", "--format", "sarif")
    assert clean.exit_code == 0 and json.loads(clean.stdout)["runs"][0]["results"] == []
    # a schema check that can fail: a result without its message is refused
    del evil["message"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(log, schema)


def test_output_file_and_format_conflicts(tree, tmp_path):
    out = tmp_path / "report.sarif"
    out.write_text("old")
    result = invoke("scan", tree, "--format", "sarif", "-o", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(out.read_text())["version"] == "2.1.0"
    assert [p.name for p in tmp_path.iterdir()] == ["report.sarif"]  # nothing staged is left
    text = invoke("scan", tree, "--output", tmp_path / "report.txt")
    assert "DANGEROUS" in (tmp_path / "report.txt").read_text() and text.stdout == ""
    refused = invoke("scan", tree, "-o", tree / "good.pth")  # never over a checkpoint it scanned
    assert refused.exit_code == 1 and torch.load(tree / "good.pth")["w"].tolist() == [1.0, 1.0]
    both = invoke("scan", tree, "--json", "--format", "sarif")
    assert both.exit_code == 2 and json.loads(both.stdout)["type"] == "UsageError"


def test_include_and_exclude(tree):
    only_pth = json.loads(invoke("scan", tree, "--json", "--include", "*.pth").stdout)
    assert sorted(Path(r["path"]).name for r in only_pth["results"]) == ["evil.pth", "good.pth", "odd.pth"]
    no_sub = invoke("scan", tree, "--json", "--exclude", "sub dir", "--exclude", "*.safetensors",
                    "--exclude", "odd.*")
    doc = json.loads(no_sub.stdout)
    assert no_sub.exit_code == 0 and [Path(r["path"]).name for r in doc["results"]] == ["good.pth", "notes.txt"]
    files = invoke("scan", tree / "good.pth", tree / "odd.pth", "--exclude", "*odd.pth")
    assert files.exit_code == 0 and "odd" not in files.stdout


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tree):
    """A huggingface_hub cache as hf_hub_download leaves it: blobs named by hash, snapshots/<commit>/ symlinks
    into them, refs/main naming the commit."""
    cache = tmp_path_factory.mktemp("hub") / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, files in {"models--acme--tiny": {"model.pth": tree / "good.pth", "sub/evil.pth": tree / "sub dir" /
                                                "evil.pth", "config.json": None},
                        "models--solo": {"pytorch_model.bin": tree / "good.pth"}}.items():
        base = cache / repo
        (base / "blobs").mkdir(parents=True)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(commit)
        for name, src in files.items():
            data = src.read_bytes() if src else b'{"model_type": "tiny"}'
            blob = hashlib.sha256(data).hexdigest()
            (base / "blobs" / blob).write_bytes(data)
            link = base / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(base / "blobs" / blob, link.parent))
    orphan = cache / "models--acme--tiny" / "blobs" / ("f" * 64)  # a blob no snapshot names any more
    shutil.copy(tree / "good.pth", orphan)
    return cache, commit


def test_hub_cache_layout_is_what_huggingface_hub_reads(hub_cache):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache, commit = hub_cache
    info = huggingface_hub.scan_cache_dir(cache)
    assert {r.repo_id for r in info.repos} == {"acme/tiny", "solo"} and not info.warnings
    tiny = next(r for r in info.repos if r.repo_id == "acme/tiny")
    assert {f.file_name for rev in tiny.revisions for f in rev.files} == {"model.pth", "evil.pth", "config.json"}


def test_hub_cache_files_are_named_repo_revision_file(hub_cache):
    cache, commit = hub_cache
    result = invoke("scan", cache)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"SAFE      acme/tiny@{commit}:model.pth: torch, 1 tensors" in lines
    assert any(line.startswith(f"DANGEROUS acme/tiny@{commit}:sub/evil.pth: ") for line in lines)
    assert f"SAFE      solo@{commit}: torch-sharded, 1 tensors" in lines  # a model folder, read as one
    assert any(line.startswith("SAFE      ") and line.endswith("/blobs/" + "f" * 64 + ": torch, 1 tensors")
               for line in lines)  # the orphan blob is still scanned, by its path
    assert len(lines) == 4 and "blobs/" not in "".join(line for line in lines if "@" in line)
    doc = json.loads(invoke("scan", cache, "--json").stdout)
    names = {r["name"] for r in doc["results"] if r["verdict"] != "skipped"}
    assert f"acme/tiny@{commit}:sub/evil.pth" in names
    evil = next(r for r in doc["results"] if r["name"].endswith("evil.pth"))
    assert "/snapshots/" in evil["path"]
    assert invoke("scan", cache, "--exclude", "sub/*").exit_code == 0  # patterns see the file's name in the repo


def test_pre_commit_hook_runs_scan_over_checkpoint_types(tree):
    import yaml

    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "ckconv-scan")
    import re

    pattern = re.compile(hook["files"])
    for name in ("a.pth", "b/c.safetensors", "pytorch_model.bin", "x.ckpt", "y.pt", "z.npz", "w.pkl"):
        assert pattern.search(name), name
    for name in ("README.md", "config.json", "train.py"):
        assert not pattern.search(name), name
    exe = Path(sys.executable).with_name(hook["entry"].split()[0])
    args = [str(exe), *hook["entry"].split()[1:], *hook.get("args", [])]
    good = subprocess.run(args + [str(tree / "good.pth")], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run(args + [str(tree / "good.pth"), str(tree / "sub dir" / "evil.pth")], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "DANGEROUS" in bad.stdout
