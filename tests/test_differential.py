"""torch is the oracle: files torch and ckconv could read differently are refused, the rest read as torch reads them.

Two parts. The committed corpus ``fixtures/hostile/differential`` (every ambiguity the harness ever found, each
with a positive control: torch.load runs the hidden payload) must be refused as broken. The harness mutates real
torch.save files (zip with pickle protocols 2/4/5, legacy, plain pickles) with ``mutants.py``, hands every mutant
to ``torch.load(weights_only=False)`` in a sandboxed subprocess (``torch_oracle.py``: a folder per file, a canary
the payload creates, a timeout) and to ckconv, and asserts:

* if torch runs code, ckconv's verdict is not safe (``scan`` exit 0 never happens);
* if torch loads tensors, ckconv reads the same tensor bytes, or refuses the file with one clean error;
* if ckconv reads an archive, it reads the ``data.pkl`` torch's ``PyTorchFileReader`` picks.

``make test`` runs a short seeded corpus; ``make fuzz`` a long one (CKCONV_DIFF_COUNT, CKCONV_DIFF_SEED).
A mismatch leaves the mutant in the pytest temp folder: add it to make_differential.py as a fixture.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mutants as M
from ckconv import io as ckio
from ckconv import tree
from ckconv.cli import cli
from ckconv.errors import CkconvError
from ckconv.model import gather
from ckconv.reports import scanning
from ckconv.storage.zipio import ZipRecords

HERE = Path(__file__).resolve().parent
ORACLE = HERE / "torch_oracle.py"
CORPUS = HERE.parent / "fixtures" / "hostile" / "differential"
MANIFEST = json.loads((CORPUS / "expected.json").read_text())
SEED = int(os.environ.get("CKCONV_DIFF_SEED", "21"))
COUNT = int(os.environ.get("CKCONV_DIFF_COUNT", "90"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_differential", CORPUS / "make_differential.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_oracle(paths, root: Path, per_file=30) -> dict:
    """{path: what torch did} for many files in one subprocess, restarted past any file that kills it."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, p in enumerate(paths):
        folder = root / f"run{i}"
        folder.mkdir()
        jobs.append([str(p), str(folder)])
    results: dict = {}
    pending = jobs
    while pending:
        (root / "jobs.json").write_text(json.dumps(pending))
        out = root / "results.jsonl"
        try:
            subprocess.run([sys.executable, str(ORACLE), str(root / "jobs.json"), str(out)], cwd=root,
                           timeout=60 + per_file * len(pending), capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            pass
        for line in out.read_text().splitlines() if out.exists() else ():
            r = json.loads(line)
            results[r["path"]] = r
        out.unlink(missing_ok=True)
        left = [j for j in pending if j[0] not in results]
        if left:  # the first one left killed or stalled the process: torch did not load it
            path, folder = left[0]
            results[path] = {"path": path, "loaded": False, "error": "crashed or timed out", "tensors": [],
                             "picked": None, "ran": os.path.exists(os.path.join(folder, M.CANARY))}
            left = left[1:]
        pending = left
    return results


def ckconv_reading(path: Path):
    """(scan's verdict is safe, tensors [shape, sha256] or None when read refused it, sha256 of the data.pkl it
    read from a zip archive)."""
    safe = scanning.exit_code([scanning.scan_one(path)]) == 0
    try:
        ckpt = ckio.read(path)
        found = sorted([list(ref.shape), hashlib.sha256(gather(ref)).hexdigest()] for _, ref in tree.tensors(ckpt.root))
    except CkconvError:
        return safe, None, None
    picked = None
    if path.read_bytes()[:4] == b"PK\x03\x04":
        records = ZipRecords(path)
        name = next(n for n in records.records if n.endswith("/data.pkl"))
        picked = hashlib.sha256(records.read(name)).hexdigest()
    return safe, found, picked


# --- the committed corpus --------------------------------------------------------------------------------------

def test_corpus_is_current():
    gen = _generator()
    assert MANIFEST == gen.manifest(), "expected.json is stale: run make_differential.py"
    for name in MANIFEST:
        assert (CORPUS / name).is_file(), f"{name} missing: run make_differential.py"


@pytest.fixture(scope="module")
def under_torch(tmp_path_factory, bases):
    """One oracle subprocess for the corpus, the bases and the seeded mutants: {path: what torch did}, and the
    base and mutant files (in a folder the test keeps for a mismatch)."""
    folder = tmp_path_factory.mktemp("differential")
    base_paths = []
    for name, data in bases.items():
        base_paths.append(folder / f"{name}.pth")
        base_paths[-1].write_bytes(data)
    rng = random.Random(SEED)
    mutant_paths = []
    for i in range(COUNT):
        kind, data = M.mutate(bases, rng)
        mutant_paths.append(folder / f"m{i:05d}-{kind}.pth")
        mutant_paths[-1].write_bytes(data)
    corpus = [CORPUS / n for n in sorted(MANIFEST)]
    results = run_oracle(corpus + base_paths + mutant_paths, folder / "oracle")
    return results, base_paths, mutant_paths, folder


@pytest.fixture(scope="module")
def corpus_under_torch(under_torch):
    return {n: under_torch[0][str(CORPUS / n)] for n in sorted(MANIFEST)}


@pytest.mark.parametrize("name", sorted(n for n, c in MANIFEST.items() if c["payload"]))
def test_positive_control_torch_runs_the_hidden_payload(name, corpus_under_torch):
    assert corpus_under_torch[name]["ran"], corpus_under_torch[name]


def test_the_byteorder_spelling_changes_what_torch_loads(corpus_under_torch, tmp_path):
    """The control of a case without payload: torch byte-swaps every tensor because of BYTEORDER's other case."""
    torch_result = corpus_under_torch["zip_byteorder_other_case.pth"]
    assert torch_result["loaded"]
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.int64)}, plain)
    hashes = {h for _, h in torch_result["tensors"]}
    assert hashes.isdisjoint(h for _, h in ckconv_reading(plain)[1])


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_is_refused_as_broken_in_one_line(name, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    monkeypatch.chdir(tmp_path)
    proc = CliRunner().invoke(cli, ["convert", str(CORPUS / name), str(out)])
    lines = proc.stderr.splitlines()
    assert proc.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: "), proc.output
    assert MANIFEST[name]["expected"] in lines[0] and "internal error" not in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / M.CANARY).exists()
    result = scanning.scan_one(CORPUS / name)
    assert result.verdict == scanning.BROKEN, result


# --- the harness ------------------------------------------------------------------------------------------------

def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bases():
    g = torch.Generator().manual_seed(SEED)
    state = {"w": torch.randn(3, 4, generator=g), "n": torch.arange(6, dtype=torch.int64), "lr": 0.1,
             "names": ["a", "b"], "tied": None}
    state["tied"] = state["w"][1]
    plain = {"epoch": 3, "lr": 0.5, "names": ["x", "y"], "nested": {"k": (1, 2)}}
    # a state_dict of 60 small tensors in torch's layout: its mutants reach the scan's run of entries, the zip
    # local headers' read-ahead and the writers' gathering of small tensors, which 3-tensor bases never do
    many = {f"layers.{i // 10}.w{i % 10}": torch.randn(2, 2, generator=g) for i in range(60)}
    many["layers.0.view"] = many["layers.0.w0"][1]
    return {
        "zip2many": _saved(many), "zip4many": _saved(many, pickle_protocol=4),
        "zip2": _saved(state), "zip4": _saved(state, pickle_protocol=4), "zip5": _saved(state, pickle_protocol=5),
        "legacy2": _saved(state, _use_new_zipfile_serialization=False),
        "legacy4": _saved(state, _use_new_zipfile_serialization=False, pickle_protocol=4),
        "plain2": pickle.dumps(plain, protocol=2), "plain4": pickle.dumps(plain, protocol=4),
        "plain5": pickle.dumps(plain, protocol=5),
    }


def test_the_bases_read_the_same_both_ways(under_torch, tmp_path, monkeypatch):
    """The harness's control: unmutated torch.save files load in torch and read identically in ckconv."""
    oracle, paths, _, _ = under_torch
    monkeypatch.chdir(tmp_path)
    for p in paths:
        safe, found, _ = ckconv_reading(p)
        r = oracle[str(p)]
        assert not r["ran"] and safe, p.name
        if r["loaded"]:
            assert found == r["tensors"] and len(found) >= 3, p.name
        else:  # a plain pickle: torch refuses it for its magic number after loading it
            assert "magic number" in r["error"] and found == [], (p.name, r["error"])


def test_differential_harness(under_torch, tmp_path, monkeypatch):
    oracle, _, paths, folder = under_torch
    cwd = tmp_path / "ckconv-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    mismatches, tally = [], {}
    for p in paths:
        r = oracle[str(p)]
        safe, found, picked = ckconv_reading(p)
        outcome = "ran" if r["ran"] else "loaded" if r["loaded"] else "failed"
        tally[outcome, found is not None] = tally.get((outcome, found is not None), 0) + 1
        if r["ran"] and safe:
            mismatches.append(f"{p.name}: torch runs its payload, ckconv says safe")
        if r["loaded"] and found is not None and found != r["tensors"]:
            mismatches.append(f"{p.name}: ckconv reads other tensors than torch")
        if picked is not None and picked != r["picked"]:
            mismatches.append(f"{p.name}: ckconv reads another data.pkl than torch's PyTorchFileReader picks")
        assert not (cwd / M.CANARY).exists(), f"{p.name}: ckconv ran the payload"
    print(f"differential: seed {SEED}, {len(paths)} mutants; (torch outcome, ckconv read it): {sorted(tally.items())}")
    assert not mismatches, "\n".join(mismatches) + f"\nseed {SEED}; mutants kept in {folder}"
    assert any(k[0] == "ran" for k in tally) and any(k[0] == "loaded" for k in tally), tally
