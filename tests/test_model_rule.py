""""Where is the model state_dict?" has one answer, and every command gives it.

A checkpoint with two candidates under model-like keys (``net`` and ``params``) is read by ``convert --model-only``,
``convert --arch``, ``match``, ``inspect`` and ``load_bundle``; each must take the same one, whichever key holds it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ckconv
from ckconv.bundles import load_bundle
from ckconv.cli import cli

ARCH = "squeezenet1_1"


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None)
    small = {"scale": torch.randn(3), "shift": torch.randn(3)}  # a model-like key holding two stray tensors
    return model.state_dict(), small


@pytest.mark.parametrize("model_key, other_key", [("net", "params"), ("params", "net")])
def test_every_command_takes_the_same_model(tmp_path, weights, model_key, other_key):
    sd, small = weights
    src = tmp_path / "ckpt.pth"
    order = {model_key: sd, other_key: small} if model_key == "net" else {other_key: small, model_key: sd}
    torch.save(order, src)
    runner = CliRunner()

    out = runner.invoke(cli, ["convert", str(src), str(tmp_path / "only.safetensors"), "--model-only"])
    assert out.exit_code == 0, out.output
    only = ckconv.load(tmp_path / "only.safetensors")
    assert list(only) == list(sd)

    out = runner.invoke(cli, ["convert", str(src), str(tmp_path / "arch.pth"), "--arch", ARCH])
    assert out.exit_code == 0, out.output
    remapped = torch.load(tmp_path / "arch.pth", weights_only=True)
    assert all(torch.equal(remapped["model"][k], v) for k, v in sd.items())
    assert remapped[other_key].keys() == small.keys()  # the other candidate is kept, under its name

    out = runner.invoke(cli, ["match", str(src), "--arch", ARCH, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["section"] == model_key

    out = runner.invoke(cli, ["inspect", str(src)])
    assert out.exit_code == 0, out.output
    assert f"model at {model_key}" in out.stdout

    target = torchvision.models.get_model(ARCH, weights=None)
    load_bundle(src, model=target)  # strict: every key of the architecture, from the same candidate
    assert all(torch.equal(target.state_dict()[k], v) for k, v in sd.items())
