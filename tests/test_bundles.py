"""Training bundles: sections named, optimizer slots mapped to parameter names, resume after conversion."""

from __future__ import annotations

import copy

import pytest
import torch

import ckconv
from ckconv.bundles import load_bundle, save_bundle
from ckconv.contents.layout import describe
from helpers import assert_deep_equal


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                              torch.nn.Linear(5, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


def train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8, generator=g)).square().mean().backward()
        opt.step()


def fresh(freeze_first=False, named=False, kind="adam"):
    torch.manual_seed(0)
    model = Net()
    if freeze_first:
        for p in model.features[:2].parameters():
            p.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = OPTIMIZERS[kind](params if named else [p for _, p in params])
    return model, opt


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("freeze_first", [False, True])
def test_resume_after_conversion_matches_continuing(tmp_path, kind, suffix, freeze_first):
    model, opt = fresh(freeze_first, kind=kind)
    train(model, opt, 3)
    save_bundle(tmp_path / f"b{suffix}", model=model, optimizer=opt, epoch=3)
    other = ".pth" if suffix == ".safetensors" else ".safetensors"
    ckconv.convert(tmp_path / f"b{suffix}", tmp_path / f"c{other}")

    resumed = Net()
    bundle = load_bundle(tmp_path / f"c{other}", resumed)  # restores weights and the freeze first
    opt2 = OPTIMIZERS[kind]([p for p in resumed.parameters() if p.requires_grad])
    load_bundle(tmp_path / f"c{other}", resumed, opt2)
    assert bundle["epoch"] == 3
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in model.parameters()]
    for p_src, p_new in zip([p for p in model.parameters() if p.requires_grad],
                            [p for p in resumed.parameters() if p.requires_grad]):
        assert_deep_equal(opt.state[p_src], opt2.state[p_new])
    train(model, opt, 1, seed=1)
    train(resumed, opt2, 1, seed=1)
    assert_deep_equal(model.state_dict(), resumed.state_dict())


def test_optimizer_names_from_param_names(tmp_path):
    model, opt = fresh(named=True)
    train(model, opt, 1)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pth")
    info = describe(ckconv.read(tmp_path / "a.pth").root).optimizers[0]
    assert info.how == "param_names"
    assert list(info.names.values()) == [n for n, _ in model.named_parameters()]


def test_optimizer_names_from_order_and_shapes(tmp_path):
    model, opt = fresh()
    train(model, opt, 1)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pth")
    info = describe(ckconv.read(tmp_path / "a.pth").root).optimizers[0]
    assert info.kind == "Adam" and not info.subset
    assert list(info.names.values()) == [n for n, _ in model.named_parameters()]


def test_optimizer_over_a_subset_is_detected(tmp_path):
    model, opt = fresh(freeze_first=True, kind="sgd")
    train(model, opt, 1)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pth")
    info = describe(ckconv.read(tmp_path / "a.pth").root).optimizers[0]
    assert info.kind == "SGD" and info.subset
    assert info.how == "shapes (unique)"
    assert list(info.names.values()) == [n for n, p in model.named_parameters() if p.requires_grad]


def _layouts(model, opt):
    sd, osd = model.state_dict(), opt.state_dict()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2).state_dict()
    return {
        "lightning": {"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                      "state_dict": {f"model.{k}": v for k, v in sd.items()}, "optimizer_states": [osd],
                      "lr_schedulers": [sched], "loops": {}, "callbacks": {}},
        "mmengine": {"meta": {"epoch": 2}, "state_dict": sd, "optimizer": osd, "param_schedulers": [sched]},
        "fvcore": {"model": sd, "optimizer": osd, "scheduler": sched, "iteration": 10},
        "timm": {"epoch": 2, "arch": "net", "state_dict": sd, "optimizer": osd, "state_dict_ema": copy.deepcopy(sd),
                 "version": 2},
        "custom": {"step": 10, "model_state": sd, "optimizer_state": osd},
    }


@pytest.mark.parametrize("layout", ["lightning", "mmengine", "fvcore", "timm", "custom"])
def test_common_layouts_are_recognised(tmp_path, layout):
    model, opt = fresh()
    train(model, opt, 1)
    obj = _layouts(model, opt)[layout]
    torch.save(obj, tmp_path / "a.pth")
    ckconv.convert(tmp_path / "a.pth", tmp_path / "a.safetensors")
    assert_deep_equal(obj, ckconv.load(tmp_path / "a.safetensors"))
    info = ckconv.inspect(tmp_path / "a.safetensors")
    assert info.bundle["layout"] == layout
    (opt_info,) = info.bundle["optimizers"]
    assert opt_info["with_state"] == len(list(model.parameters()))
    prefix = "model." if layout == "lightning" else ""
    assert opt_info["names"]["0"] == prefix + "features.0.weight"
    assert "optimizer" in info.sections
    if layout in ("lightning", "mmengine", "fvcore"):
        assert "scheduler" in info.sections


def test_model_only_extracts_the_state_dict_from_each_layout(tmp_path):
    model, opt = fresh()
    train(model, opt, 1)
    for layout, obj in _layouts(model, opt).items():
        torch.save(obj, tmp_path / f"{layout}.pth")
        ckconv.convert(tmp_path / f"{layout}.pth", tmp_path / f"{layout}.safetensors", model_only=True)
        out = ckconv.load(tmp_path / f"{layout}.safetensors")
        expected = {("model." if layout == "lightning" else "") + k: v for k, v in model.state_dict().items()}
        assert list(out) == list(expected), layout


def test_safetensors_bundle_names_optimizer_state_by_parameter(tmp_path):
    from safetensors import safe_open

    model, opt = fresh()
    train(model, opt, 1)
    save_bundle(tmp_path / "b.safetensors", model=model, optimizer=opt)
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        names = set(f.keys())
    assert "optimizer.state.features.0.weight.exp_avg" in names
    assert "model.features.0.weight" in names
    assert not any(n.startswith("optimizer.state.0.") for n in names)


def test_remap_optimizer_follows_renames_and_new_head(tmp_path):
    """Source model wrapped in ``module.`` with a 5-class head; target has a fresh 3-class head."""
    from ckconv.contents.layout import resolve_names
    from ckconv.contents.optimizer_slots import remap_optimizer
    from ckconv.tree import materialize

    model, opt = fresh()
    train(model, opt, 2)
    src_sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": src_sd, "optimizer": opt.state_dict()}, tmp_path / "a.pth")
    root = ckconv.read(tmp_path / "a.pth").root
    slot_names, how, _ = resolve_names(root["optimizer"], root["model"])
    assert how.startswith("parameter order")
    target = Net()
    target_params = [n for n, _ in target.named_parameters()]
    head = {"classifier.3.weight", "classifier.3.bias"}  # pretend the head was dropped as mismatched
    mapping = {f"module.{n}": n for n in target_params if n not in head}
    new_osd, report = remap_optimizer(root["optimizer"], slot_names, mapping, target_params)
    assert sorted(report["new_without_state"]) == sorted(head)
    assert len(report["dropped"]) == 2
    target.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(target.parameters(), lr=1e-2)
    opt2.load_state_dict(materialize(new_osd))
    for (name, p_src), p_new in zip(model.named_parameters(), target.parameters()):
        if name in head:
            assert opt2.state[p_new] == {}
        else:
            assert_deep_equal(opt.state[p_src], opt2.state[p_new])


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_convert_with_arch_moves_optimizer_state_and_resumes(tmp_path, kind):
    """A DataParallel-wrapped resnet18 bundle -> torchvision:resnet18 names; resume gives identical weights."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    opt = OPTIMIZERS[kind](model.parameters())
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": wrapped, "optimizer": opt.state_dict(), "epoch": 2}, tmp_path / "src.pth")
    result = ckconv.convert(tmp_path / "src.pth", tmp_path / "out.safetensors", arch="resnet18",
                            arch_options=["num_classes=4"])
    assert any("optimizer at optimizer" in n for n in map(str, result.notes))
    resumed = torchvision.models.resnet18(weights=None, num_classes=4)
    opt2 = OPTIMIZERS[kind](resumed.parameters())
    bundle = load_bundle(tmp_path / "out.safetensors", resumed, opt2)
    assert bundle["epoch"] == 2
    for p_src, p_new in zip(model.parameters(), resumed.parameters()):
        assert_deep_equal(opt.state[p_src], opt2.state[p_new])
    model.train(), resumed.train()
    for m, o in ((model, opt), (resumed, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name


def test_convert_freeze_with_arch_is_restored_by_load_bundle(tmp_path):
    """The tutorial's step: freeze the first blocks of `features` while converting; resuming keeps them fixed."""
    import torchvision
    from click.testing import CliRunner

    from ckconv.cli import cli

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                "epoch": 1}, tmp_path / "src.pth")
    run = CliRunner().invoke(cli, ["convert", str(tmp_path / "src.pth"), str(tmp_path / "out.safetensors"),
                                   "--arch", "squeezenet1_1", "--arch-option", "num_classes=4",
                                   "--freeze", "features[:4]", "--json"])
    assert run.exit_code == 0, run.output
    expected = [n for n, _ in model.features[:4].named_parameters(prefix="features")]
    assert expected and any(f"{len(expected)} parameters frozen" in n
                            for n in __import__("json").loads(run.output)["notes"])

    resumed = torchvision.models.squeezenet1_1(weights=None, num_classes=4)
    bundle = load_bundle(tmp_path / "out.safetensors", resumed)
    assert bundle["frozen"] == expected and bundle["epoch"] == 1
    assert [n for n, p in resumed.named_parameters() if not p.requires_grad] == expected
    before = copy.deepcopy(resumed.state_dict())
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    resumed(torch.randn(2, 3, 64, 64)).square().mean().backward()
    opt2.step()
    after = resumed.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in expected)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])


def test_convert_freeze_dotted_names_without_arch_wraps_a_state_dict(tmp_path):
    model = Net()
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    result = ckconv.convert(tmp_path / "sd.pth", tmp_path / "b.pth", freeze=["features.0", "features.1"])
    assert any("wrapped the state_dict" in n for n in map(str, result.notes))
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    assert back["frozen"] == ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"]
    assert_deep_equal(back["model"], model.state_dict())
    fresh_model = Net()
    load_bundle(tmp_path / "b.pth", fresh_model)
    assert [p.requires_grad for p in fresh_model.parameters()] == [False] * 4 + [True] * 6


@pytest.mark.parametrize("args, message", [
    (["--freeze", "features[:2]"], "needs the architecture (--arch)"),
    (["--freeze", "features.0", "--model-only"], "--model-only writes a bare state_dict"),
    (["--freeze", "nothing.here"], "selects no parameter"),
])
def test_convert_freeze_refusals_write_nothing(tmp_path, args, message):
    from click.testing import CliRunner

    from ckconv.cli import cli

    torch.save({"model": Net().state_dict(), "epoch": 1}, tmp_path / "b.pth")
    run = CliRunner().invoke(cli, ["convert", str(tmp_path / "b.pth"), str(tmp_path / "out.pth"), *args])
    assert run.exit_code == 2 and message in run.output, run.output  # usage errors exit 2
    assert not (tmp_path / "out.pth").exists()
