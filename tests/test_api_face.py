"""The Python face: ``dir(ckconv)`` shows the lazy API, ``import ckconv`` imports no torch, ``load(device=)``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckconv
from helpers import assert_deep_equal

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_dir_shows_the_lazy_api():
    names = dir(ckconv)
    for name in ("load", "convert", "load_into", "read", "save", "inspect", "diff", "match", "MatchReport", "Match",
                 "Mismatch", "Filled", "KeyEntry", "Ambiguity", "Candidate", "save_bundle", "load_bundle", "freeze",
                 "CkconvError", "__version__", "hookimpl"):
        assert name in names, name
    assert set(ckconv.__all__) <= set(names)
    assert all(callable(getattr(ckconv, n)) for n in ("load", "convert", "load_into"))


def test_every_report_type_is_exported_and_documented():
    """Each dataclass a MatchReport holds is ``ckconv.<name>``, in ``dir(ckconv)`` and named in docs/matching.md."""
    from ckconv.matching import report

    kinds = [n for n, v in vars(report).items() if dataclasses.is_dataclass(v) and v.__module__ == report.__name__]
    assert {"MatchReport", "Match", "Mismatch", "Filled", "KeyEntry", "Ambiguity", "Candidate"} <= set(kinds)
    docs = (FIXTURES.parent / "docs" / "matching.md").read_text(encoding="utf-8")
    for name in kinds:
        assert getattr(ckconv, name) is getattr(report, name) and name in dir(ckconv), name
        assert f"`{name}`" in docs, f"docs/matching.md does not name {name}"


def test_import_and_dir_do_not_import_torch():
    code = "import sys, ckconv; dir(ckconv); ckconv.convert; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_places_tensors_on_the_device_asked_for():
    on_cpu = ckconv.load(FIXTURES / "tiny_bundle.pth")
    assert_deep_equal(ckconv.load(FIXTURES / "tiny_bundle.pth", device="cpu"), on_cpu)
    assert_deep_equal(ckconv.load(FIXTURES / "tiny_bundle.pth", map_location=torch.device("cpu")), on_cpu)
    meta = ckconv.load(FIXTURES / "tiny_bundle.pth", device="meta")
    weights = meta["model"]["features.0.weight"]
    assert weights.device.type == "meta" and weights.shape == on_cpu["model"]["features.0.weight"].shape
    assert weights.dtype == on_cpu["model"]["features.0.weight"].dtype
    assert meta["epoch"] == on_cpu["epoch"]  # values other than tensors are untouched


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu7"}, "unknown device 'gpu7'"),
    ({"map_location": {"cuda:0": "cpu"}}, "device must be a torch.device or its name"),
    ({"device": "cpu", "map_location": "meta"}, "disagree; pass one"),
])
def test_a_bad_device_is_a_usage_error(kwargs, message):
    with pytest.raises(ckconv.errors.UsageError, match=message):
        ckconv.load(FIXTURES / "tiny_bundle.pth", **kwargs)
