"""Shared test helpers: deep equality that is bit-exact for tensors, and a CLI runner."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import torch


def assert_deep_equal(a, b, path="<root>", check_tied=True):
    """Same nesting, same container types, same keys in the same order, same scalars, tensors bit for bit.

    ``check_tied``: and the same tensors share a storage on both sides (tied weights stay tied, untied stay apart).
    """
    seen: list = []
    _deep_equal(a, b, path, seen)
    if check_tied:
        assert _ties(seen, 1) == _ties(seen, 2), "tensors that share a storage differ: " + \
            f"{sorted(map(sorted, _ties(seen, 1)))[:3]} vs {sorted(map(sorted, _ties(seen, 2)))[:3]}"


def _ties(seen, side):
    groups: dict = {}
    for entry in seen:
        t = entry[side]
        if t.numel():
            groups.setdefault(t.untyped_storage().data_ptr(), set()).add(entry[0])
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _deep_equal(a, b, path, seen):
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad differs"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: tensor bytes differ"
        seen.append((path, a, b))
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys differ: {list(a)[:5]} vs {list(b)[:5]}"
        for k in a:
            _deep_equal(a[k], b[k], f"{path}.{_text(k)}", seen)
        if isinstance(a, OrderedDict):
            _deep_equal(getattr(a, "__dict__", {}), getattr(b, "__dict__", {}), f"{path}.@attrs", seen)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _deep_equal(x, y, f"{path}[{i}]", seen)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan != {b}"
    else:
        assert a == b, f"{path}: {_text(a, repr)} != {_text(b, repr)}"


def _text(value, show=str):
    """``show(value)``, or an int too long for ``str`` (Python's 4,300-digit limit) by its size and ends."""
    if isinstance(value, int) and value.bit_length() > 13_000:
        digits = format(abs(value), "x")
        return f"<{value.bit_length()}-bit int {'-' if value < 0 else ''}0x{digits[:8]}...{digits[-8:]}>"
    return show(value)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def run_cli(*args, cwd=None, env=None):
    """Run the installed ``ckconv`` as a real subprocess; returns CompletedProcess with text output."""
    exe = Path(sys.executable).with_name("ckconv")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
