"""Matching real torchvision checkpoints with altered keys: every step of the pipeline, proven functionally.

Each case saves a seeded torchvision model under other names, converts or loads it with ckconv, and checks that a
fresh torchvision model given the result computes the same outputs as the source model (eval mode, atol 1e-5).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import ckconv
from ckconv import architectures_torchvision
from ckconv.matching import targets
from ckconv.matching.report import IncompleteMatch
from matchcases import (ConvHead, as_conv, caffe_squeezenet, differs, fresh, image, legacy_densenet, model,
                        one_thread, same_outputs, spec_cache, state)  # noqa: F401 - fixtures


@pytest.fixture(scope="session")
def resnet18():
    return model("resnet18")


def without_nbt(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def convert_and_load(tmp_path, ckpt, arch, *args, options=None, suffix=".safetensors", **kwargs):
    """Save ``ckpt``, convert it with ckconv.convert(arch=...), load the output strictly into a fresh model."""
    src = tmp_path / "src.pth"
    torch.save(ckpt, src)
    dst = tmp_path / f"out{suffix}"
    result = ckconv.convert(src, dst, arch=arch, arch_options=options, model_only=True, **kwargs)
    target = fresh(arch, **(options or {}))
    target.load_state_dict(ckconv.load(dst), strict=True)
    return result, target


# --- wrappers and prefixes ----------------------------------------------------------------------------------

def test_dataparallel_prefix_converts_losslessly(tmp_path, resnet18):
    assert differs(resnet18, fresh("resnet18"))
    sd = {f"module.{k}": v for k, v in state("resnet18").items()}
    result, target = convert_and_load(tmp_path, sd, "resnet18")
    same_outputs(resnet18, target)
    hows = collections.Counter(m["how"] for m in result.match.to_dict()["matched"])
    assert hows == {"prefix": 122}
    assert result.match.to_dict()["complete"] and result.match.to_dict()["coverage"] == 1.0
    assert result.match.to_dict()["matched"][0]["steps"] == ["strip 'module.'"]


def test_nested_compile_and_ddp_wrappers(resnet18):
    sd = {f"module._orig_mod.{k}": v for k, v in state("resnet18").items()}
    target = fresh("resnet18")
    report = ckconv.load_into(target, {"model": sd, "epoch": 3})
    assert report.complete and report.section == "model"
    same_outputs(resnet18, target)


def test_lightning_bundle_keeps_other_sections(tmp_path):
    net = model("mobilenet_v3_small")
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    ckpt = {"epoch": 4, "global_step": 100, "pytorch-lightning_version": "2.3.0", "state_dict": sd,
            "loops": {"fit_loop": {"epoch_progress": {"current": 4}}}, "optimizer_states": [], "lr_schedulers": []}
    torch.save(ckpt, tmp_path / "lit.ckpt")
    result = ckconv.convert(tmp_path / "lit.ckpt", tmp_path / "out.pth", arch="mobilenet_v3_small")
    out = ckconv.load(tmp_path / "out.pth")  # --arch writes the torch layout; empty optimizer lists go (issue 13)
    assert list(out) == ["model", "epoch", "global_step", "pytorch-lightning_version", "loops"]
    assert out["epoch"] == 4 and out["loops"] == ckpt["loops"]
    assert list(out["model"]) == list(net.state_dict())
    target = fresh("mobilenet_v3_small")
    target.load_state_dict(out["model"])
    same_outputs(net, target)
    assert {m["how"] for m in result.match.to_dict()["matched"]} == {"prefix"}
    assert result.match.to_dict()["matched"][0]["steps"] == ["prefix 'net.' -> ''"]


def test_mmengine_backbone_prefix_and_meta(resnet18):
    sd = {f"backbone.{k}": v for k, v in state("resnet18").items()}
    report = ckconv.match({"meta": {"mmengine_version": "0.10"}, "state_dict": sd, "message_hub": {}}, "resnet18")
    assert report.complete and report.section == "state_dict"


def test_sequential_saved_alone_gets_its_parent_name():
    net = model("squeezenet1_0")
    sd = dict(net.features.state_dict())  # keys "0.weight", "3.squeeze.weight", ...
    target = fresh("squeezenet1_0")
    report = ckconv.load_into(target, sd, only=["features"], strict=True)
    assert report.complete and {m.how for m in report.matched} == {"prefix"}
    same_outputs(net.features, target.features)


# --- renames: user --rename and plugin rules -----------------------------------------------------------------

def test_user_renames(tmp_path):
    net = model("squeezenet1_0")
    short = {".squeeze.": ".sq.", ".expand1x1.": ".e1.", ".expand3x3.": ".e3."}
    sd = {}
    for k, v in net.state_dict().items():
        for a, b in short.items():
            k = k.replace(a, b)
        sd[k] = v
    renames = [r"\.sq\.=.squeeze.", r"\.e1\.=.expand1x1.", r"\.e3\.=.expand3x3."]
    result, target = convert_and_load(tmp_path, sd, "squeezenet1_0", rename=renames)
    same_outputs(net, target)
    renamed = [m for m in result.match.to_dict()["matched"] if m["how"] == "rename"]
    assert len(renamed) == 48 and renamed[0]["steps"] == [r"--rename \.sq\.=.squeeze."]


def test_legacy_densenet_keys_use_torchvision_rule(tmp_path):
    net = model("densenet121")
    sd = legacy_densenet(without_nbt(net.state_dict()))
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    sd = {f"module.{k}": v for k, v in sd.items()}
    result, target = convert_and_load(tmp_path, sd, "densenet121", suffix=".pth")
    same_outputs(net, target)
    report = result.match.to_dict()
    rule = [m for m in report["matched"] if m["how"] == "rule"]
    assert len(rule) == 58 * 10 and rule[0]["steps"] == ["strip 'module.'", "rule torchvision.densenet_legacy"]
    assert len(report["filled"]) == 121 and report["complete"]


# --- partial checkpoints, other heads ------------------------------------------------------------------------

def test_partial_backbone_reports_missing_head(resnet18):
    sd = {k: v for k, v in state("resnet18").items() if not k.startswith("fc.")}
    report = ckconv.match(sd, "resnet18")
    assert [m.name for m in report.missing] == ["fc.weight", "fc.bias"]
    assert not report.complete and report.used == 1.0
    with pytest.raises(IncompleteMatch):
        report.check_strict()
    target = fresh("resnet18")
    before = target.fc.weight.clone()
    with pytest.raises(IncompleteMatch):
        ckconv.load_into(target, sd, strict=True)
    assert torch.equal(target.fc.weight, before)  # strict refuses before touching the model
    ckconv.load_into(target, sd)
    target.fc = resnet18.fc
    same_outputs(resnet18, target)
    assert ckconv.match(sd, "resnet18", drop=["fc"]).complete


def test_finetuned_head_infers_num_classes_and_keeps_the_head(tmp_path):
    """issue 23: ``convert ft_resnet50.pth out.pth --arch resnet50`` with fc = Linear(2048, 10) keeps the head."""
    tuned = model("resnet50", num_classes=1000)
    tuned.fc = nn.Linear(2048, 10)
    torch.manual_seed(3)
    nn.init.normal_(tuned.fc.weight)
    result = ckconv.convert(_saved(tmp_path, tuned.state_dict(), "ft_resnet50.pth"), tmp_path / "out.pth",
                            arch="resnet50")
    assert result.match.arch_options == {"num_classes": 10} and result.match.complete
    assert not result.warnings, result.warnings
    (note,) = [n for n in result.notes if "inferred" in n.text]
    assert not note.warning and "num_classes=10" in note.text and "fc.weight [10, 2048]" in note.text
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    target = model("resnet50", num_classes=10)
    target.load_state_dict(out["model"] if "model" in out else out)
    same_outputs(tuned, target)


def test_an_option_the_user_sets_is_not_inferred(tmp_path):
    tuned = model("resnet18", num_classes=10)
    result = ckconv.convert(_saved(tmp_path, tuned.state_dict()), tmp_path / "out.pth", arch="resnet18",
                            arch_options={"num_classes": 1000}, model_only=True)
    mism = result.match.to_dict()["mismatched"]
    assert [(m["target"], m["target_shape"], m["source_shape"]) for m in mism] == [
        ("fc.weight", [1000, 512], [10, 512]), ("fc.bias", [1000], [10])]
    assert any("num_classes=10" in n.text for n in result.warnings)
    assert not any("inferred" in n.text for n in result.notes)
    out = ckconv.load(tmp_path / "out.pth")
    assert "fc.weight" not in out and len(out) == 120
    assert ckconv.match(tmp_path / "in.pth", "resnet18").arch_options == {"num_classes": 10}  # match infers too


def test_load_into_reports_what_it_skipped_as_load_state_dict_does(tmp_path):
    sd = model("resnet18", num_classes=10).state_dict()
    sd["aux.weight"] = torch.ones(3)
    target = model("resnet18")
    with pytest.warns(UserWarning, match=r"skipped 3 unexpected \(fc.weight, fc.bias, aux.weight\)|skipped .*with "
                                         r"other shapes"):
        report = ckconv.load_into(target, sd)
    assert report.unexpected_keys == ["aux.weight"] and report.mismatched_keys == ["fc.weight", "fc.bias"]
    assert report.missing_keys == []


def _saved(tmp_path, obj, name="in.pth"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_missing_num_batches_tracked_is_filled(tmp_path, resnet18):
    result, target = convert_and_load(tmp_path, without_nbt(state("resnet18")), "resnet18")
    assert len(result.match.to_dict()["filled"]) == 20 and not result.match.to_dict()["missing"]
    assert all(f["value"] == 0 and f["dtype"] == "int64" for f in result.match.to_dict()["filled"])
    assert target.bn1.num_batches_tracked.dtype == torch.int64 and target.bn1.num_batches_tracked.item() == 0
    same_outputs(resnet18, target)


# --- structure and reshapes --------------------------------------------------------------------------------

def test_caffe_style_names_align_by_structure(tmp_path):
    net = model("squeezenet1_0")
    sd = caffe_squeezenet(net.state_dict())
    result, target = convert_and_load(tmp_path, sd, "squeezenet1_0")
    same_outputs(net, target)
    matched = {m["target"]: m for m in result.match.to_dict()["matched"]}
    assert matched["features.3.squeeze.weight"]["source"] == "fire2_squeeze1x1.weight"
    assert matched["classifier.1.weight"]["source"] == "conv10.weight"
    assert {m["how"] for m in matched.values()} == {"structural"}
    assert all(0 < m["confidence"] < 1 for m in matched.values())


def test_linear_stored_as_1x1_conv_is_reshaped(tmp_path):
    net = model("mobilenet_v3_small")
    fc1, fc2 = net.classifier[0], net.classifier[3]
    source = ConvHead(net.features, net.avgpool, [as_conv(fc1, 1), as_conv(fc2, 1)], [nn.Hardswish(), nn.Identity()])
    sd = {k.replace("head.0.", "classifier.0.").replace("head.1.", "classifier.3."): v
          for k, v in source.state_dict().items()}
    assert sd["classifier.0.weight"].shape == (1024, 576, 1, 1)
    result, target = convert_and_load(tmp_path, sd, "mobilenet_v3_small")
    same_outputs(source.eval(), target)
    reshaped = [m for m in result.match.to_dict()["matched"] if m["reshape"]]
    assert [(m["target"], m["reshape"]["from"], m["reshape"]["to"]) for m in reshaped] == [
        ("classifier.0.weight", [1024, 576, 1, 1], [1024, 576]), ("classifier.3.weight", [1000, 1024, 1, 1],
                                                                   [1000, 1024])]


def test_caffe_vgg_with_7x7_fc6_aligns_and_reshapes():
    vgg = model("vgg11")
    c = vgg.classifier
    source = ConvHead(vgg.features, vgg.avgpool, [as_conv(c[0], 7), as_conv(c[3], 1), as_conv(c[6], 1)],
                      [nn.ReLU(), nn.ReLU(), nn.Identity()]).eval()
    names = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1", "conv5_2", "fc6", "fc7",
             "fc8"]
    layers = [m for m in vgg.features if isinstance(m, nn.Conv2d)] + list(source.head)
    sd = {}
    for name, layer in zip(names, layers):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = layer.weight.detach(), layer.bias.detach()
    report = ckconv.match(sd, "vgg11")
    assert report.complete, report.to_dict()
    by_target = report.mapping()
    assert by_target["classifier.0.weight"].source == "fc6.weight"
    assert by_target["classifier.0.weight"].reshape == (4096, 512, 7, 7)
    assert by_target["features.18.weight"].source == "conv5_2.weight"
    from ckconv.matching.apply import remap_tensors

    with torch.device("meta"):
        target = targets.build("vgg11", device="meta")
    target.load_state_dict(remap_tensors(report, sd), strict=True, assign=True)
    same_outputs(source, target.eval(), image(32, 1))


def test_reshape_refused_when_dims_disagree():
    from ckconv.matching.alignment import reshape_ok

    assert reshape_ok((4096, 512, 7, 7), (4096, 25088))
    assert reshape_ok((10, 20), (10, 20, 1, 1))
    assert not reshape_ok((64, 3, 7, 7), (64, 7, 7, 3))  # same rank: could be a permutation
    assert not reshape_ok((20, 10), (10, 20, 1))  # leading (output) dimension differs
    assert not reshape_ok((10, 20), (10, 21, 1))


# --- bundles and sections ------------------------------------------------------------------------------------

def test_ema_is_taken_only_when_asked(resnet18):
    sd = state("resnet18")
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    bundle = {"state_dict": sd, "state_dict_ema": ema, "optimizer": {"state": {}, "param_groups": []}}
    assert ckconv.match(bundle, "resnet18").section == "state_dict"
    target = fresh("resnet18")
    report = ckconv.load_into(target, bundle, section="state_dict_ema")
    assert report.section == "state_dict_ema"
    assert torch.equal(target.conv1.weight, ema["conv1.weight"])


def test_fvcore_layout():
    net = model("mobilenet_v3_small")
    ckpt = {"model": dict(net.state_dict()), "optimizer": {"state": {}}, "scheduler": {}, "iteration": 90}
    report = ckconv.match(ckpt, "mobilenet_v3_small")
    assert report.complete and report.section == "model" and {m.how for m in report.matched} == {"exact"}


def test_map_roundtrip_and_selectors(tmp_path, resnet18):
    sd = {f"module.{k}": v for k, v in state("resnet18").items()}
    src = _saved(tmp_path, {"state_dict": sd, "epoch": 1})
    report = ckconv.match(src, "resnet18")
    from ckconv.matching.mapfile import save_map

    save_map(report, tmp_path / "map.json")
    out = tmp_path / "mapped.safetensors"
    result = ckconv.convert(src, out, map=tmp_path / "map.json", model_only=True, drop=["fc"])
    loaded = ckconv.load(out)
    assert list(loaded) == [k for k in resnet18.state_dict() if not k.startswith("fc.")]
    assert result.match.to_dict()["matched"][0]["how"] == "map"
    only = ckconv.convert(src, tmp_path / "l4.pth", arch="resnet18", model_only=True, only=["layer4[1]"])
    assert all(k.startswith("layer4.1.") for k in ckconv.load(tmp_path / "l4.pth"))
    assert only.match.to_dict()["target_count"] == 12


def test_freeze_by_selector(resnet18):
    net = fresh("resnet18")
    frozen = ckconv.freeze(net, "layer1")
    assert frozen and all(n.startswith("layer1.") for n in frozen)
    assert not net.layer1[0].conv1.weight.requires_grad and net.layer2[0].conv1.weight.requires_grad
    ckconv.freeze(net, "layer1", requires_grad=True)
    assert net.layer1[0].conv1.weight.requires_grad


def test_nothing_matching_is_an_error(tmp_path):
    src = _saved(tmp_path, {"totally.unrelated": torch.zeros(3, 3, 3)})
    with pytest.raises(ckconv.CkconvError, match="no checkpoint key matched"):
        ckconv.convert(src, tmp_path / "out.pth", arch="resnet18")
    assert not (tmp_path / "out.pth").exists()


def test_auto_picks_the_architecture():
    tuned = model("resnet18", num_classes=10)
    sd = {f"net.{k}": v for k, v in tuned.state_dict().items()}
    report = ckconv.match(sd, "auto:resnet18,resnet34,mobilenet_v3_small", arch_options={"num_classes": 10})
    assert report.arch == "torchvision:resnet18" and report.complete
    assert [c.arch for c in report.candidates][:2] == ["torchvision:resnet18", "torchvision:resnet34"]
    assert report.candidates[0].coverage == 1.0 and report.candidates[1].coverage < 0.7
