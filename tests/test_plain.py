"""``convert --plain`` (issue 12): what users are told to load with ``weights_only=False`` comes out loadable with
``weights_only=True``, every change listed, tensors bit for bit."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from ckconv.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def load_weights_only(path, cwd, check):
    """torch.load(path, weights_only=True) in a fresh process, then ``check`` (code using ``obj``)."""
    code = f"import torch, numpy as np\nobj = torch.load({str(path)!r}, weights_only=True)\n{check}\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_whole_module_becomes_its_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None)
    torch.save(model, tmp_path / "whole.pth")
    torch.save(model.state_dict(), tmp_path / "ref.pth")
    # the tutorial's own file refuses weights_only=True
    with pytest.raises(Exception):
        torch.load(tmp_path / "whole.pth", weights_only=True)
    result = invoke("convert", tmp_path / "whole.pth", tmp_path / "plain.pth", "--plain", "--json")
    assert result.exit_code == 0, result.output
    changes = json.loads(result.stdout)["changes"]
    assert changes == [f"<root>: pickled module torchvision.models.squeezenet.SqueezeNet -> its state_dict "
                       f"({len(model.state_dict())} tensors)"]
    load_weights_only(tmp_path / "plain.pth", tmp_path, f"""
ref = torch.load({str(tmp_path / 'ref.pth')!r}, weights_only=True)
assert list(obj) == list(ref) and all(torch.equal(obj[k], ref[k]) for k in ref)
assert obj._metadata == ref._metadata
""")


def test_numpy_records_and_references_become_plain_values(tmp_path):
    from lightning.fabric.utilities.data import AttributeDict
    from omegaconf import OmegaConf

    g = np.random.default_rng(0)
    arr = g.random((3, 4)).astype(np.float32)
    src = {
        "weight": torch.randn(4),
        "np_arr": arr, "big_endian": np.arange(5, dtype=">i4"), "strings": np.array(["a", "bc"]),
        "np_scalar": np.float64(2.5), "np_int": np.int32(7), "np_rng": np.random.get_state(),
        "args": argparse.Namespace(lr=0.1, layers=[1, 2]), "hparams": AttributeDict(width=8, name="x"),
        "cfg": OmegaConf.create({"model": {"depth": 3, "act": "relu"}, "lrs": [0.1, 0.01]}),
        "norm": torch.nn.BatchNorm2d, "dtype": np.dtype("float16"),
    }
    torch.save(src, tmp_path / "src.pth")
    with pytest.raises(Exception):
        torch.load(tmp_path / "src.pth", weights_only=True)
    result = invoke("convert", tmp_path / "src.pth", tmp_path / "plain.pth", "--plain")
    assert result.exit_code == 0, result.output
    assert "np_arr: numpy float32 array [3, 4] -> tensor" in result.stdout
    assert "norm: class reference torch.nn.modules.batchnorm.BatchNorm2d -> its name" in result.stdout
    np.save(tmp_path / "arr.npy", arr)
    load_weights_only(tmp_path / "plain.pth", tmp_path, f"""
arr = np.load({str(tmp_path / 'arr.npy')!r})
assert obj["np_arr"].dtype == torch.float32 and np.array_equal(obj["np_arr"].numpy(), arr)
assert obj["big_endian"].tolist() == [0, 1, 2, 3, 4] and obj["big_endian"].dtype == torch.int32
assert obj["strings"] == ["a", "bc"]
assert obj["np_scalar"] == 2.5 and type(obj["np_scalar"]) is float and obj["np_int"] == 7
assert obj["np_rng"][0] == "MT19937" and obj["np_rng"][1].dtype == torch.uint32
assert obj["args"] == {{"lr": 0.1, "layers": [1, 2]}}
assert obj["hparams"] == {{"width": 8, "name": "x"}}
assert obj["cfg"] == {{"model": {{"depth": 3, "act": "relu"}}, "lrs": [0.1, 0.01]}}, obj["cfg"]
assert obj["norm"] == "torch.nn.modules.batchnorm.BatchNorm2d" and obj["dtype"] == "float16"
""")


def test_plain_on_a_plain_checkpoint_changes_nothing(tmp_path):
    torch.save({"w": torch.arange(3.0), "epoch": 2}, tmp_path / "a.pth")
    result = invoke("convert", tmp_path / "a.pth", tmp_path / "b.pth", "--plain")
    assert result.exit_code == 0 and "nothing to rewrite" in result.stdout
    assert invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth").exit_code == 0
