"""DCP output that torch's distributed state_dict API resumes from: optimizers keyed by parameter name.

``get_state_dict(model, optimizer)`` (FSDP2, DDP, plain modules) keys optimizer state by parameter name; ckconv writes
every optimizer whose slots it can name that way, and reads it back numbered, exactly as it was. The slow test
resumes FSDP2 on two ranks (tests/fsdp_resume.py) from a converted ``.pth`` bundle and checks the step against the
same step taken on one process from the bundle itself.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import fsdp_resume
from helpers import assert_deep_equal
from test_dcp import dcp_save, invoke, torch_reference

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def trained_mlp():
    """-> (model, optimizer) after two AdamW steps: the run a bundle is saved from."""
    model = fsdp_resume.mlp()
    optimizer = fsdp_resume.optimizer_of("mlp", model)
    for step in range(2):
        optimizer.zero_grad()
        fsdp_resume.train.loss_of(model, batch(step)).backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    model, optimizer = trained_mlp()
    path = tmp_path_factory.mktemp("bundle") / "bundle.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}, path)
    return path


def metadata(folder):
    md = pickle.loads((folder / ".metadata").read_bytes())
    return md.state_dict_metadata, md.planner_data, md.ckconv_structure


def test_optimizer_is_keyed_by_parameter_name_and_reads_back_numbered(bundle_file, tmp_path):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import ckconv

    result = invoke("convert", bundle_file, tmp_path / "a", "--to", "dcp")
    assert result.exit_code == 0 and "numbered slots" not in result.stderr, result.output
    source = torch.load(bundle_file, weights_only=True)
    # torch reads what its distributed state_dict API would have saved from the live run
    model, optimizer = trained_mlp()
    expected = {"model": dict(model.state_dict()), "optimizer": get_optimizer_state_dict(model, optimizer), "epoch": 2}
    assert list(expected["optimizer"]["state"]) == NAMES
    assert_deep_equal(torch_reference(tmp_path / "a", tmp_path), expected)
    # ckconv reads the bundle back as it was: slots numbered, for optimizer.load_state_dict
    assert_deep_equal(ckconv.load(tmp_path / "a"), source)
    # dcp -> pth -> dcp: the same bundle, the same items (torch.save archives differ only in their random
    # serialization ids), the same structure record
    assert invoke("convert", tmp_path / "a", tmp_path / "b.pth").exit_code == 0
    assert_deep_equal(torch.load(tmp_path / "b.pth", weights_only=True), source)
    assert invoke("convert", tmp_path / "b.pth", tmp_path / "c", "--to", "dcp").exit_code == 0
    assert metadata(tmp_path / "a") == metadata(tmp_path / "c")
    assert_deep_equal(torch_reference(tmp_path / "c", tmp_path), expected)
    assert_deep_equal(ckconv.load(tmp_path / "c"), source)


def test_an_optimizer_whose_slots_cannot_be_named_stays_numbered(tmp_path):
    import ckconv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    # one [4] parameter per group: shapes cannot tell which of the three [4] parameters each slot is
    optimizer = torch.optim.AdamW([{"params": [model[1].bias]}, {"params": [model[0].bias], "lr": 0.1}])
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    bundle = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(bundle, tmp_path / "in.pth")
    result = invoke("convert", tmp_path / "in.pth", tmp_path / "out", "--to", "dcp")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "numbered slots" in line]
    assert len(warned) == 1 and "optimizer at optimizer" in warned[0] and "more than one way" in warned[0], warned
    entries, _, _ = metadata(tmp_path / "out")
    assert "optimizer.state.0.exp_avg" in entries and "optimizer.state.1.exp_avg" in entries
    assert_deep_equal(ckconv.load(tmp_path / "out"), bundle)


def test_a_torch_saved_fsdp_style_checkpoint_passes_through(tmp_path):
    """An optimizer already keyed by name (torch's own get_state_dict save) is written as it is."""
    import ckconv
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = trained_mlp()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    theirs = dcp_save({"model": model_sd, "optimizer": optim_sd}, tmp_path / "theirs")
    result = invoke("convert", theirs, tmp_path / "ours", "--to", "dcp")
    assert result.exit_code == 0 and "numbered slots" not in result.stderr, result.output
    assert_deep_equal(torch_reference(tmp_path / "ours", tmp_path), torch_reference(theirs, tmp_path))
    assert list(ckconv.load(tmp_path / "ours")["optimizer"]["state"]) == NAMES


@pytest.mark.parametrize("damage", ["name twice", "unknown name", "not pairs"])
def test_a_damaged_slots_record_is_refused(bundle_file, tmp_path, damage):
    out = tmp_path / "out"
    assert invoke("convert", bundle_file, out, "--to", "dcp").exit_code == 0
    md = pickle.loads((out / ".metadata").read_bytes())
    skeleton = json.loads(md.ckconv_structure)
    node = next(v for k, v in skeleton["$dict"] if k == "optimizer")
    if damage == "name twice":
        node["$slots"][1][1] = node["$slots"][0][1]
    elif damage == "unknown name":
        node["$slots"] = node["$slots"][1:]
    else:
        node["$slots"] = {"0": "0.weight"}
    md.ckconv_structure = json.dumps(skeleton)
    (out / ".metadata").write_bytes(pickle.dumps(md))
    r = subprocess.run([sys.executable, "-m", "ckconv", "convert", str(out), str(tmp_path / "x.pth")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "$slots" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow  # one torchrun launch, about 25 s (three processes importing torch)
def test_fsdp2_resumes_from_a_converted_bundle(bundle_file, tmp_path):
    """FSDP2 on two ranks, resumed from ckconv's DCP output, takes the step the unsharded run takes from the
    bundle: parameters and optimizer state equal bit for bit (the same batch on both ranks: the mean of two equal
    gradients is exact, and AdamW's update is elementwise, so sharding changes no rounding)."""
    assert invoke("convert", bundle_file, tmp_path / "dcp", "--to", "dcp").exit_code == 0
    resumed = fsdp_resume.resume("mlp", tmp_path / "dcp", batch(99), tmp_path)
    assert resumed["sharded"] == sorted(NAMES)  # really FSDP2: every parameter a DTensor

    source = torch.load(bundle_file, weights_only=True)
    model = fsdp_resume.mlp()
    model.load_state_dict(source["model"])
    optimizer = fsdp_resume.optimizer_of("mlp", model)
    optimizer.load_state_dict(source["optimizer"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        fsdp_resume.train.loss_of(model, batch(99)).backward()
    finally:
        torch.set_num_threads(threads)
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(resumed["params"][name], p.detach()), name
        state = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed["optimizer"]["state"][name][key], state[key]), (name, key)
    assert float(resumed["optimizer"]["state"]["0.weight"]["step"]) == 3.0
