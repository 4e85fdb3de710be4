"""The counting limits refuse at exactly their documented values (docs/safety.md), set through their environment
variables, and a structure record of shared references is refused without being expanded (issue 24)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import ckconv
from ckconv import tree
from ckconv.errors import LimitExceeded
from ckconv.pickling import structure

from helpers import run_cli


def tensors(n):
    return {f"t{i}": torch.full((2,), float(i)) for i in range(n)}


def env_with(**values):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in values.items()})
    return env


@pytest.mark.parametrize("count, refused", [(4, False), (5, True)])
def test_safetensors_tensor_count_limit_is_exact(tmp_path, count, refused):
    src = tmp_path / "in.safetensors"
    save_file(tensors(count), src)
    out = tmp_path / "out.pth"
    run = run_cli("convert", src, out, env=env_with(CKCONV_MAX_TENSORS=4))
    if refused:
        assert run.returncode != 0 and "over the limit of 4" in run.stderr and "CKCONV_MAX_TENSORS" in run.stderr
        assert not out.exists() and os.listdir(tmp_path) == ["in.safetensors"]
    else:
        assert run.returncode == 0, run.stderr
        loaded = torch.load(out, weights_only=True)
        assert sorted(loaded) == sorted(tensors(count)) and all(torch.equal(loaded[k], v)
                                                                for k, v in tensors(count).items())


@pytest.mark.parametrize("limit, refused", [(4, False), (3, True)])
def test_sharded_index_tensor_count_limit_is_exact(tmp_path, limit, refused):
    folder = tmp_path / "sharded"
    ckconv.save(tensors(4), folder, max_shard_size=16)  # 4 tensors of 8 bytes: two shards of two
    assert (folder / "model.safetensors.index.json").exists()
    run = run_cli("inspect", folder, env=env_with(CKCONV_MAX_TENSORS=limit))
    if refused:
        assert run.returncode != 0 and "maps 4 tensors, over the limit of 3" in run.stderr, run.stderr
    else:
        assert run.returncode == 0, run.stderr


def test_walk_node_limit_is_exact(monkeypatch):
    monkeypatch.setattr(tree, "MAX_NODES", 10)
    assert tree.walk([None] * 9) == 10  # the list and its nine items
    with pytest.raises(LimitExceeded, match="more than 10 objects"):
        tree.walk([None] * 10)


def _with_structure(path, record):
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", structure.KEY: json.dumps(record)})


def _shared(levels):
    """Object i holds object i-1 twice: ``levels`` small records standing for 2**levels nodes."""
    objects = [{"$object": "argparse:Namespace", "id": 0, "state": {"a": 1}}]
    for i in range(1, levels):
        objects.append({"$object": "argparse:Namespace", "id": i, "state": {"x": {"$ref": i - 1}, "y": {"$ref": i - 1}}})
    return objects


@pytest.mark.parametrize("limit, refused", [(None, False), (-1, True)])
def test_structure_node_limit_counts_shared_references_exactly(tmp_path, monkeypatch, limit, refused):
    record = {"w": {"$tensor": "w"}, "objects": _shared(6)}
    path = tmp_path / "shared.safetensors"
    _with_structure(path, record)
    expanded = tree.walk(ckconv.read(path).root)  # what a walk visits, shared objects once per place
    monkeypatch.setattr(tree, "MAX_NODES", expanded + (limit or 0))
    if refused:
        # refused while decoding (counted as a walk counts), before any tree of that size exists
        with pytest.raises(LimitExceeded, match=f"{structure.KEY} metadata: structure too large: more than "
                                                f"{expanded - 1} objects"):
            ckconv.read(path)
    else:
        assert tree.walk(ckconv.read(path).root) == expanded


def test_shared_reference_bomb_is_refused_without_expanding_it(tmp_path):
    path = tmp_path / "bomb.safetensors"
    _with_structure(path, {"w": {"$tensor": "w"}, "objects": _shared(64)})  # 5 KB standing for 2**64 nodes
    assert path.stat().st_size < 8_000
    run = run_cli("convert", path, tmp_path / "out.pth")
    assert run.returncode != 0 and "CKCONV_MAX_NODES" in run.stderr
    assert f"{structure.KEY} metadata: structure too large" in run.stderr  # counted while decoding, never expanded
    assert not (tmp_path / "out.pth").exists()


def test_shared_references_deeper_than_the_limit_when_expanded_are_refused(tmp_path, monkeypatch):
    inner: dict = {"a": 1}
    for _ in range(30):
        inner = {"k": inner}
    outer: dict = {"$ref": 0}
    for _ in range(30):
        outer = {"k": outer}
    record = {"w": {"$tensor": "w"}, "objects": [{"$object": "argparse:Namespace", "id": 0, "state": inner}, outer]}
    path = tmp_path / "deep.safetensors"
    _with_structure(path, record)
    assert ckconv.read(path).root["objects"][1]["k"]["k"]
    monkeypatch.setattr(tree, "MAX_DEPTH", 50)  # each half is 32 deep; the expansion is 63 deep
    with pytest.raises(LimitExceeded, match=f"{structure.KEY} metadata: structure too deep"):
        ckconv.read(path)
