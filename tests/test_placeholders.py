"""Exit 0 is a promise (issue 23): a DeepSpeed ZeRO-3 model-states file holds shape-[0] placeholders of its
partitioned parameters in ``module`` (the real shapes in ``param_shapes``); converting it, or matching its "model",
is refused with one line pointing at the DeepSpeed folder, and nothing is written.

The file here imitates DeepSpeed's layout (the keys ``DeepSpeedEngine._save_checkpoint`` writes); the real file,
written by DeepSpeed itself under ZeRO-3, is covered in tests/test_deepspeed.py (engineer "deepspeed", marker
``zero3_placeholders``: the same refusal for ``global_step*/zero_pp_rank_0_mp_rank_00_model_states.pt``)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv.cli import cli


def zero3_model_states(path, placeholders=True):
    size = 0 if placeholders else None
    module = OrderedDict([("linear.weight", torch.empty(size) if placeholders else torch.ones(4, 4)),
                          ("linear.bias", torch.empty(size) if placeholders else torch.ones(4)),
                          ("bn.running_mean", torch.zeros(4)), ("bn.num_batches_tracked", torch.tensor(0))])
    torch.save({"module": module, "buffer_names": ["bn.running_mean", "bn.num_batches_tracked"], "optimizer": None,
                "param_shapes": [OrderedDict([("linear.weight", torch.Size([4, 4])),
                                              ("linear.bias", torch.Size([4]))])],
                "frozen_param_shapes": None, "shared_params": {}, "lr_scheduler": None, "sparse_tensor_module_names":
                set(), "skipped_steps": 0, "global_steps": 2, "global_samples": 16, "dp_world_size": 2,
                "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 3}}, "ds_version": "0.16.4"}, path)
    return path


@pytest.mark.parametrize("options", [[], ["--model-only"], ["--arch", "resnet18"], ["--to", "safetensors"]])
def test_zero3_placeholders_are_never_converted(tmp_path, options):
    src = zero3_model_states(tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(src), str(out), *options])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DeepSpeed ZeRO-3 model-states file" in lines[0], result.stderr
    assert "2 partitioned placeholders of shape [0]" in lines[0] and "linear.weight is [4, 4]" in lines[0]
    assert "DeepSpeed checkpoint folder" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_match_and_load_into_refuse_them_too(tmp_path):
    src = zero3_model_states(tmp_path / "states.pt")
    with pytest.raises(ckconv.errors.UnsupportedContent, match="ZeRO-3"):
        ckconv.match(src, "resnet18")
    with pytest.raises(ckconv.errors.UnsupportedContent, match="ZeRO-3"):
        ckconv.load_into(torch.nn.Linear(4, 4), src)


def test_a_zero_1_or_2_model_states_file_with_real_tensors_converts(tmp_path):
    """Positive control: the same layout with whole parameters (ZeRO 1/2) is a model and converts."""
    src = zero3_model_states(tmp_path / "states.pt", placeholders=False)
    ckconv.convert(src, tmp_path / "model.pth", model_only=True)
    out = torch.load(tmp_path / "model.pth", weights_only=True)
    assert out["linear.weight"].shape == (4, 4)
