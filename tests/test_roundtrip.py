"""Lossless by default: every format round trip comes back deep-equal, bit for bit."""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckconv
from helpers import assert_deep_equal

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
              torch.complex128, torch.uint16, torch.uint32, torch.uint64]


def random_tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty(0, dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape) if raw.numel() else torch.empty(shape, dtype=dtype)


def training_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "best": 0.75,
            "tag": "run-1", "history": [1.0, 0.5, float("nan")], "shape": (2, 3), "flags": {1: True, "x": None}}


def roundtrip(obj, tmp_path, chain):
    """Save obj as .pth with torch.save, convert through the chain of suffixes, load the last with torch.load."""
    src = tmp_path / "src.pth"
    torch.save(obj, src)
    current = src
    for i, suffix in enumerate(chain):
        nxt = tmp_path / f"step{i}{suffix}"
        ckconv.convert(current, nxt)
        current = nxt
    return torch.load(current, weights_only=True) if current.suffix == ".pth" else ckconv.load(current)


@pytest.mark.parametrize("chain", [[".pth"], [".safetensors", ".pth"], [".safetensors", ".safetensors", ".pth"]])
def test_training_checkpoint_roundtrip_is_deep_equal(tmp_path, chain):
    ckpt = training_checkpoint()
    assert_deep_equal(ckpt, roundtrip(ckpt, tmp_path, chain))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (2, 1, 3)], ids=str)
def test_every_dtype_and_shape_roundtrips(tmp_path, dtype, shape):
    obj = {"t": random_tensor(dtype, shape)}
    assert_deep_equal(obj, roundtrip(obj, tmp_path, [".safetensors", ".pth"]))


def test_tied_tensors_are_stored_once_and_come_back_tied(tmp_path):
    w = torch.randn(50, 20)
    obj = OrderedDict([("embed.weight", w), ("head.weight", w), ("bias", torch.zeros(3))])
    torch.save(obj, tmp_path / "a.pth")
    ckconv.convert(tmp_path / "a.pth", tmp_path / "a.safetensors")
    header = ckconv.inspect(tmp_path / "a.safetensors")
    assert header.bytes == (50 * 20 + 3) * 4  # the shared tensor is stored once
    ckconv.convert(tmp_path / "a.safetensors", tmp_path / "b.pth")
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    assert_deep_equal(obj, back)
    assert back["embed.weight"].data_ptr() == back["head.weight"].data_ptr()


def test_strings_utf8_cannot_hold_survive_and_the_file_stays_readable(tmp_path):
    """Lone surrogates (os.fsdecode of odd bytes) in values, keys and tensor paths: safetensors headers are UTF-8."""
    odd = "run-\udc80\udcff"
    obj = {"model": {f"w{odd}": torch.ones(2)}, "path": odd, odd: 1, "names": [odd, "ok"]}
    back = roundtrip(obj, tmp_path, [".safetensors", ".pth"])
    assert_deep_equal(back, obj)
    from safetensors import safe_open

    with safe_open(tmp_path / "step0.safetensors", "pt") as f:  # the reference reader still parses the header
        assert len(list(f.keys())) == 1


def test_views_and_non_contiguous_tensors(tmp_path):
    big = torch.randn(6, 7)
    obj = {"t": big.t(), "slice": big[1:3, ::2], "big": big, "expand": torch.randn(3, 1).expand(3, 4)}
    back = roundtrip(obj, tmp_path, [".safetensors", ".pth"])
    assert_deep_equal(obj, back, check_tied=False)  # safetensors holds each view as a tensor of its own
    # .pth -> .pth keeps storages shared exactly as torch.save wrote them
    direct = roundtrip(obj, tmp_path / "direct", [".pth"]) if (tmp_path / "direct").mkdir() is None else None
    assert direct["t"].untyped_storage().data_ptr() == direct["big"].untyped_storage().data_ptr()
    assert direct["t"].stride() == big.t().stride()


def test_parameters_and_requires_grad_survive(tmp_path):
    obj = {"p": torch.nn.Parameter(torch.randn(3)), "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False)}
    back = roundtrip(obj, tmp_path, [".safetensors", ".pth"])
    assert isinstance(back["p"], torch.nn.Parameter) and back["p"].requires_grad
    assert isinstance(back["frozen"], torch.nn.Parameter) and not back["frozen"].requires_grad
    assert_deep_equal(obj, back)


def test_torch_values_survive(tmp_path):
    obj = {"dtype": torch.bfloat16, "device": torch.device("cuda", 1), "size": torch.Size([2, 3]), "b": b"\x00\xff",
           "c": 1 + 2j, "set": {1, 2}, "big": 2**70, "neg": -5, "inf": float("-inf")}
    assert_deep_equal(obj, roundtrip(obj, tmp_path, [".safetensors", ".pth"]))


def test_plain_state_dict_safetensors_loads_in_torchvision(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1}, tmp_path / "bundle.pth")
    ckconv.convert(tmp_path / "bundle.pth", tmp_path / "model.safetensors", model_only=True)
    fresh = torchvision.models.mobilenet_v3_small(weights=None).eval()
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), fresh(x))


def test_foreign_objects_are_inert_and_preserved(tmp_path):
    obj = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, layers=[1, 2])}
    torch.save(obj, tmp_path / "a.pth")
    info = ckconv.inspect(tmp_path / "a.pth")
    assert info.foreign == [{"path": "args", "class": "argparse.Namespace"}]
    ckconv.convert(tmp_path / "a.pth", tmp_path / "a.safetensors")
    ckconv.convert(tmp_path / "a.safetensors", tmp_path / "b.pth")
    back = torch.load(tmp_path / "b.pth", weights_only=False)  # our own output, trusted here to check fidelity
    assert back["args"] == obj["args"]
    assert torch.equal(back["model"]["w"], obj["model"]["w"])


@pytest.mark.parametrize("name", ["tiny_bundle.pth", "dtype_zoo.pth", "tiny_state_dict_legacy.pth",
                                  "tiny_state_dict_protocol4.pth", "plain_pickle_p5.pkl", "tiny_model.safetensors"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_every_fixture_roundtrips_losslessly(tmp_path, name, suffix):
    src = FIXTURES / name
    ckconv.convert(src, tmp_path / f"out{suffix}")
    ckconv.convert(tmp_path / f"out{suffix}", tmp_path / "back.pth")
    assert ckconv.diff(src, tmp_path / "back.pth").equal
    assert_deep_equal(ckconv.load(src), ckconv.load(tmp_path / "back.pth"))


def test_protocol4_file_that_weights_only_refuses_is_read(tmp_path):
    sd = OrderedDict(w=torch.randn(3, 3))
    torch.save(sd, tmp_path / "p4.pth", pickle_protocol=4)
    assert_deep_equal(sd, ckconv.load(tmp_path / "p4.pth"))


def test_dtype_cast_touches_only_floating_tensors(tmp_path):
    obj = {"w": torch.randn(4, 4), "steps": torch.tensor(7), "mask": torch.tensor([True]), "h": torch.randn(2).half()}
    torch.save(obj, tmp_path / "a.pth")
    result = ckconv.convert(tmp_path / "a.pth", tmp_path / "b.safetensors", dtype="bf16")
    assert result.cast == 2 and any("cast 2 floating tensors to bfloat16" in n for n in map(str, result.notes))
    back = ckconv.load(tmp_path / "b.safetensors")
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], obj["w"].bfloat16())
    assert back["h"].dtype == torch.bfloat16 and torch.equal(back["h"], obj["h"].bfloat16())
    assert torch.equal(back["steps"], obj["steps"]) and torch.equal(back["mask"], obj["mask"])


def test_sharded_safetensors_follow_huggingface_layout(tmp_path):
    import json

    from safetensors.torch import load_file

    sd = OrderedDict((f"layer{i}.weight", torch.randn(100, 100)) for i in range(5))  # 40 KB each
    torch.save(sd, tmp_path / "a.pth")
    ckconv.convert(tmp_path / "a.pth", tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    assert index["metadata"]["total_size"] == 5 * 40_000
    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / "sharded" / f))
    assert_deep_equal(dict(sd), {k: merged[k] for k in sd})
    ckconv.convert(tmp_path / "sharded", tmp_path / "back.pth")
    assert_deep_equal(sd, torch.load(tmp_path / "back.pth", weights_only=True))


def test_single_shard_is_written_without_index(tmp_path):
    torch.save({"w": torch.randn(10)}, tmp_path / "a.pth")
    ckconv.convert(tmp_path / "a.pth", tmp_path / "out", max_shard_size="5GB")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert torch.equal(ckconv.load(tmp_path / "out")["w"], torch.load(tmp_path / "a.pth")["w"])


def test_save_and_load_api_roundtrip(tmp_path):
    ckpt = training_checkpoint()
    for name in ("x.safetensors", "x.pth"):
        ckconv.save(ckpt, tmp_path / name)
        assert_deep_equal(ckpt, ckconv.load(tmp_path / name))


def test_parse_size_uses_decimal_units():
    assert ckconv.parse_size("5GB") == 5_000_000_000
    assert ckconv.parse_size("500MB") == 500_000_000
    assert ckconv.parse_size("2GiB") == 2 << 30
    with pytest.raises(ckconv.CkconvError):
        ckconv.parse_size("lots")


# --- property test: random nested structures of random dtypes ------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8))
tensors = st.builds(lambda d, shape, seed: random_tensor(d, tuple(shape), seed),
                    st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 3), max_size=3), st.integers(0, 10**6))
keys = st.one_of(st.text(min_size=1, max_size=6), st.integers(0, 50))
trees = st.recursive(st.one_of(scalars, tensors),
                     lambda children: st.one_of(st.lists(children, max_size=4),
                                                st.dictionaries(keys, children, max_size=4),
                                                st.tuples(children, children)),
                     max_leaves=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(obj=st.dictionaries(st.text(min_size=1, max_size=6), trees, min_size=1, max_size=4))
def test_property_random_structures_roundtrip(tmp_path_factory, obj):
    tmp = tmp_path_factory.mktemp("prop")
    assert_deep_equal(obj, roundtrip(obj, tmp, [".safetensors", ".pth"]))
