"""ckconv.torchrun runs a format's multi-rank plan (``Format.plan_ranks``) without knowing any format by name.

One process stands in for the job here (a group of one rank); tests/test_dcp.py runs two real ranks under torchrun.
"""

from __future__ import annotations

import pytest
import torch

import ckconv
from ckconv import torchrun
from ckconv.errors import CorruptCheckpoint
from ckconv.formats import RankWrite


class OneRank:
    """A process group of one: what rank 0 broadcasts or gathers comes straight back."""

    rank, world = 0, 1

    def bcast(self, obj):
        return obj

    def gather(self, obj):
        return [obj]


class Recorder(RankWrite):
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def setup(self, path):
        self.calls.append("setup")
        path.write_bytes(b"set up")

    def write(self, path, rank):
        self.calls.append(("write", rank))
        if self.fail:
            raise CorruptCheckpoint(self.fail)
        return {"rank": rank}

    def finish(self, path, results):
        self.calls.append(("finish", results))


def test_a_plan_runs_setup_then_every_write_then_finish_with_their_results(tmp_path):
    plan = Recorder()
    torchrun.run_collective(OneRank(), tmp_path / "out.bin", plan, directory=False, force=False)
    assert plan.calls == ["setup", ("write", 0), ("finish", [{"rank": 0}])]
    assert (tmp_path / "out.bin").read_bytes() == b"set up"


def test_a_failing_write_leaves_no_output_and_keeps_its_error(tmp_path):
    plan = Recorder(fail="bad bytes")
    with pytest.raises(CorruptCheckpoint, match="rank 0: bad bytes"):
        torchrun.run_collective(OneRank(), tmp_path / "out.bin", plan, directory=False, force=False)
    assert plan.calls == ["setup", ("write", 0)] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dst, options", [("one.safetensors", {}), ("sharded", {"max_shard_size": "40KB"}),
                                          ("ck", {"format": "dcp"}), ("plain.pth", {})])
def test_save_distributed_writes_what_save_writes(tmp_path, monkeypatch, dst, options):
    """safetensors and dcp through their plans, torch (no plan) by rank 0 alone: the same output as one save."""
    monkeypatch.setattr(torchrun, "Group", OneRank)
    state = {f"w{i}": torch.randn(32, 64) for i in range(4)} | {"step": 3}
    (tmp_path / "dist").mkdir()
    (tmp_path / "single").mkdir()
    name = torchrun.save_distributed(state, tmp_path / "dist" / dst, **options)
    assert name == ckconv.save(state, tmp_path / "single" / dst, **options)

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    if name == "safetensors":  # byte for byte
        assert files(tmp_path / "dist") == files(tmp_path / "single")
    loaded = ckconv.load(tmp_path / "dist" / dst)
    assert loaded["step"] == 3 and all(torch.equal(loaded[k], state[k]) for k in state if k != "step")
