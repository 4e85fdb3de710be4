"""``inspect`` of a ``torch.save(model)`` file names tensors as ``model.state_dict()`` does (issue 23), not by the
record's inner path (``state._modules.layer4.state._modules.2...``), and ``--summary`` groups by those names."""

from __future__ import annotations

import json

import torch
import torchvision
from click.testing import CliRunner

from ckconv.cli import cli


def inspect(*args):
    result = CliRunner().invoke(cli, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_whole_model_is_listed_by_its_state_dict_names(tmp_path):
    model = torchvision.models.resnet50(weights=None)
    torch.save(model, tmp_path / "whole.pth")
    info = json.loads(inspect(tmp_path / "whole.pth", "--json"))
    names = [t["name"] for t in info["tensors"]]
    assert names == list(model.state_dict())  # layer4.2.bn2.running_mean, in state_dict order
    assert "layer4.2.bn2.running_mean" in names and not any("_modules" in n for n in names)
    groups = inspect(tmp_path / "whole.pth", "--summary")
    assert all(f"\n{g} " in groups for g in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"))


def test_a_model_inside_a_bundle_keeps_its_key(tmp_path):
    torch.save({"model": torchvision.models.resnet18(weights=None), "epoch": 3}, tmp_path / "bundle.pth")
    names = [t["name"] for t in json.loads(inspect(tmp_path / "bundle.pth", "--json"))["tensors"]]
    assert "model.layer4.1.bn2.running_mean" in names and not any("_modules" in n for n in names)
