"""ckconv-timm: timm architectures, and timm <-> torchvision conversion proven by equal outputs (eval mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckconv
from ckconv import plugins
from ckconv.errors import UsageError

import ckconv_timm

INPUT = (1, 3, 64, 64)


@pytest.fixture(autouse=True)
def fresh_host(monkeypatch):
    monkeypatch.delenv("CKCONV_LOAD_PLUGINS", raising=False)
    monkeypatch.setenv("CKCONV_CACHE_DIR", "")  # no on-disk spec cache: test what the plugin builds now
    plugins.reset()
    yield
    plugins.reset()


def randomized(arch, seed):
    """``arch`` with seeded random weights, in eval mode, its BatchNorm statistics taken from a random batch."""
    return fill_random(ckconv_timm.build(arch).to_empty(device="cpu"), seed)  # meta build: no library init


def fill_random(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                t.zero_()
            elif t.dim() > 1:
                bound = (3 / t[0].numel()) ** 0.5  # variance 1/fan_in
                t.uniform_(-bound, bound, generator=g)
            elif name.endswith(("running_var", "weight")):  # BatchNorm scale and variance
                t.uniform_(0.5, 1.5, generator=g)
            else:
                t.uniform_(-0.1, 0.1, generator=g)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if norms:  # statistics that match the activations keep every layer's output O(1)
            for m in norms:
                m.momentum = 1.0
            model.train()(torch.randn((2, *INPUT[1:]), generator=g))
    return model.eval()


def converted(state_dict, arch):
    """Load ``state_dict`` converted for ``arch`` into a weightless ``arch`` (strict: every key, every shape)."""
    model = ckconv_timm.build(arch)  # meta: no memory, no init time
    model.load_state_dict(ckconv_timm.convert_state_dict(state_dict, arch), strict=True, assign=True)
    return model.eval()


def assert_same_outputs(a, b, seed=0):
    x = torch.randn(INPUT, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ya.shape == yb.shape == (1, 1000)
    assert ya.abs().max() > 1e-3  # a dead network would prove nothing
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source, target", [("timm:vgg16", "torchvision:vgg16"),
                                            ("torchvision:vgg11_bn", "timm:vgg11_bn"),
                                            ("timm:resnet50", "torchvision:resnet50"),
                                            ("torchvision:resnet18", "timm:resnet18")])
def test_conversion_gives_equal_outputs(source, target):
    model = randomized(source, seed=len(source))
    assert_same_outputs(model, converted(model.state_dict(), target))


@pytest.mark.parametrize("source, target", [("timm:vgg11", "torchvision:vgg11"), ("torchvision:vgg11", "timm:vgg11")])
def test_ckconv_match_finds_the_proven_conversion(source, target):
    """``ckconv match`` / ``convert --arch`` use the registered rules and reach exactly ``convert_state_dict``."""
    sd = ckconv_timm.build(source).to_empty(device="cpu").state_dict()  # allocated, never initialised: fast
    report = ckconv.match(sd, target)
    assert report.complete and not report.mismatched and not report.unexpected
    want = ckconv_timm.convert_state_dict(sd, target)
    by_source = {want_key: key for key, want_key in zip(sd, want)}
    mapping = report.mapping()
    assert list(mapping) == list(want)
    for name, m in mapping.items():
        assert m.source == by_source[name] and tuple(m.shape) == tuple(want[name].shape), m.to_dict()
    head = {m.target: m for m in report.matched if m.reshape is not None}
    assert sorted(head) == sorted(k for k in want if k.endswith("weight") and k.startswith(("classifier.0",
                                  "classifier.3", "pre_logits")))
    assert all(m.how == "rule" for m in head.values())


def test_match_prints_a_timm_spec_through_the_cli():
    from click.testing import CliRunner

    from ckconv.cli import cli

    result = CliRunner().invoke(cli, ["match", "--arch", "timm:resnet18", "--arch-option", "num_classes=7", "--json"])
    assert result.exit_code == 0, result.output
    tensors = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    assert tensors["fc.weight"]["shape"] == [7, 512] and tensors["bn1.running_mean"]["kind"] == "buffer"


def test_vgg_rules_rename_and_reshape_both_ways_bit_exact():
    timm_sd = ckconv_timm.build("timm:vgg11").state_dict()
    tv = ckconv_timm.convert_state_dict(timm_sd, "torchvision:vgg11")
    assert [k for k in tv if not k.startswith("features.")] == [
        "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
        "classifier.6.weight", "classifier.6.bias"]
    assert tv["classifier.0.weight"].shape == (4096, 512 * 7 * 7) and tv["classifier.3.weight"].shape == (4096, 4096)
    rules = [r for r in ckconv_timm.key_rules() if r.applies_to("torchvision:vgg16")]
    assert [r.name for r in rules] == ["timm.vgg_to_torchvision"]
    assert rules[0].apply("pre_logits.fc1.weight") == "classifier.0.weight"
    assert rules[0].apply("features.0.weight") == "features.0.weight"
    assert [r.name for r in ckconv_timm.key_rules() if r.applies_to("timm:vgg19_bn")] == ["timm.vgg_from_torchvision"]
    assert not [r for r in ckconv_timm.key_rules() if r.applies_to("torchvision:resnet50")]

    g = torch.Generator().manual_seed(0)
    shapes = ckconv_timm.build("torchvision:vgg11").state_dict()
    sd = {k: torch.randn(shapes[k].shape, generator=g) for k in [*list(shapes)[:2], *list(shapes)[-6:]]}
    back = ckconv_timm.convert_state_dict(ckconv_timm.convert_state_dict(sd, "timm:vgg11"), "torchvision:vgg11")
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_a_head_that_cannot_be_reshaped_is_refused():
    sd = ckconv_timm.build("torchvision:vgg11", num_classes=10).state_dict()
    with pytest.raises(UsageError, match="element counts differ"):
        ckconv_timm.convert_state_dict({"classifier.6.weight": sd["classifier.6.weight"].new_empty(10, 7)},
                                       "timm:vgg11", num_classes=10)
    timm_sd = ckconv_timm.convert_state_dict(sd, "timm:vgg11", num_classes=10)
    assert timm_sd["head.fc.weight"].shape == (10, 4096)


def test_timm_architectures_register_and_build_without_weights():
    source = plugins.host().architectures["timm"]
    assert plugins.host().owners[("architectures", "timm")] == "timm"
    names = source.list()
    assert {"vgg16", "resnet50"} <= set(names) and len(names) > 500
    assert source.version == __import__("timm").__version__
    with torch.device("meta"):
        model = source.build("resnet50", num_classes=10)
    assert model.fc.weight.shape == (10, 2048) and model.fc.weight.device.type == "meta"
    for bad in ({"pretrained": True}, {"checkpoint_path": "/tmp/x.pth"}):
        with pytest.raises(UsageError, match="would load or download weights"):
            source.build("resnet50", **bad)
    with pytest.raises(UsageError, match="no model"):
        source.build("not_a_model")


def test_key_rules_are_registered_under_the_plugin():
    h = plugins.host()
    names = [r.name for r in h.key_rules]
    assert {"timm.vgg_to_torchvision", "timm.vgg_from_torchvision"} <= set(names)
    assert h.owners[("key_rules", "timm.vgg_to_torchvision")] == "timm"


def test_ckconv_plugins_lists_timm_with_its_version():
    out = subprocess.run([str(Path(sys.executable).with_name("ckconv")), "plugins", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert listed["timm"]["version"] == "0.1.0" and not listed["timm"]["builtin"]
    assert listed["timm"]["architectures"] == ["timm"]
    assert listed["timm"]["key_rules"] == ["timm.vgg_to_torchvision", "timm.vgg_from_torchvision"]
