"""Deployment archives: torch.export (.pt2) and TorchScript files, read for the state_dict, never run."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
import torchvision

import ckconv

from helpers import run_cli, tensor_bytes


def _same_state_dict(got: dict, want: dict):
    assert list(got) == list(want)  # model.state_dict() order
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert tensor_bytes(got[k]) == tensor_bytes(v), k


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """torch.export.save of a torchvision model with trained-looking buffers (random running stats)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("export") / "mnv3.pt2"
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    torch.export.save(program, path)
    return path, model


def test_export_convert_gives_the_model_state_dict(exported, tmp_path):
    path, model = exported
    out = tmp_path / "w.safetensors"
    r = run_cli("convert", path, out)
    assert r.returncode == 0, r.stderr
    got = ckconv.load(out)
    _same_state_dict(got, model.state_dict())
    fresh = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    fresh.load_state_dict(got)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))


def test_export_scan_and_inspect_name_the_code(exported):
    path, _ = exported
    r = run_cli("scan", path)
    assert r.returncode == 1 and r.stdout.startswith("CODE") and "torch-export" in r.stdout
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert info["format"] == "torch-export" and info["verdict"] == "code"


def test_export_is_not_written(exported, tmp_path):
    r = run_cli("convert", exported[0], tmp_path / "x.pt2", "--to", "torch-export")
    assert r.returncode != 0 and "does not write" in r.stderr and not (tmp_path / "x.pt2").exists()


def _rewrite(src, dst, name_suffix, change):
    """A copy of archive ``src`` with the record ending in ``name_suffix`` replaced by ``change(bytes)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, change(data) if info.filename.endswith(name_suffix) else data)


@pytest.mark.parametrize("tamper, message", [
    (lambda c: c["config"]["features.0.0.weight"].update(path_name="missing"), "names no record"),
    (lambda c: c["config"]["features.0.0.weight"]["tensor_meta"]["sizes"][0].update(as_int=10**6),
     "reaches past its record"),
    (lambda c: c["config"]["features.0.0.weight"]["tensor_meta"].update(layout=1), "strided tensors"),
])
def test_export_lies_are_refused(exported, tmp_path, tamper, message):
    def change(raw):
        config = json.loads(raw)
        tamper(config)
        return json.dumps(config).encode()

    bad = tmp_path / "bad.pt2"
    _rewrite(exported[0], bad, "model_weights_config.json", change)
    out = tmp_path / "out.safetensors"
    r = run_cli("convert", bad, out)
    assert r.returncode != 0 and message in r.stderr and not out.exists()
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
