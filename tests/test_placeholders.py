"""Exit 0 is a promise (issue 23): a DeepSpeed ZeRO-3 model-states file holds shape-[0] placeholders of its
partitioned parameters in ``module`` (the real shapes in ``param_shapes``); converting it, or matching its "model",
is refused with one line pointing at the DeepSpeed folder, and nothing is written.

The first tests imitate DeepSpeed's layout (the keys ``DeepSpeedEngine._save_checkpoint`` writes); the slow ones at
the end use the real files, written by DeepSpeed itself under ZeRO-3 on the CPU
(tests/deepspeed_writers/zero3_module_state.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

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


# --- DeepSpeed itself: a ZeRO-3 engine's files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """The folder zero3_module_state.py fills (one torchrun process, ZeRO-3, one training step)."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero3")
    script = Path(__file__).parent / "deepspeed_writers" / "zero3_module_state.py"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    job = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "1", str(script), str(out)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--model-only"], ["--to", "safetensors"], ["--arch", "resnet18"]])
def test_deepspeeds_zero3_model_states_are_refused(zero3, tmp_path, options):
    """``engine.save_checkpoint`` under ZeRO-3: the rank file's ``module`` holds shape-[0] placeholders (the control
    below shows they are placeholders: DeepSpeed's own shapes are not [0]); converting it exits 1 in one line that
    names a real shape and the folder to convert, and writes nothing."""
    states = next((zero3 / "ds").glob("global_step*/zero_pp_rank_0_mp_rank_00_model_states.pt"))
    module = torch.load(states, weights_only=False)["module"]
    shapes = torch.load(zero3 / "shapes.pt")
    placeholders = [k for k, v in module.items() if v.shape == (0,)]  # trainable, frozen and tied (head.weight)
    assert len(placeholders) == 9 and all(shapes[k] != (0,) for k in placeholders if k in shapes)  # control
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(states), str(out), *options])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "DeepSpeed ZeRO-3 model-states file" in lines[0], result.stderr
    assert f"{len(placeholders)} partitioned placeholders of shape [0]" in lines[0]
    assert any(f"{k} is {list(shapes[k])}" in lines[0] for k in placeholders if k in shapes), lines[0]
    assert "DeepSpeed checkpoint folder" in lines[0] and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ckconv.errors.UnsupportedContent, match="ZeRO-3"):
        ckconv.load_into(torch.nn.Linear(4, 4), states)


@pytest.mark.slow
def test_deepspeeds_zero3_module_state_dict_is_whole_and_converts(zero3, tmp_path):
    """``torch.save(engine.module.state_dict())`` under ZeRO-3: this DeepSpeed gathers the partitions when the
    state_dict is taken, so the file holds the whole model, not placeholders; it converts with exit 0 to exactly
    DeepSpeed's own consolidation (``get_fp32_state_dict_from_zero_checkpoint``)."""
    src = zero3 / "module_state_dict.pt"
    saved = torch.load(src, weights_only=True)
    reference = torch.load(zero3 / "reference.pt", weights_only=True)
    assert all(saved[k].shape == shape for k, shape in torch.load(zero3 / "shapes.pt").items())
    ckconv.convert(src, tmp_path / "model.safetensors")
    ckconv.convert(tmp_path / "model.safetensors", tmp_path / "model.pth")
    back = torch.load(tmp_path / "model.pth", weights_only=True)
    assert list(back) == list(saved)
    assert all(torch.equal(back[k], reference[k]) and back[k].dtype == reference[k].dtype for k in reference)
