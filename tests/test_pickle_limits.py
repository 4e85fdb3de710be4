"""The pickle scan's counting limits refuse at exactly their documented values (docs/safety.md), set through their
environment variables in a real subprocess: memo entries and expanded nodes (``CKCONV_MAX_NODES``), nesting
(``CKCONV_MAX_DEPTH``). And the bounds hold at speed: a 20 MB ``NONE POP`` flood is read, not stalled on (issue 24)."""

from __future__ import annotations

import os

import pytest

from ckconv.errors import LimitExceeded, NotACheckpoint
from ckconv.pickling.scan import scan

from helpers import run_cli


def env_with(**values):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in values.items()})
    return env


def memoized(n):  # one None stored n times (MEMOIZE): n memo entries
    return b"\x80\x04N" + b"\x94" * n + b"."


def flat_list(n):  # a list of n Nones: n + 1 nodes
    return b"\x80\x02](" + b"N" * n + b"e."


def nested(depth):  # depth lists, each inside the next
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


CASES = {  # name -> (pickle of exactly the limit, pickle one past it, variable, limit, message)
    "memo": (memoized(1000), memoized(1001), "CKCONV_MAX_NODES", 1000, "more than 1000 memo entries"),
    "nodes": (flat_list(999), flat_list(1000), "CKCONV_MAX_NODES", 1000, "more than 1000 objects"),
    "depth": (nested(50), nested(51), "CKCONV_MAX_DEPTH", 50, "exceeds 50 levels"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_limit_is_exact(name):
    at, past, variable, limit, message = CASES[name]
    nodes = limit if variable == "CKCONV_MAX_NODES" else 10**6
    depth = limit if variable == "CKCONV_MAX_DEPTH" else 10**6
    scan(at, where="x", max_depth=depth, max_nodes=nodes)
    with pytest.raises(LimitExceeded, match=message):
        scan(past, where="x", max_depth=depth, max_nodes=nodes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_limit_follows_its_environment_variable(name, tmp_path):
    at, past, variable, limit, message = CASES[name]
    (tmp_path / "at.pkl").write_bytes(at)
    (tmp_path / "past.pkl").write_bytes(past)
    ok = run_cli("inspect", tmp_path / "at.pkl", env=env_with(**{variable: limit}))
    assert ok.returncode == 0, ok.stderr
    refused = run_cli("inspect", tmp_path / "past.pkl", env=env_with(**{variable: limit}))
    assert refused.returncode != 0 and message in refused.stderr and variable in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_memo_index_past_the_data_is_refused_before_any_table_grows():
    with pytest.raises(LimitExceeded, match="memo index 4294967280 is implausible"):
        scan(b"\x80\x02Nr\xf0\xff\xff\xff.", where="x", max_depth=10, max_nodes=10)


@pytest.mark.parametrize("body", [b"N0" * 10_000_000, b"K\x000" * 6_000_000, b"(0" * 10_000_000])
def test_opcode_floods_keep_every_check(body):
    """Floods are stepped over in C, and what follows them is still scanned."""
    end, _ = scan(b"\x80\x04" + body + b"N.", where="x", max_depth=10, max_nodes=10)
    assert end == len(body) + 4
    with pytest.raises(NotACheckpoint, match="memo index 7 was never stored"):
        scan(b"\x80\x04" + body + b"h\x07.", where="x", max_depth=10, max_nodes=10)
    with pytest.raises(LimitExceeded, match="more than 10 objects"):
        scan(b"\x80\x04" + body + flat_list(10)[2:], where="x", max_depth=10, max_nodes=10)
