"""Training resumes from a converted bundle: real training loops, several param groups, frozen subsets, Lightning.

Each case trains a few steps, saves a checkpoint the way its framework does, converts it (mostly with --arch onto
a torchvision model), resumes from the output and checks that every parameter's optimizer state equals its source
parameter's and that one more step gives the weights the original run gets by continuing.
"""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner

import ckconv
from ckconv.bundles import load_bundle, save_bundle
from ckconv.cli import cli
from helpers import assert_deep_equal
from timm.optim import create_optimizer_v2



def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def step(model, opt, x, sched=None):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    if sched is not None:
        sched.step()


def assert_state_follows(src_model, src_opt, dst_model, dst_opt, rename=lambda n: n):
    """Every source parameter's optimizer state sits, bit for bit (reshaped with its parameter), on its target."""
    dst = dict(dst_model.named_parameters())
    compared = 0
    for name, p in src_model.named_parameters():
        state = src_opt.state.get(p, {})
        q = dst[rename(name)]
        new = dst_opt.state.get(q, {})
        assert list(state) == list(new), name
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value = value.reshape(q.shape)
            assert_deep_equal(value, new[key], f"{name}.{key}")
        compared += bool(state)
    assert compared


def assert_close_weights(a: dict, b: dict, atol=0.0):
    assert list(a) == list(b)
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# --- timm training checkpoints onto torchvision ------------------------------------------------------------

@pytest.fixture(scope="session")
def timm_vgg11(tmp_path_factory):
    """timm vgg11 trained a step with create_optimizer_v2 (SGD momentum, weight decay: 2 groups), converted."""
    tmp = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    model = timm.create_model("vgg11", pretrained=False, num_classes=4)
    opt = create_optimizer_v2(model, "momentum", lr=1e-3, weight_decay=0.05)
    x = torch.randn(1, 3, 32, 32)
    step(model, opt, x)  # one step: every slot has its momentum buffer (vgg11 is big: keep it short)
    torch.save({"epoch": 2, "arch": "vgg11", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "metric": 0.5}, tmp / "src.pth")
    run = invoke("convert", tmp / "src.pth", tmp / "out.pth", "--arch", "vgg11", "--arch-option", "num_classes=4",
                 "--json")
    assert run.exit_code == 0, run.output
    return model, opt, x, tmp / "out.pth", json.loads(run.output)


def test_timm_vgg11_two_groups_resume_on_torchvision(timm_vgg11):
    from ckconv_timm import VGG_TIMM_TO_TORCHVISION, convert_state_dict

    model, opt, x, out, result = timm_vgg11
    assert [len(g["params"]) for g in opt.param_groups] == [11, 11]  # biases, then weights
    assert any("slot names from shapes (unique); 2 param groups" in n for n in result["notes"])
    assert any("read the timm layout" in n for n in result["notes"])
    bundle = torch.load(out, weights_only=True)
    assert list(bundle)[:2] == ["model", "optimizer"] and bundle["epoch"] == 2 and bundle["arch"] == "vgg11"

    def rename(name):
        module, _, leaf = name.rpartition(".")
        return f"{VGG_TIMM_TO_TORCHVISION.get(module, module)}.{leaf}"

    resumed = torchvision.models.vgg11(weights=None, num_classes=4, dropout=0.0)
    opt2 = create_optimizer_v2(resumed, "momentum", lr=1e-3, weight_decay=0.05)
    load_bundle(out, resumed, opt2)
    assert_state_follows(model, opt, resumed, opt2, rename)
    assert opt2.state[resumed.classifier[0].weight]["momentum_buffer"].shape == (4096, 25088)  # was 4096x512x7x7
    step(model, opt, x)
    step(resumed, opt2, x)
    expected = convert_state_dict(model.state_dict(), "torchvision:vgg11", num_classes=4)
    assert_close_weights(expected, resumed.state_dict(), atol=1e-6)


@pytest.fixture(scope="session")
def timm_resnet18():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=4).state_dict()


def _timm_resnet(weights, frozen=()):
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    model.load_state_dict(weights)
    for prefix in frozen:
        for p in getattr(model, prefix).parameters():
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen", [(), ("conv1", "bn1", "layer1")], ids=["all", "stem-and-layer1-frozen"])
def test_timm_resnet18_adamw_groups_resume_on_torchvision(tmp_path, timm_resnet18, frozen):
    model = _timm_resnet(timm_resnet18, frozen)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        step(model, opt, x)
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": opt.state_dict()},
               tmp_path / "src.pth")
    result = ckconv.convert(tmp_path / "src.pth", tmp_path / "out.safetensors", arch="resnet18",
                            arch_options=["num_classes=4"])
    assert any("2 param groups" in n for n in map(str, result.notes)), result.notes

    resumed = torchvision.models.resnet18(weights=None, num_classes=4)
    for prefix in frozen:
        for p in getattr(resumed, prefix).parameters():
            p.requires_grad_(False)
    opt2 = create_optimizer_v2(resumed, "adamw", lr=1e-3, weight_decay=0.05)
    bundle = load_bundle(tmp_path / "out.safetensors", resumed, opt2)
    assert bundle["epoch"] == 1
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in model.parameters()]
    assert_state_follows(model, opt, resumed, opt2)
    step(model, opt, x)
    step(resumed, opt2, x)
    assert_close_weights(model.state_dict(), resumed.state_dict())


@pytest.fixture(scope="session")
def stem_frozen_run(timm_resnet18, tmp_path_factory):
    """timm resnet18 with conv1/bn1 frozen, one AdamW step; saved plainly and with save_bundle (records frozen)."""
    tmp = tmp_path_factory.mktemp("stem")
    model = _timm_resnet(timm_resnet18, ("conv1", "bn1"))
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    step(model, opt, torch.randn(2, 3, 32, 32))
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, tmp / "src.pth")
    save_bundle(tmp / "frozen.pth", model=model, optimizer=opt)  # records frozen: [conv1.weight, ...]
    return model, opt, tmp


def test_ambiguous_groups_are_refused_and_optimizer_drop_writes_the_model(tmp_path, stem_frozen_run):
    """Stem frozen: the no-decay group holds 8 of the model's ten [64] norm parameters; shapes cannot tell which.

    Onto the same names, shapes and order the slots would still fit as they were; a new head (10 classes) means
    the fc slots must be found, and they cannot be proven.
    """
    model, opt, src = stem_frozen_run
    src = src / "src.pth"
    same = ckconv.convert(src, tmp_path / "same.pth", arch="resnet18", arch_options=["num_classes=4"])
    assert any("kept unchanged (the parameters keep their order and shapes" in n for n in map(str, same.notes)), same.notes
    assert_deep_equal(torch.load(tmp_path / "same.pth", weights_only=True)["optimizer"], opt.state_dict())

    out = tmp_path / "out.pth"
    run = invoke("convert", src, out, "--arch", "resnet18", "--arch-option", "num_classes=10")
    assert run.exit_code == 2 and not out.exists()
    (line,) = run.output.strip().splitlines()
    assert "param group 0 (39 parameters, lr=0.001, weight_decay=0.0)" in line
    assert "fits the model's parameters in more than one way" in line
    assert "could be layer1.1.bn1.bias, layer1.1.bn2.weight" in line and "--optimizer drop" in line

    run = invoke("convert", src, out, "--arch", "resnet18", "--arch-option", "num_classes=10",
                 "--optimizer", "drop")
    assert run.exit_code == 0, run.output
    assert "left out 1 optimizer state_dict (--optimizer drop)" in run.output
    bundle = torch.load(out, weights_only=True)
    assert list(bundle) == ["model", "epoch"]
    resumed = torchvision.models.resnet18(weights=None, num_classes=10)
    assert resumed.load_state_dict(bundle["model"], strict=False).missing_keys == ["fc.weight", "fc.bias"]


def _resnet_frozen_stem(num_classes):
    resumed = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    for p in (*resumed.conv1.parameters(), *resumed.bn1.parameters()):
        p.requires_grad_(False)
    return resumed


def test_recorded_freeze_or_param_names_settle_an_ambiguous_fit(tmp_path, stem_frozen_run):
    """The same stem-frozen run resolves when the bundle records the freeze, or the optimizer has param_names;
    the new 10-class head keeps its place in its group (no-decay bias, decay weight) without state."""
    x = torch.randn(2, 3, 32, 32)
    model, opt, src = stem_frozen_run
    model = copy.deepcopy(model)  # the param_names optimizer below steps it on
    opt_state = {name: copy.deepcopy(opt.state[p]) for name, p in stem_frozen_run[0].named_parameters()}
    options = ["num_classes=10"]
    result = ckconv.convert(src / "frozen.pth", tmp_path / "a.pth", arch="resnet18", arch_options=options)
    assert any("with the recorded freeze" in n and "2 with new shapes" in n for n in map(str, result.notes)), result.notes

    named = torch.optim.AdamW(
        [{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1],
          "weight_decay": 0.0},
         {"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]}], lr=1e-3)
    step(model, named, x)
    torch.save({"model": model.state_dict(), "optimizer": named.state_dict()}, tmp_path / "named.pth")
    result = ckconv.convert(tmp_path / "named.pth", tmp_path / "b.pth", arch="resnet18", arch_options=options)
    assert any("slot names from param_names" in n for n in map(str, result.notes)), result.notes

    head = {"fc.weight", "fc.bias"}
    named_state = {name: named.state[p] for name, p in model.named_parameters()}
    for out, source_state in ((tmp_path / "a.pth", opt_state), (tmp_path / "b.pth", named_state)):
        resumed = _resnet_frozen_stem(10)
        opt2 = create_optimizer_v2(resumed, "adamw", lr=1e-3, weight_decay=0.05)
        bundle = load_bundle(out, resumed, opt2, strict=False)
        if out.name == "a.pth":
            assert bundle["frozen"] == ["conv1.weight", "bn1.weight", "bn1.bias"]
        for name, p in resumed.named_parameters():
            if name in head:
                assert opt2.state.get(p, {}) == {}
            elif p.requires_grad:
                assert_deep_equal(source_state[name], opt2.state[p], name)
        step(resumed, opt2, x)  # and it trains


# --- backbone and head at different learning rates, frozen subsets --------------------------------------------

def squeezenet(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.squeezenet1_1(weights=None, num_classes=4, dropout=0.0)


def backbone_head_optimizer(model, head_first=False):
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    groups = [{"params": backbone, "lr": 1e-3}, {"params": list(model.classifier.parameters()), "lr": 1e-2}]
    return torch.optim.Adam(groups[::-1] if head_first else groups, weight_decay=1e-4)


@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("frozen", [0, 3], ids=["all", "features[:3]-frozen"])
def test_backbone_and_head_groups_follow_a_wrapped_model(tmp_path, head_first, frozen):
    model = squeezenet()
    for p in model.features[:frozen].parameters():
        p.requires_grad_(False)
    opt = backbone_head_optimizer(model, head_first)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        step(model, opt, x, sched)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DistributedDataParallel
    torch.save({"model_state": wrapped, "optimizer_state": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": 3}, tmp_path / "src.pth")
    result = ckconv.convert(tmp_path / "src.pth", tmp_path / "out.safetensors", arch="squeezenet1_1",
                            arch_options=["num_classes=4"])
    assert any("model_state -> model, optimizer_state -> optimizer" in n for n in map(str, result.notes)), result.notes

    resumed = squeezenet(seed=1)
    for p in resumed.features[:frozen].parameters():
        p.requires_grad_(False)
    opt2 = backbone_head_optimizer(resumed, head_first)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    bundle = load_bundle(tmp_path / "out.safetensors", resumed, opt2, sched2)
    assert list(bundle) == ["model", "optimizer", "scheduler", "step"]
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert_state_follows(model, opt, resumed, opt2)
    step(model, opt, x, sched)
    step(resumed, opt2, x, sched2)
    assert_close_weights(model.state_dict(), resumed.state_dict())


# --- layouts ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def trained_squeezenet():
    model = squeezenet()
    opt = backbone_head_optimizer(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        step(model, opt, x, sched)
    return model, opt, sched, x


LAYOUTS = {
    "mmengine": lambda sd, osd, sched: {"meta": {"epoch": 2}, "state_dict": sd, "optimizer": osd,
                                        "param_schedulers": [sched], "message_hub": {"iter": 2}},
    "fvcore": lambda sd, osd, sched: {"model": sd, "optimizer": osd, "scheduler": sched, "iteration": 2},
    "timm": lambda sd, osd, sched: {"epoch": 2, "arch": "squeezenet1_1", "state_dict": sd, "optimizer": osd,
                                    "version": 2},
    "custom": lambda sd, osd, sched: {"net": sd, "optim": osd, "lr_scheduler": sched, "global_step": 2},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_arch_output_is_the_torch_layout_whatever_was_read(tmp_path, trained_squeezenet, layout):
    model, opt, sched, x = trained_squeezenet
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    source = LAYOUTS[layout](sd, opt.state_dict(), sched.state_dict())
    torch.save(source, tmp_path / "src.pth")
    run = invoke("convert", tmp_path / "src.pth", tmp_path / "out.pth", "--arch", "squeezenet1_1",
                 "--arch-option", "num_classes=4", "--json")
    assert run.exit_code == 0, run.output
    notes = json.loads(run.output)["notes"]
    bundle = torch.load(tmp_path / "out.pth", weights_only=True)
    model_key = next(k for k, v in source.items() if v is sd)
    opt_key = next(k for k, v in source.items() if isinstance(v, dict) and "param_groups" in v)
    rest = [k for k in source if k not in (model_key, opt_key)]
    assert list(bundle) == ["model", "optimizer", *rest]
    for k in rest:
        assert_deep_equal(source[k], bundle[k])
    if layout != "fvcore":  # fvcore already has model/optimizer: nothing moved, nothing to say
        assert any(n.startswith(f"read the {layout} layout") for n in notes), notes

    resumed = squeezenet(seed=1)
    opt2 = backbone_head_optimizer(resumed)
    load_bundle(tmp_path / "out.pth", resumed, opt2)
    assert_state_follows(model, opt, resumed, opt2)

    kept = invoke("convert", tmp_path / "src.pth", tmp_path / "kept.pth", "--arch", "squeezenet1_1",
                  "--arch-option", "num_classes=4", "--keep-layout")
    assert kept.exit_code == 0, kept.output
    assert list(torch.load(tmp_path / "kept.pth", weights_only=True)) == list(source)


# --- Lightning ---------------------------------------------------------------------------------------------

class LitSqueeze(L.LightningModule):
    def __init__(self, manual=False):
        super().__init__()
        self.model = squeezenet()
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        loss = self.model(batch[0]).square().mean()
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        for o in opts:
            o.zero_grad()
        self.manual_backward(loss)
        for o in opts:
            o.step()
        return None

    def configure_optimizers(self):
        if not self.automatic_optimization:
            return [torch.optim.SGD(self.model.features.parameters(), lr=1e-2, momentum=0.9),
                    torch.optim.Adam(self.model.classifier.parameters(), lr=1e-3)]
        opt = backbone_head_optimizer(self.model)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(6, 3, 64, 64))
        return torch.utils.data.DataLoader(data, batch_size=2)


def lightning_run(root, manual=False):
    lit = LitSqueeze(manual)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(lit)
    trainer.save_checkpoint(root / "run.ckpt")
    return lit, trainer


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    lit, trainer = lightning_run(root)
    return lit, trainer, root / "run.ckpt"


def test_lightning_checkpoint_resumes_as_a_torch_bundle(tmp_path, lightning_ckpt):
    lit, trainer, ckpt = lightning_ckpt
    source = torch.load(ckpt, weights_only=True)
    run = invoke("convert", ckpt, tmp_path / "out.pth", "--arch", "squeezenet1_1", "--arch-option", "num_classes=4",
                 "--json")
    assert run.exit_code == 0, run.output
    notes = json.loads(run.output)["notes"]
    assert any(n.startswith("read the lightning layout") and "optimizer_states[0] -> optimizer" in n
               and "lr_schedulers[0] -> scheduler" in n for n in notes), notes
    bundle = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(bundle)[:3] == ["model", "optimizer", "scheduler"]
    assert bundle["global_step"] == source["global_step"] == 3 and bundle["epoch"] == source["epoch"]
    assert_deep_equal(bundle["loops"], source["loops"])
    assert "optimizer_states" not in bundle and "lr_schedulers" not in bundle

    opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    resumed = squeezenet(seed=1)
    opt2 = backbone_head_optimizer(resumed)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, gamma=0.5)
    load_bundle(tmp_path / "out.pth", resumed, opt2, sched2)
    assert_state_follows(lit.model, opt, resumed, opt2)
    assert sched2.state_dict() == sched.state_dict()
    x = torch.randn(2, 3, 64, 64)
    step(lit.model, opt, x, sched)
    step(resumed, opt2, x, sched2)
    assert_close_weights(lit.model.state_dict(), resumed.state_dict())


def test_lightning_keep_layout_remaps_in_place(tmp_path, lightning_ckpt):
    ckpt = lightning_ckpt[2]
    source = torch.load(ckpt, weights_only=True)
    lit = LitSqueeze()  # the run as saved (the live one may have stepped on)
    lit.load_state_dict(source["state_dict"])
    opt = backbone_head_optimizer(lit.model)
    opt.load_state_dict(source["optimizer_states"][0])
    assert ckconv.convert(ckpt, tmp_path / "out.ckpt", arch="squeezenet1_1", arch_options=["num_classes=4"],
                          keep_layout=True)
    bundle = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert list(bundle) == list(source)
    assert list(bundle["state_dict"]) == list(squeezenet().state_dict())
    resumed = squeezenet(seed=1)
    opt2 = backbone_head_optimizer(resumed)
    opt2.load_state_dict(bundle["optimizer_states"][0])
    assert_state_follows(lit.model, opt, resumed, opt2)


def test_lightning_two_optimizers_become_a_list(tmp_path):
    lit, trainer = lightning_run(tmp_path, manual=True)
    result = ckconv.convert(tmp_path / "run.ckpt", tmp_path / "out.safetensors", arch="squeezenet1_1",
                            arch_options=["num_classes=4"])
    assert any("optimizer_states -> optimizers" in n for n in map(str, result.notes)), result.notes
    resumed = squeezenet(seed=1)
    opts = [torch.optim.SGD(resumed.features.parameters(), lr=1e-2, momentum=0.9),
            torch.optim.Adam(resumed.classifier.parameters(), lr=1e-3)]
    bundle = load_bundle(tmp_path / "out.safetensors", resumed, opts)
    assert len(bundle["optimizers"]) == 2 and "scheduler" not in bundle
    for source_opt, opt2 in zip(trainer.optimizers, opts):
        assert_state_follows(lit.model, source_opt, resumed, opt2)
    x = torch.randn(2, 3, 64, 64)
    for m, os_ in ((lit.model, trainer.optimizers), (resumed, opts)):
        for o in os_:
            o.zero_grad()
        m(x).square().mean().backward()
        for o in os_:
            o.step()
    assert_close_weights(lit.model.state_dict(), resumed.state_dict())


# --- casts that spare the optimizer; load_bundle and the caller's freeze ------------------------------------

def test_dtype_casts_the_model_only_and_dtype_optimizer_spares_step(tmp_path, trained_squeezenet):
    model, opt, sched, _ = trained_squeezenet
    osd = copy.deepcopy(opt.state_dict())
    for s in osd["state"].values():
        s["step"] = torch.tensor(12345.0)  # bf16 would make it 12352
    source = {"model": model.state_dict(), "optimizer": osd, "state_dict_ema": model.state_dict(), "epoch": 2,
              "best": torch.tensor(0.123456789)}
    torch.save(source, tmp_path / "src.pth")
    result = ckconv.convert(tmp_path / "src.pth", tmp_path / "a.pth", dtype="bf16")
    out = torch.load(tmp_path / "a.pth", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for k, v in out["model"].items() if v.is_floating_point())
    assert all(v.dtype == torch.bfloat16 for k, v in out["state_dict_ema"].items() if v.is_floating_point())
    assert_deep_equal(out["optimizer"], osd)
    assert_deep_equal(out["best"], source["best"])
    assert any("optimizer state kept in its dtype" in n for n in map(str, result.notes)), result.notes

    run = invoke("convert", tmp_path / "src.pth", tmp_path / "b.safetensors", "--dtype", "bf16",
                 "--dtype-optimizer", "bf16")
    assert run.exit_code == 0, run.output
    out = ckconv.load(tmp_path / "b.safetensors")
    for slot, s in out["optimizer"]["state"].items():
        assert s["step"].dtype == torch.float32 and s["step"].item() == 12345.0
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(s["exp_avg_sq"], osd["state"][slot]["exp_avg_sq"].bfloat16())


def test_dtype_optimizer_without_an_optimizer_is_refused(tmp_path):
    torch.save({"model": squeezenet().state_dict()}, tmp_path / "src.pth")
    run = invoke("convert", tmp_path / "src.pth", tmp_path / "out.pth", "--dtype-optimizer", "fp16")
    assert run.exit_code == 2 and "no optimizer state_dict" in run.output
    assert not (tmp_path / "out.pth").exists()


def test_load_bundle_keeps_the_callers_freeze_unless_the_bundle_records_one(tmp_path):
    model = squeezenet()
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "plain.pth")
    resumed = squeezenet(seed=1)
    for p in resumed.features[:3].parameters():
        p.requires_grad_(False)
    mask = [p.requires_grad for p in resumed.parameters()]
    load_bundle(tmp_path / "plain.pth", resumed)
    assert [p.requires_grad for p in resumed.parameters()] == mask and not all(mask)

    torch.save({"model": model.state_dict(), "frozen": ["features.0.weight"]}, tmp_path / "frozen.pth")
    load_bundle(tmp_path / "frozen.pth", resumed)
    assert [n for n, p in resumed.named_parameters() if not p.requires_grad] == ["features.0.weight"]


# --- state that would not fit is never written ---------------------------------------------------------------

def test_param_names_that_disagree_with_the_state_are_refused(tmp_path):
    model = squeezenet()
    opt = torch.optim.Adam(list(model.named_parameters()), lr=1e-3)
    step(model, opt, torch.randn(2, 3, 64, 64))
    osd = opt.state_dict()
    names = osd["param_groups"][0]["param_names"]
    names[0], names[2] = names[2], names[0]  # features.0.weight <-> features.3.squeeze.weight: other shapes
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": osd},
               tmp_path / "src.pth")
    run = invoke("convert", tmp_path / "src.pth", tmp_path / "out.pth", "--arch", "squeezenet1_1",
                 "--arch-option", "num_classes=4")
    assert run.exit_code == 2, run.output
    (line,) = run.output.strip().splitlines()
    assert "by its param_names, but its state has shape" in line and "--optimizer drop" in line
    assert not (tmp_path / "out.pth").exists()


def test_state_that_cannot_follow_a_reshape_is_refused():
    """A factored second moment (Adafactor-like rows) on timm's 7x7 conv cannot become the Linear's state."""
    from ckconv.contents.optimizer_slots import fit_state
    from ckconv.tree import from_torch

    state = from_torch({"step": torch.tensor(1.0), "exp_avg": torch.zeros(8, 2, 7, 7),
                        "exp_avg_sq_row": torch.zeros(8, 2, 7)})
    with pytest.raises(ckconv.errors.UsageError, match="cannot reshape along with the parameter"):
        fit_state(state, "pre_logits.fc1.weight", "classifier.0.weight", (8, 2, 7, 7), (8, 98))
    kept = fit_state(state, "head.fc.weight", "classifier.6.weight", (8, 2, 7, 7), (8, 2, 7, 7))
    assert kept["exp_avg_sq_row"].shape == (8, 2, 7)
    reshaped = fit_state({k: v for k, v in state.items() if k != "exp_avg_sq_row"}, "pre_logits.fc1.weight",
                         "classifier.0.weight", (8, 2, 7, 7), (8, 98))
    assert reshaped["exp_avg"].shape == (8, 98) and reshaped["step"].shape == ()


def test_group_fits_are_used_only_when_unique():
    from ckconv.contents.optimizer_slots import _fit

    s, t = (5,), (3, 3)
    # group 1 fits one way only; once it holds positions 1 and 2, group 0 has one place left
    assert _fit([[s], [t, s]], [s, t, s])["solution"] == [[0], [1, 2]]
    assert _fit([[(4,), (2,)], [t, (3,)]], [(4,), t, (3,), (2,)])["solution"] == [[0, 3], [1, 2]]
    amb = _fit([[s, t], [s]], [s, s, t])  # either s may belong to group 0
    assert amb["solution"] is None and amb["kind"] == "ambiguous" and amb["candidates"] == [0, 1]
    assert _fit([[s], [s]], [s])["kind"] == "no fit"
    assert _fit([[None, None]], [s, t])["solution"] == [[0, 1]]  # no state, but every parameter is covered
    assert _fit([[None]], [s, t])["kind"] == "ambiguous"
