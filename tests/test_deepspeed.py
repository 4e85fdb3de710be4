"""The ``deepspeed`` format: ZeRO 1/2/3 folders written by DeepSpeed itself, checked against DeepSpeed's own answers.

The folders are trained once per session on the CPU (tests/deepspeed_writers/train.py, two torchrun jobs: 1 and 2
ranks). Each holds DeepSpeed's answers, taken through DeepSpeed's API in the training processes: the
``get_fp32_state_dict_from_zero_checkpoint`` state_dict, every parameter's full optimizer state, and every
parameter after one more step.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckconv
from helpers import assert_deep_equal

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "deepspeed_writers"))
import train  # noqa: E402  (the writer script: the model, its parameter groups, the loss)

pytestmark = pytest.mark.slow

CONFIGS = ("zero1-fp32", "zero2-fp32", "zero3-fp32", "zero1-bf16", "zero2-bf16", "zero3-bf16")
TORCHVISION = ("squeezenet-zero2-fp32", "squeezenet-zero3-fp32")  # for --arch: trained with 2 ranks only
RUNS = [f"{c}-w{w}" for c in CONFIGS for w in (1, 2)]
ARCH_RUNS = [f"{c}-w2" for c in TORCHVISION]
PYTHON = sys.executable
CLI = [PYTHON, "-m", "ckconv"]


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory):
    """{run name: folder} for every configuration, 1 and 2 ranks (the two jobs run side by side).

    CKCONV_TEST_DEEPSPEED_DIR names a folder the writer already filled (while working on the reader)."""
    given = os.environ.get("CKCONV_TEST_DEEPSPEED_DIR")
    if given:
        return {run: Path(given) / run for run in RUNS + ARCH_RUNS}
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    script = str(HERE / "deepspeed_writers" / "train.py")
    jobs = [subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", str(w), script, str(out), *configs],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for w, configs in ((1, CONFIGS), (2, CONFIGS + TORCHVISION))]
    for job in jobs:
        log, _ = job.communicate(timeout=1800)
        assert job.returncode == 0, log[-4000:]
    return {run: out / run for run in RUNS + ARCH_RUNS}


def reference(folder):
    return torch.load(folder / "reference.pt", weights_only=False)


def bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype.is_floating_point else t


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def frozen_values(dtype):
    """The frozen layer never changes: its values are the seeded model's, in the training dtype."""
    torch.manual_seed(0)
    net = train.Net()
    return {f"frozen.{k}": v.detach().to(dtype) for k, v in net.frozen.named_parameters()}


@pytest.mark.parametrize("run", RUNS)
def test_model_only_is_zero_to_fp32(ds_runs, run, tmp_path):
    folder = ds_runs[run]
    out = tmp_path / "model.safetensors"
    ckconv.convert(folder / "ds", out, model_only=True)
    got = ckconv.load(out)
    expected = reference(folder)["fp32"]
    for name, tensor in expected.items():
        assert same_bits(got[name], tensor), name
    assert got["head.weight"] is got["emb.weight"]  # the tie survives
    extra = set(got) - set(expected)
    if run.startswith("zero1"):
        # DeepSpeed's ZeRO-1 records no frozen_param_shapes and zero_to_fp32 drops the frozen layer; ckconv keeps it
        dtype = torch.bfloat16 if "bf16" in run else torch.float32
        assert extra == {"frozen.weight", "frozen.bias"}
        for name, value in frozen_values(dtype).items():
            assert same_bits(got[name], value), name
    else:
        assert not extra
    assert list(got) == list(train.Net().state_dict())  # the model's own order


@pytest.mark.parametrize("run", RUNS)
def test_bundle_carries_deepspeed_optimizer_state(ds_runs, run, tmp_path):
    folder = ds_runs[run]
    ref = reference(folder)
    out = tmp_path / "bundle.pth"
    ckconv.convert(folder / "ds", out)
    bundle = torch.load(out, weights_only=True)  # plain data: torch's own allowlist suffices
    assert bundle["epoch"] == 3 and bundle["note"] == "seeded run"  # client state
    assert bundle["scheduler"]["last_epoch"] == train.STEPS and bundle["scheduler"]["base_lrs"] == [0.01, 0.02]
    assert bundle["frozen"] == ["frozen.weight", "frozen.bias"]
    assert bundle["deepspeed"]["zero_stage"] == int(run[4]) and bundle["deepspeed"]["dp_world_size"] == int(run[-1])
    model = train.Net()
    slots = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    state = bundle["optimizer"]["state"]
    assert sorted(state) == sorted(slots[n] for n in ref["param_names"])
    for name in ref["param_names"]:
        entry = state[slots[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert same_bits(entry[key], ref[key][name]), (name, key)
        assert entry["step"].dtype == torch.float32 and [float(entry["step"])] == ref["steps"]
    groups = bundle["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.0025, 0.005] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    optimizer = torch.optim.AdamW(train.param_groups(model))
    optimizer.load_state_dict(bundle["optimizer"])
    model.load_state_dict(bundle["model"])


@pytest.mark.parametrize("run", [r for r in RUNS if "fp32" in r])
def test_resumed_adamw_step_is_deepspeeds_next_step(ds_runs, run, tmp_path):
    folder = ds_runs[run]
    ref = reference(folder)
    out = tmp_path / "bundle.pth"
    ckconv.convert(folder / "ds", out)
    bundle = torch.load(out, weights_only=True)
    model = train.Net()
    model.load_state_dict(bundle["model"])
    optimizer = torch.optim.AdamW(train.param_groups(model))
    optimizer.load_state_dict(bundle["optimizer"])
    train.loss_of(model, ref["batch"]).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name in ref["param_names"]:
        torch.testing.assert_close(params[name].detach(), ref["next_fp32"][name], rtol=0, atol=0)


@pytest.mark.parametrize("run", ["zero2-fp32-w2", "zero3-fp32-w2"])
def test_fsdp2_resumes_from_the_dcp_output(ds_runs, run, tmp_path):
    """``--to dcp`` is a way off DeepSpeed onto torch's own engine: FSDP2 on two ranks loads the folder through
    ``get_state_dict`` / ``dcp.load`` / ``set_state_dict`` (tests/fsdp_resume.py) and its next AdamW step gives every
    parameter DeepSpeed's own next value, bit for bit (both jobs average two equal gradients, which is exact, and
    AdamW's update is elementwise: sharding changes no rounding). ZeRO-2 and ZeRO-3 sources, each converted once by
    one process and once by two ranks sharing the writing."""
    import fsdp_resume

    folder = ds_runs[run]
    ref = reference(folder)
    ckconv.convert(folder / "ds", tmp_path / "dcp", to="dcp")
    ckconv.convert(folder / "ds", tmp_path / "bundle.pth")
    # ckconv reads the optimizer back numbered, as the .pth bundle holds it
    assert_deep_equal(ckconv.load(tmp_path / "dcp")["optimizer"],
                      torch.load(tmp_path / "bundle.pth", weights_only=True)["optimizer"])
    # two ranks share the conversion: each writes its own .distcp, the content is the one process's
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ckconv", "convert",
                           str(folder / "ds"), str(tmp_path / "dist"), "--to", "dcp"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert all((tmp_path / "dist" / f"__{r}_0.distcp").stat().st_size > 2000 for r in (0, 1))
    assert_deep_equal(ckconv.load(tmp_path / "dist"), ckconv.load(tmp_path / "dcp"))
    resumed = fsdp_resume.resume("net", tmp_path / "dist", ref["batch"], tmp_path)
    assert "emb.weight" in resumed["sharded"]
    for name in ref["param_names"]:
        assert same_bits(resumed["params"][name], ref["next_fp32"][name]), name
    for name, value in frozen_values(torch.float32).items():
        assert same_bits(resumed["params"][name], value), name
    assert sorted(resumed["optimizer"]["state"]) == sorted(ref["param_names"])


@pytest.mark.parametrize("run", ARCH_RUNS)
def test_arch_on_a_deepspeed_source(ds_runs, run, tmp_path):
    """A torchvision model trained under ZeRO: ``--arch`` remaps and checks it like any source, and the optimizer of
    ``torch.optim.AdamW(model.parameters())`` (one group, the frozen layer included) loads and resumes exactly."""
    import torchvision

    folder = ds_runs[run]
    ref = reference(folder)
    out = tmp_path / "bundle.pth"
    result = ckconv.convert(folder / "ds", out, arch="squeezenet1_1", arch_options={"num_classes": 10})
    assert result is not None
    bundle = torch.load(out, weights_only=True)
    model = torchvision.models.squeezenet1_1(num_classes=10, dropout=0.0)  # as trained
    model.load_state_dict(bundle["model"])
    assert bundle["frozen"] == ["features.0.weight", "features.0.bias"]
    for name, p in model.named_parameters():
        p.requires_grad_(name not in bundle["frozen"])
    for name, tensor in ref["fp32"].items():
        assert same_bits(bundle["model"][name], tensor), name
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(bundle["optimizer"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training ranks ran: convolution gradients summed in the same order
    try:
        train.loss_of(model, ref["batch"]).backward()
    finally:
        torch.set_num_threads(threads)
    optimizer.step()
    params = dict(model.named_parameters())
    for name in ref["param_names"]:
        torch.testing.assert_close(params[name].detach(), ref["next_fp32"][name], rtol=0, atol=0)


def test_cli_names_the_format_and_converts(ds_runs, tmp_path):
    ds = ds_runs["zero3-fp32-w2"] / "ds"
    shown = subprocess.run([*CLI, "inspect", str(ds)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "deepspeed checkpoint" in shown.stdout.splitlines()[0]
    tag = subprocess.run([*CLI, "convert", str(ds / "global_step3"), str(tmp_path / "m.safetensors"),
                          "--model-only"], capture_output=True, text=True)
    assert tag.returncode == 0, tag.stderr
    assert set(ckconv.load(tmp_path / "m.safetensors")) == set(train.Net().state_dict())


def test_missing_rank_file_is_refused(ds_runs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(ds_runs["zero3-fp32-w2"] / "ds", ds)
    (ds / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out.safetensors"
    r = subprocess.run([*CLI, "convert", str(ds), str(out), "--model-only"], capture_output=True, text=True)
    assert r.returncode in (1, 2) and "saved by 2 ranks" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not out.exists()


def test_latest_naming_a_path_outside_is_refused(ds_runs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(ds_runs["zero2-fp32-w1"] / "ds", ds)
    (ds / "latest").write_text("../elsewhere")
    r = subprocess.run([*CLI, "convert", str(ds), str(tmp_path / "o.safetensors")], capture_output=True, text=True)
    assert r.returncode in (1, 2) and "tag" in r.stderr and "Traceback" not in r.stderr


def refused(args):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    return r.stderr


def test_ranks_of_two_checkpoints_are_refused(ds_runs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(ds_runs["zero2-fp32-w2"] / "ds", ds)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(ds_runs["zero1-fp32-w2"] / "ds" / "global_step2" / name, ds / "global_step2" / name)
    assert "different ZeRO stage" in refused(["convert", ds, tmp_path / "o.safetensors", "--model-only"])
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_rank_file_is_refused(ds_runs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(ds_runs["zero3-bf16-w2"] / "ds", ds)
    victim = ds / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-200])
    refused(["convert", ds, tmp_path / "o.safetensors", "--model-only"])
    assert not (tmp_path / "o.safetensors").exists()


def test_a_rank_file_is_never_overwritten(ds_runs, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(ds_runs["zero3-fp32-w2"] / "ds", ds)
    victim = ds / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    before = victim.read_bytes()
    refused(["convert", ds, victim, "--model-only", "--to", "torch", "--force"])
    assert victim.read_bytes() == before


def test_two_ranks_under_torchrun_share_the_consolidation(ds_runs, tmp_path):
    folder = ds_runs["zero3-bf16-w2"]
    out = tmp_path / "model.safetensors"
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "ckconv", "convert",
                           str(folder / "ds"), str(out), "--model-only"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = ckconv.load(out)
    for name, tensor in reference(folder)["fp32"].items():
        assert same_bits(got[name], tensor), name


def test_scan_judges_the_folder_as_one_checkpoint(ds_runs):
    """DeepSpeed's records (stage enum, loss scaler, fragment addresses) are known by exact name: safe; the rank
    files are read as parts of the folder, not again on their own."""
    ds = ds_runs["zero2-bf16-w2"] / "ds"
    r = subprocess.run([*CLI, "scan", str(ds)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("SAFE")]
    assert [line.split()[1].rstrip(":") for line in lines] == [str(ds), str(ds / "global_step3")], r.stdout
