"""--ema: the EMA weights under the model's names, from files the real trainers write.

Writers: Lightning (a LightningModule holding a Stable-Diffusion-style LitEma), timm's CheckpointSaver with a
ModelEmaV3, torch.optim.swa_utils.AveragedModel, and mmengine's EMAHook layout (ema_state_dict swapped in).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ckconv
from ckconv.errors import UsageError
from ckconv.matching.apply import load_into

from helpers import run_cli


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def train_steps(model, steps=3, after_step=None, side=8):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, side, side, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if after_step:
            after_step()
    return opt


class LitEma(nn.Module):
    """Stable Diffusion's LitEma (ldm/modules/ema.py): shadows are buffers named without dots."""

    def __init__(self, model, decay=0.9):
        super().__init__()
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)

    def forward(self, model):
        self.num_updates += 1
        decay = min(float(self.decay), (1 + self.num_updates) / (10 + self.num_updates))
        shadows = dict(self.named_buffers())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    s = shadows[self.m_name2s_name[name]]
                    s.sub_((1.0 - decay) * (s - p))

    def copy_to(self, model):
        shadows, params = dict(self.named_buffers()), dict(model.named_parameters())
        for name, s_name in self.m_name2s_name.items():
            params[name].data.copy_(shadows[s_name].data)


@pytest.fixture(scope="session")
def litema_ckpt(tmp_path_factory):
    """A Lightning .ckpt of a module with ``model`` and a LitEma ``model_ema``, saved by the Trainer."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = small_net()
            self.model[0].bias.requires_grad_(False)  # frozen: LitEma does not track it
            self.model_ema = LitEma(self.model)

        def training_step(self, batch, _):
            return self.model(batch[0]).square().mean()

        def on_train_batch_end(self, *args):
            self.model_ema(self.model)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.1)

    gen = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8, generator=gen))
    module = Module()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    path = tmp_path_factory.mktemp("litema") / "sd.ckpt"
    trainer.save_checkpoint(path)
    ema_model = small_net()
    ema_model.load_state_dict(module.model.state_dict())
    module.model_ema.copy_to(ema_model)
    return path, module.model, ema_model


def _prefixed(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_litema_convert_gives_the_ema_model(litema_ckpt, tmp_path):
    path, model, ema_model = litema_ckpt
    out = tmp_path / "ema.safetensors"
    r = run_cli("convert", path, out, "--ema", "--model-only")
    assert r.returncode == 0, r.stderr
    sd = ckconv.load(out)
    assert not any(k.startswith("model_ema.") for k in sd)  # no EMA entry left over
    plain = ckconv.load(path)["state_dict"]
    assert list(sd) == [k for k in plain if not k.startswith("model_ema.")]  # the names of the non-EMA output
    _same(_prefixed(sd, "model."), ema_model.state_dict())
    assert not torch.equal(sd["model.0.weight"], model.state_dict()["0.weight"])  # the EMA really differs
    x = torch.randn(2, 3, 8, 8)
    fresh = small_net()
    fresh.load_state_dict(_prefixed(sd, "model."))
    assert torch.equal(fresh.eval()(x), ema_model.eval()(x))


def test_litema_whole_bundle_keeps_the_rest(litema_ckpt, tmp_path):
    path, _, ema_model = litema_ckpt
    out = tmp_path / "ema.pth"
    assert run_cli("convert", path, out, "--ema").returncode == 0
    src, got = torch.load(path, weights_only=False), torch.load(out, weights_only=True)
    assert set(got) == set(src) and got["global_step"] == src["global_step"]
    _same(_prefixed(got["state_dict"], "model."), ema_model.state_dict())
    assert len(got["optimizer_states"][0]["state"]) == len(src["optimizer_states"][0]["state"])


def test_litema_arch_optimizer_slots_skip_the_shadows(litema_ckpt):
    """The shadows are buffers: matching the optimizer never counts them as parameters."""
    from ckconv.contents.optimizer_slots import model_parameters

    ckpt = ckconv.read(litema_ckpt[0])
    names = [n for n, _ in model_parameters(ckpt.root["state_dict"])]
    assert names == [f"model.{n}" for n, _ in litema_ckpt[1].named_parameters()]


def test_load_into_ema(litema_ckpt):
    path, _, ema_model = litema_ckpt
    model = small_net()
    report = load_into(model, path, ema=True, rename=[r"^model\.="])
    assert report.matched
    _same(model.state_dict(), ema_model.state_dict())


@pytest.fixture(scope="session")
def timm_ckpt(tmp_path_factory):
    """timm's own CheckpointSaver with a ModelEmaV3, as timm's train.py saves."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    from torchvision.models import squeezenet1_1

    torch.manual_seed(0)
    model = squeezenet1_1(weights=None, num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    opt = train_steps(model, steps=2, after_step=lambda: ema.update(model), side=48)
    folder = tmp_path_factory.mktemp("timm")
    saver = CheckpointSaver(model, opt, model_ema=ema, checkpoint_dir=str(folder), recovery_dir=str(folder),
                            max_history=1)
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = next(folder.glob("checkpoint-*.pth.tar"))
    return path, model, ema.module


def test_timm_state_dict_ema(timm_ckpt, tmp_path):
    path, model, ema_module = timm_ckpt
    out = tmp_path / "out.safetensors"
    r = run_cli("convert", path, out, "--ema", "--model-only", "--json")
    assert r.returncode == 0, r.stderr
    assert any("timm EMA" in n for n in json.loads(r.stdout)["notes"])
    _same(ckconv.load(out), ema_module.state_dict())
    whole = tmp_path / "whole.pth"
    assert run_cli("convert", path, whole, "--ema").returncode == 0
    got = torch.load(whole, weights_only=True)
    assert "state_dict_ema" not in got and "optimizer" in got
    _same(got["state_dict"], ema_module.state_dict())


def test_timm_ema_onto_the_architecture(timm_ckpt, tmp_path):
    path, _, ema_module = timm_ckpt
    r = run_cli("match", path, "--arch", "squeezenet1_1", "--arch-option", "num_classes=10", "--ema", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["coverage"] == 1.0
    out = tmp_path / "arch.pth"
    r = run_cli("convert", path, out, "--ema", "--arch", "squeezenet1_1", "--arch-option", "num_classes=10")
    assert r.returncode == 0, r.stderr
    got = torch.load(out, weights_only=True)
    _same(got["model"], ema_module.state_dict())
    assert "optimizer" in got and "state_dict_ema" not in got


@pytest.fixture(scope="session")
def averaged_ckpt(tmp_path_factory):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = small_net()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    opt = train_steps(model, after_step=lambda: averaged.update_parameters(model))
    path = tmp_path_factory.mktemp("swa") / "swa.pth"
    torch.save({"model": model.state_dict(), "ema": averaged.state_dict(), "optimizer": opt.state_dict()}, path)
    return path, model, averaged.module


def test_averaged_model(averaged_ckpt, tmp_path):
    path, _, averaged = averaged_ckpt
    out = tmp_path / "out.pth"
    assert run_cli("convert", path, out, "--ema").returncode == 0
    got = torch.load(out, weights_only=True)
    assert list(got) == ["model", "optimizer"]  # n_averaged and the module. copy left out
    _same(got["model"], averaged.state_dict())


def test_averaged_model_alone(averaged_ckpt, tmp_path):
    """torch.save(averaged.state_dict()): the EMA is all there is; names lose `module.`, n_averaged goes."""
    path, _, averaged = averaged_ckpt
    alone = tmp_path / "alone.pth"
    torch.save(torch.load(path)["ema"], alone)
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", alone, out, "--ema").returncode == 0
    _same(ckconv.load(out), averaged.state_dict())


def test_mmengine_layout(tmp_path):
    """mmengine's EMAHook swaps before saving: state_dict holds the EMA values, ema_state_dict the raw ones."""
    model, ema = small_net(), small_net()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    ema_sd = {"steps": torch.tensor(3), **{"module." + k: v for k, v in model.state_dict().items()}}
    path = tmp_path / "mm.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": ema.state_dict(), "ema_state_dict": ema_sd}, path)
    out = tmp_path / "out.pth"
    r = run_cli("convert", path, out, "--ema")
    assert r.returncode == 0, r.stderr
    got = torch.load(out, weights_only=True)
    assert list(got) == ["meta", "state_dict"]
    _same(got["state_dict"], ema.state_dict())


def test_no_ema_is_refused(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": small_net().state_dict()}, path)
    out = tmp_path / "out.pth"
    r = run_cli("convert", path, out, "--ema")
    assert r.returncode != 0 and not out.exists()
    assert r.stderr.count("\n") == 1 and "holds no EMA" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("ema, message", [
    ({"0.weight": torch.zeros(2, 2)}, "the EMA value of 0.weight is float32.2, 2., the model's is float32.4, 3, 3, 3."),
    ({"head.weight": torch.zeros(2)}, "1 EMA tensors fit no tensor of the model at state_dict .head.weight."),
])
def test_ema_of_another_model_is_refused(tmp_path, ema, message):
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": small_net().state_dict(), "state_dict_ema": ema}, path)
    with pytest.raises(UsageError, match=message):
        ckconv.convert(path, tmp_path / "out.pth", ema=True)
    assert not (tmp_path / "out.pth").exists()


def test_ema_with_section_is_a_usage_error(timm_ckpt, tmp_path):
    r = run_cli("convert", timm_ckpt[0], tmp_path / "o.pth", "--ema", "--section", "state_dict_ema")
    assert r.returncode != 0 and "drop --section" in r.stderr and not (tmp_path / "o.pth").exists()
