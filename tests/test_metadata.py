"""Metadata is data (issue 23): a source's safetensors ``__metadata__`` and a hub index's ``metadata`` survive every
conversion -- into every shard of a sharded output and its index, into a ``.pth`` (a record torch.load never
reads) and into a DCP folder -- and come back. Files come from the real writers: safetensors ``save_file`` (a
kohya-style LoRA), ``save_model`` (the aliases record), huggingface_hub ``save_torch_state_dict`` and transformers
``save_pretrained``."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import ckconv
from helpers import assert_deep_equal

LORA_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0",
                 "ss_tag_frequency": json.dumps({"a photo": {"cat": 3}}), "modelspec.title": "my cat LoRA",
                 "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.sai_model_spec": "1.0.0"}


def same_tensors(a, b):
    """Bit for bit, in any order (safetensors files list tensors sorted by name)."""
    assert_deep_equal(dict(sorted(a.items())), dict(sorted(b.items())))


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    sd = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{part}": torch.randn(4, 16, generator=g)
          for part in ("lora_down.weight", "lora_up.weight")} | {
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    path = tmp_path_factory.mktemp("lora") / "cat.safetensors"
    save_file(sd, str(path), metadata=LORA_METADATA)
    return path, sd


def test_lora_metadata_survives_safetensors_to_safetensors(lora, tmp_path):
    src, sd = lora
    ckconv.convert(src, tmp_path / "out.safetensors")
    assert header(tmp_path / "out.safetensors") == header(src) == LORA_METADATA
    same_tensors(load_file(str(tmp_path / "out.safetensors")), sd)


def test_lora_metadata_survives_a_pth_and_comes_back(lora, tmp_path):
    src, sd = lora
    result = ckconv.convert(src, tmp_path / "cat.pth")
    assert not result.warnings
    same_tensors(torch.load(tmp_path / "cat.pth", weights_only=True), sd)  # torch sees the same object
    with zipfile.ZipFile(tmp_path / "cat.pth") as z:
        record = [n for n in z.namelist() if n.endswith("ckconv_metadata.json")]
        assert len(record) == 1 and json.loads(z.read(record[0])) == LORA_METADATA
    assert ckconv.read(tmp_path / "cat.pth").metadata == LORA_METADATA
    ckconv.convert(tmp_path / "cat.pth", tmp_path / "back.safetensors")
    assert header(tmp_path / "back.safetensors") == header(src)
    same_tensors(load_file(str(tmp_path / "back.safetensors")), sd)


def test_a_pth_without_metadata_gets_no_record(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pth")
    ckconv.convert(tmp_path / "a.pth", tmp_path / "b.pth")
    with zipfile.ZipFile(tmp_path / "b.pth") as z:
        assert not [n for n in z.namelist() if "ckconv_metadata" in n]


@pytest.mark.parametrize("to", ["safetensors", "torch"])
def test_every_shard_and_the_index_keep_it(lora, tmp_path, to):
    src, sd = lora
    out = tmp_path / "sharded"
    ckconv.convert(src, out, to=to, max_shard_size=300)
    index = json.loads(next(out.glob("*.index.json")).read_text())
    assert {k: v for k, v in index["metadata"].items() if k != "total_size"} == LORA_METADATA
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for shard in shards:
        if to == "safetensors":
            assert header(out / shard) == LORA_METADATA
        else:
            assert ckconv.read(out / shard).metadata == LORA_METADATA
    ckconv.convert(out, tmp_path / "back.safetensors")
    assert header(tmp_path / "back.safetensors") == header(src)
    same_tensors(load_file(str(tmp_path / "back.safetensors")), sd)


def test_dcp_keeps_it(lora, tmp_path):
    src, sd = lora
    ckconv.convert(src, tmp_path / "dcp", to="dcp")
    assert {k: v for k, v in ckconv.read(tmp_path / "dcp").metadata.items()
            if not k.startswith("dcp.")} == LORA_METADATA
    ckconv.convert(tmp_path / "dcp", tmp_path / "back.safetensors")
    assert header(tmp_path / "back.safetensors") == header(src)
    same_tensors(load_file(str(tmp_path / "back.safetensors")), sd)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


def test_the_aliases_record_of_save_model_survives(tmp_path):
    model = Tied()
    save_model(model, str(tmp_path / "tied.safetensors"))
    aliases = header(tmp_path / "tied.safetensors")
    assert len(aliases) == 1 and set(aliases.items()) <= {("head.weight", "embed.weight"),
                                                          ("embed.weight", "head.weight")}  # removed -> kept
    ckconv.convert(tmp_path / "tied.safetensors", tmp_path / "tied.pth")
    ckconv.convert(tmp_path / "tied.pth", tmp_path / "back.safetensors")
    assert header(tmp_path / "back.safetensors") == aliases
    fresh = Tied()
    from safetensors.torch import load_model

    load_model(fresh, str(tmp_path / "back.safetensors"))  # the record lets save_model's reader tie it again
    assert torch.equal(fresh.head.weight, model.head.weight) and fresh.head.weight is fresh.embed.weight


def test_huggingface_hub_shards_keep_their_metadata(tmp_path):
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(1)
    sd = {f"layer{i}.weight": torch.randn(16, 16, generator=g) for i in range(4)}
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(sd, tmp_path / "hub", max_shard_size=2000, metadata={"project": "cats", "step": "100"})
    src_index = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())
    assert src_index["metadata"]["project"] == "cats"
    ckconv.convert(tmp_path / "hub", tmp_path / "out", max_shard_size=2000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == src_index["metadata"] and index["weight_map"] == src_index["weight_map"]
    for shard in set(index["weight_map"].values()):  # huggingface_hub keeps it in the index only; ckconv in both
        assert header(tmp_path / "hub" / shard) == {"format": "pt"}
        assert header(tmp_path / "out" / shard) == {"format": "pt", "project": "cats", "step": "100"}
        same_tensors(load_file(str(tmp_path / "out" / shard)), load_file(str(tmp_path / "hub" / shard)))


def test_transformers_save_pretrained_round_trips(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2)).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="2KB")
    src_index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    ckconv.convert(tmp_path / "hf", tmp_path / "bin", to="torch", max_shard_size="2KB")
    ckconv.convert(tmp_path / "bin", tmp_path / "st", max_shard_size="2KB")
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == src_index["metadata"]  # total_parameters stays a number
    assert isinstance(index["metadata"].get("total_parameters"), int)
    (tmp_path / "st" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "st")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_format_without_a_place_for_metadata_warns_naming_the_keys(lora, tmp_path):
    pytest.importorskip("ckconv_npz")
    src, _ = lora
    result = ckconv.convert(src, tmp_path / "out.npz")
    (lost,) = [w.text for w in result.warnings if "metadata" in w.text]
    assert "left out 7 keys" in lost and "ss_network_module" in lost and "modelspec.title" in lost
