"""Fifth red-team pass: records a walk never visits because they are dict keys.

``tree.walk`` visits a dict's values, not its keys, so ``{PosixPath('x'): t}`` (which torch loads as it reads) held a
record that ``inspect``'s foreign list and ``convert``'s "kept ... foreign objects" note left out; a payload as a key
was still judged by the pickle's globals. Each payload has its positive control (torch, in a subprocess, creates the
canary file).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckconv import tree, tree_keys
from ckconv.cli import cli
from ckconv.errors import LimitExceeded
from ckconv.model import foreign_class

HOSTILE = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"
_spec = importlib.util.spec_from_file_location("make_hostile", HOSTILE / "make_hostile.py")
GEN = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(GEN)
CANARY = GEN.CANARY
TENSOR = GEN.tensor("0", 2, [2], [1])
PATH = GEN.call("pathlib", "PosixPath", "somewhere")
HANDLER = GEN.call("logging", "FileHandler", CANARY)
LOAD = "import sys, torch; print(repr(list(torch.load(sys.argv[1], weights_only=False))))"

KEYS = {  # name: (the key's opcodes, the foreign record it holds)
    "record": (PATH, "pathlib.PosixPath"),
    "in_tuple": (b"(" + GEN.S("a") + PATH + b"t", "pathlib.PosixPath"),
    "in_frozenset": (GEN.G("builtins", "frozenset") + b"((" + PATH + b"ltR", "pathlib.PosixPath"),
}


def _pth(path: Path, key: bytes) -> Path:
    path.write_bytes(GEN.torch_zip(GEN.P(GEN.D((key, TENSOR), (GEN.S("w"), TENSOR))), {"0": b"\0" * 8}))
    return path


@pytest.mark.parametrize("name", sorted(KEYS))
def test_a_record_as_a_key_is_listed(name, tmp_path):
    key, cls = KEYS[name]
    f = _pth(tmp_path / "k.pth", key)
    ran = subprocess.run([sys.executable, "-c", LOAD, str(f)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "PosixPath('somewhere')" in ran.stdout  # torch reads the key as a record too
    out = CliRunner().invoke(cli, ["inspect", "--json", str(f)])
    assert out.exit_code == 0, out.output
    assert [r["class"] for r in json.loads(out.output)["foreign"]] == [cls]
    done = CliRunner().invoke(cli, ["convert", str(f), str(tmp_path / "out.pth")])
    assert done.exit_code == 0, done.output
    assert f"kept 1 foreign objects as inert records: {cls}" in done.output


def test_a_payload_as_a_key_is_never_safe(tmp_path):
    f = _pth(tmp_path / "k.pth", HANDLER)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    subprocess.run([sys.executable, "-c", LOAD, str(f)], cwd=sandbox, capture_output=True, timeout=300)
    assert (sandbox / CANARY).exists()  # positive control: torch runs the key
    out = CliRunner().invoke(cli, ["inspect", "--json", str(f)])
    report = json.loads(out.output)
    assert report["verdict"] != "safe" and "logging.FileHandler" in report["globals"]["unknown"]
    assert [r["class"] for r in report["foreign"]] == ["logging.FileHandler"]
    assert CliRunner().invoke(cli, ["scan", str(f)]).exit_code == 1


def test_records_in_keys_of_keys_within_the_node_limit(monkeypatch):
    Rec = foreign_class("pathlib", "PosixPath")
    inner = Rec()
    inner.state = {Rec(): 1}  # a key's own dict with a record for a key
    root = {"w": 1, ("t", inner): 2}
    assert sorted(c for _, c in tree_keys.foreign_objects(root)) == ["pathlib.PosixPath"] * 2
    shared = tuple(range(50))
    many = {(i, shared): i for i in range(50)}  # one big part shared by many keys: each key's walk counts
    monkeypatch.setattr(tree, "MAX_NODES", 1000)
    with pytest.raises(LimitExceeded):
        tree_keys.foreign_objects(many)
