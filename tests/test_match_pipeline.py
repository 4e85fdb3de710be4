"""The matching pipeline on names and shapes alone: each step, its ambiguity checks, unwrapping, specs, rules."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ckconv import architectures_torchvision
from ckconv.matching import targets
from ckconv.matching.alignment import align, group
from ckconv.architectures import TensorSpec
from ckconv.errors import UsageError
from ckconv.matching.engine import match_keys, pick
from ckconv.matching.report import Candidate, Filled, MatchReport, Mismatch
from ckconv.model import Storage, TensorRef
from ckconv.rules import KeyRule, parse_rename, rename
from ckconv.contents.unwrap import candidates, replace, unwrap


def spec(*items):
    """TensorSpecs from (name, shape) pairs; the module is the name minus its last part."""
    return [TensorSpec(n, tuple(s), "float32", "parameter", n.rpartition(".")[0]) for n, s in items]


def src(*items):
    return [(n, tuple(s), "float32") for n, s in items]


def pairs(report):
    return {m.target: m.source for m in report.matched}


def test_exact_and_wrappers_and_common_prefix():
    target = spec(("features.0.weight", (4, 3)), ("features.0.bias", (4,)), ("fc.weight", (2, 4)))
    r = match_keys(src(("module._orig_mod.features.0.weight", (4, 3)), ("module._orig_mod.features.0.bias", (4,)),
                       ("module._orig_mod.fc.weight", (2, 4))), target)
    assert r.complete and {m.how for m in r.matched} == {"prefix"}
    assert r.matched[0].steps == ("strip 'module.', '_orig_mod.'",)
    r = match_keys(src(("vgg.0.weight", (4, 3)), ("vgg.0.bias", (4,)), ("fc.weight", (2, 4))), target)
    assert pairs(r) == {"features.0.weight": "vgg.0.weight", "features.0.bias": "vgg.0.bias",
                        "fc.weight": "fc.weight"}
    assert r.matched[0].steps == ("prefix 'vgg.' -> 'features.'",)


def test_wrapper_names_the_target_uses_are_kept():
    target = spec(("module.weight", (2,)), ("module.bias", (2,)))
    r = match_keys(src(("module.weight", (2,)), ("module.bias", (2,))), target)
    assert {m.how for m in r.matched} == {"exact"}


def test_suffix_longest_wins_and_ambiguity_is_reported():
    target = spec(("m.layer1.conv.weight", (3, 3)), ("m.layer2.conv.weight", (5, 5)))
    r = match_keys(src(("layer1.conv.weight", (3, 3)), ("z.conv.weight", (3, 3))), target, structural=False)
    assert pairs(r) == {"m.layer1.conv.weight": "layer1.conv.weight"}
    assert r.matched[0].how == "suffix" and r.matched[0].confidence < 1
    # one source key claiming two target keys: an ambiguity, never a guess
    target = spec(("a.head.fc.weight", (3,)), ("b.head.fc.weight", (3,)))
    r = match_keys(src(("head.fc.weight", (3,)),), target)
    assert not r.matched and r.ambiguous and r.ambiguous[0].step == "suffix"
    assert r.ambiguous[0].source == "head.fc.weight"
    assert sorted(r.ambiguous[0].candidates) == ["a.head.fc.weight", "b.head.fc.weight"]


def test_structural_alignment_needs_an_unambiguous_order():
    target = spec(("features.0.weight", (8, 3, 3, 3)), ("features.0.bias", (8,)),
                  ("features.2.weight", (16, 8, 3, 3)), ("features.2.bias", (16,)),
                  ("classifier.weight", (10, 16 * 4)), ("classifier.bias", (10,)))
    source = src(("conv1_1.weight", (8, 3, 3, 3)), ("conv1_1.bias", (8,)), ("conv1_2.weight", (16, 8, 3, 3)),
                 ("conv1_2.bias", (16,)), ("fc6.weight", (10, 16, 2, 2)), ("fc6.bias", (10,)))
    r = match_keys(source, target)
    assert r.complete and pairs(r)["classifier.weight"] == "fc6.weight"
    assert r.mapping()["classifier.weight"].reshape == (10, 16, 2, 2)
    assert {m.how for m in r.matched} == {"structural"}
    # two identical candidate layers for one target layer: reported, not guessed
    r = match_keys(src(("a.weight", (3, 3)), ("b.weight", (3, 3))), spec(("x.weight", (3, 3)), ("y.bias", (7,))))
    assert not r.matched and r.ambiguous[0].step == "structural"


def test_structural_crossing_orders_are_ambiguous():
    src_groups = group([("a.w", (2,)), ("b.w", (3,))], lambda n: n.rpartition(".")[0])
    tgt_groups = group([("x.w", (3,)), ("y.w", (2,))], lambda n: n.rpartition(".")[0])
    accepted, ambiguous, note = align(src_groups, tgt_groups)
    assert not accepted and len(ambiguous) == 2 and note is None


def test_structural_pairs_by_shape_only_when_shapes_are_distinct():
    target = spec(("bn.weight", (4,)), ("bn.bias", (4,)))
    r = match_keys(src(("scale.gamma", (4,)), ("scale.beta", (4,))), target)
    assert not r.matched  # gamma/beta vs weight/bias with equal shapes: order would be a guess
    target = spec(("conv.weight", (4, 2)), ("conv.bias", (4,)))
    r = match_keys(src(("c.w", (4, 2)), ("c.b", (4,))), target)
    assert pairs(r) == {"conv.weight": "c.w", "conv.bias": "c.b"}
    assert all(m.confidence == 0.7 for m in r.matched)


def test_shape_conflicts_are_reported_and_skipped():
    target = spec(("fc.weight", (1000, 8)), ("fc.bias", (1000,)), ("conv.weight", (8, 3)))
    r = match_keys(src(("fc.weight", (10, 8)), ("fc.bias", (10,)), ("conv.weight", (8, 3))), target, arch="x")
    assert pairs(r) == {"conv.weight": "conv.weight"}
    assert r.mismatched == [Mismatch("fc.weight", "fc.weight", (1000, 8), (10, 8), "exact"),
                            Mismatch("fc.bias", "fc.bias", (1000,), (10,), "exact")]
    assert r.to_dict()["mismatched"] == [
        {"target": "fc.weight", "source": "fc.weight", "target_shape": [1000, 8], "source_shape": [10, 8],
         "how": "exact"},
        {"target": "fc.bias", "source": "fc.bias", "target_shape": [1000], "source_shape": [10], "how": "exact"}]
    assert r.mismatched_keys == ["fc.weight", "fc.bias"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mismatched[0].source = "other"
    assert not r.missing and not r.unexpected and not r.complete
    assert "num_classes=10" in r.notes[0].text and r.notes[0].warning


def test_num_batches_tracked_is_filled_not_missing():
    target = [TensorSpec("bn.running_mean", (4,), "float32", "buffer", "bn"),
              TensorSpec("bn.num_batches_tracked", (), "int64", "buffer", "bn")]
    r = match_keys(src(("bn.running_mean", (4,))), target)
    assert r.complete and r.filled == [Filled("bn.num_batches_tracked", (), "int64", 0)]
    assert r.to_dict()["filled"] == [{"target": "bn.num_batches_tracked", "shape": [], "dtype": "int64", "value": 0}]
    assert r.coverage == 1.0


def test_plugin_rules_apply_after_prefixes_and_only_to_their_arch():
    rule = KeyRule("t.legacy", r"^(.*)\.norm\.1\.(weight)$", r"\1.norm1.\2", arch="densenet*")
    target = spec(("features.layer.norm1.weight", (4,)), ("features.conv.weight", (4, 4)),
                  ("features.conv2.weight", (5, 4)))
    source = src(("net.features.layer.norm.1.weight", (4,)), ("net.features.conv.weight", (4, 4)),
                 ("net.features.conv2.weight", (5, 4)))
    r = match_keys(source, target, arch="torchvision:densenet121", rules=[rule], structural=False)
    assert r.complete
    m = r.mapping()["features.layer.norm1.weight"]
    assert m.how == "rule" and m.steps == ("prefix 'net.' -> ''", "rule t.legacy")
    r = match_keys(source, target, arch="torchvision:resnet18", rules=[rule], structural=False)
    assert "features.layer.norm1.weight" not in pairs(r)


def test_rule_architecture_patterns():
    from ckconv.plugins import host

    rules = {r.name: r for r in host().key_rules}
    dense = rules["torchvision.densenet_legacy"]
    assert dense.applies_to("torchvision:densenet121") and dense.applies_to("DenseNet")  # a model's class name
    assert not dense.applies_to("torchvision:resnet18") and not dense.applies_to("ResNet")
    assert KeyRule("r", "x", "y").applies_to("anything")
    mask = rules["torchvision.mask_head_legacy"]
    assert mask.apply("roi_heads.mask_head.mask_fcn3.weight") == "roi_heads.mask_head.2.0.weight"


def test_user_renames_and_their_syntax():
    assert parse_rename(r"^backbone\.=features.").pattern == r"^backbone\."
    assert parse_rename(r"fc(?=\.)=head").pattern == r"fc(?=\.)"  # split at the last '='
    with pytest.raises(UsageError, match="REGEX=REPLACEMENT"):
        parse_rename("no-equals-sign")
    with pytest.raises(UsageError, match="invalid regex"):
        parse_rename("(unclosed=x")
    assert rename("a.b", [parse_rename(r"a=x"), parse_rename(r"b=y")]) == ("x.y", ["--rename a=x", "--rename b=y"])
    target = spec(("classifier.0.weight", (3, 2)))
    r = match_keys(src(("fc6.weight", (3, 2))), target, renames=[r"^fc6\.=classifier.0."])
    assert r.matched[0].how == "rename"


def test_report_json_shape():
    target = spec(("a.weight", (2, 2)), ("b.weight", (3,)))
    r = match_keys(src(("a.weight", (2, 2)), ("c.weight", (9, 9))), target, structural=False)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["matched"] == [{"target": "a.weight", "source": "a.weight", "how": "exact", "steps": [],
                             "shape": [2, 2], "reshape": None, "confidence": 1.0}]
    assert d["missing"] == [{"name": "b.weight", "shape": [3], "dtype": "float32"}]
    assert d["unexpected"] == [{"name": "c.weight", "shape": [9, 9], "dtype": "float32"}]
    assert d["mismatched"] == [] and d["coverage"] == 0.5 and d["complete"] is False


def test_auto_pick_refuses_ties_and_no_match():
    assert pick([Candidate("a", 1, 1, 0.9), Candidate("b", 1, 1, 0.5)]) == "a"
    with pytest.raises(UsageError, match="ambiguous"):
        pick([Candidate("a", 1, 1, 0.9), Candidate("b", 1, 1, 0.9)])
    with pytest.raises(UsageError, match="no registered architecture"):
        pick([Candidate("a", 0, 0, 0.0)])


# --- unwrapping -----------------------------------------------------------------------------------------------

def ref(*shape):
    return TensorRef(Storage("0", "float32", 4 * 64, buffer=bytes(4 * 64)), "float32", shape)


def test_unwrap_prefers_the_model_over_ema_and_optimizer():
    bundle = {"state_dict_ema": {"a.w": ref(2)}, "optimizer": {"state": {0: {"exp_avg": ref(2)}}},
              "state_dict": {"a.w": ref(2), "b.w": ref(3)}, "epoch": 1}
    flat, where, path = unwrap(bundle)
    assert where == "state_dict" and list(flat) == ["a.w", "b.w"] and path == ("state_dict",)
    assert unwrap(bundle, "state_dict_ema")[1] == "state_dict_ema"
    with pytest.raises(UsageError, match="no state_dict at 'nope'"):
        unwrap(bundle, "nope")
    with pytest.raises(UsageError, match="cannot find a model state_dict"):
        unwrap({"epoch": 1, "optimizer": {"state": {"x": ref(1)}}})


def test_unwrap_flattens_nested_dicts_and_replace_copies():
    nested = {"model": {"backbone": {"conv": {"weight": ref(2)}}, "head": {"weight": ref(3)}}, "step": 3}
    flat, where, path = unwrap(nested)
    assert where == "model" and list(flat) == ["backbone.conv.weight", "head.weight"]
    assert len(candidates(nested)) >= 2
    new = replace(nested, path, {"x": 1})
    assert new == {"model": {"x": 1}, "step": 3} and "backbone" in nested["model"]


# --- architectures and specs ------------------------------------------------------------------------------------

def test_parse_options():
    assert targets.parse_options(["num_classes=10", "aux_logits=False", "mode=bilinear"]) == {
        "num_classes": 10, "aux_logits": False, "mode": "bilinear"}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        targets.parse_options(["oops"])


def test_specs_are_built_on_meta_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CKCONV_CACHE_DIR", str(tmp_path))
    builds = []
    real_build = targets.build
    monkeypatch.setattr(targets, "build", lambda *a, **k: builds.append(a) or real_build(*a, **k))

    def fresh_spec(*args):
        monkeypatch.setattr(targets, "_SPECS", {})  # forget the in-process cache
        return targets.spec(*args)

    s = fresh_spec("squeezenet1_1", ["num_classes=7"])
    assert s.arch == "torchvision:squeezenet1_1" and s.tensors[-1].shape == (7,)
    assert s.tensors[0].kind == "parameter" and s.tensors[0].module_type == "Conv2d"
    files = [f for f in tmp_path.rglob("*.json") if f.name != "_models.json"]  # the spec, not the name list
    assert len(files) == 1 and len(builds) == 1
    assert fresh_spec("torchvision:squeezenet1_1", {"num_classes": 7}).names == s.names
    assert len(builds) == 1  # read from disk
    files[0].write_text("{broken")
    assert fresh_spec("squeezenet1_1", ["num_classes=7"]).names == s.names
    assert len(builds) == 2  # a damaged cache entry is rebuilt
    assert json.loads(files[0].read_text())["arch"] == "torchvision:squeezenet1_1"


def test_models_that_compute_while_building_still_build_without_weights():
    model = targets.build("regnet_x_400mf")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_builds_never_download():
    import torch.hub

    with architectures_torchvision._no_downloads():
        with pytest.raises(UsageError, match="never downloads"):
            torch.hub.load_state_dict_from_url("https://example.invalid/w.pth")


def test_unknown_architectures():
    with pytest.raises(UsageError, match="unknown architecture 'nope'"):
        targets.resolve("nope")
    with pytest.raises(UsageError, match="unknown architecture namespace"):
        targets.resolve("zoo:resnet18")
    with pytest.raises(UsageError, match="cannot build"):
        targets.build("resnet18", {"no_such_option": 1})


def test_report_defaults():
    r = MatchReport("x", "<keys>", "<root>", 0, 0)
    assert r.coverage == 0.0 and not r.complete
