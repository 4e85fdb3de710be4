"""Selectors: Python-like paths into a module tree, for --select, --only, --drop and freeze."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ckconv import freeze
from ckconv.errors import UsageError
from ckconv.matching.selectors import filter_keys, parse, select


@pytest.fixture(scope="session")
def net():
    """A small VGG-like tree: Sequential features (with parameterless layers), a named classifier, a ModuleDict."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8))
    classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = nn.Sequential(OrderedDict(features=features, classifier=classifier))
    model.heads = nn.ModuleDict({"cls": nn.Linear(8, 3), "box": nn.Linear(8, 4)})
    return model


def names(net, selector):
    return [q for q, _ in select(net, selector)]


def test_parse():
    assert parse("features[:10]") == [("name", "features"), ("slice", slice(None, 10))]
    assert parse("classifier[-1]") == [("name", "classifier"), ("index", -1)]
    assert parse("layer4.0.conv1") == [("name", "layer4"), ("name", "0"), ("name", "conv1")]
    assert parse("heads['cls']") == [("name", "heads"), ("key", "cls")]
    assert parse("features[1:8:2][0]") == [("name", "features"), ("slice", slice(1, 8, 2)), ("index", 0)]
    assert parse("") == []


@pytest.mark.parametrize("bad", ["features[", "features..x", "features.", "a[b]", "a b", ".x", "a.[0]"])
def test_malformed_selectors(bad):
    with pytest.raises(UsageError, match="selector"):
        parse(bad)


def test_select_like_python(net):
    assert names(net, "features[:3]") == ["features.0", "features.1", "features.2"]
    assert names(net, "features[-2:]") == ["features.5", "features.6"]
    assert names(net, "classifier[-1]") == ["classifier.2"]
    assert select(net, "classifier[-1]")[0][1] is net.classifier[-1]
    assert names(net, "features[2:6][1]") == ["features.3"]  # an index after a slice picks within the slice
    assert names(net, "features.5") == ["features.5"]
    assert names(net, "heads['box']") == ["heads.box"]
    assert names(net, "classifier.0.weight") == ["classifier.0.weight"]
    assert names(net, "") == [""]


def test_select_errors_name_what_exists(net):
    with pytest.raises(UsageError, match=r"no submodule 'nope' \(its children: features, classifier, heads\)"):
        select(net, "nope")
    with pytest.raises(UsageError, match="index 9 is out of range"):
        select(net, "classifier[9]")


def test_filter_keys(net):
    keys = list(net.state_dict())
    kept = filter_keys(keys, only=["features[:3]"], model=net)
    assert kept == ["features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"]
    assert filter_keys(keys, drop=["features", "heads"], model=net) == [
        "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"]
    assert filter_keys(keys, only=["classifier"], drop=["classifier[-1]"], model=net) == [
        "classifier.0.weight", "classifier.0.bias"]
    # without a model only dotted names work: an index would count modules that hold no tensors
    assert filter_keys(keys, only=["features.6"]) == [k for k in keys if k.startswith("features.6.")]
    with pytest.raises(UsageError, match="needs the architecture"):
        filter_keys(keys, only=["features[2]"])


def test_freeze():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    assert freeze(model, "[:2]") == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [p.requires_grad for p in model.parameters()] == [False] * 4 + [True] * 2
    assert freeze(model, ["2.bias"]) == ["2.bias"] and not model[2].bias.requires_grad
    freeze(model, "", requires_grad=True)
    assert all(p.requires_grad for p in model.parameters())
