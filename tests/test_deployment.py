"""Deployment archives: torch.export (.pt2) and TorchScript files, read for the state_dict, never run."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
import torchvision

import ckconv

from helpers import run_cli, tensor_bytes


def _same_state_dict(got: dict, want: dict):
    assert list(got) == list(want)  # model.state_dict() order
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert tensor_bytes(got[k]) == tensor_bytes(v), k


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """torch.export.save of a torchvision model with trained-looking buffers (random running stats)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("export") / "mnv3.pt2"
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    torch.export.save(program, path)
    return path, model


def test_export_convert_gives_the_model_state_dict(exported, tmp_path):
    path, model = exported
    out = tmp_path / "w.safetensors"
    r = run_cli("convert", path, out)
    assert r.returncode == 0, r.stderr
    got = ckconv.load(out)
    _same_state_dict(got, model.state_dict())
    fresh = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    fresh.load_state_dict(got)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))


def test_export_scan_and_inspect_name_the_code(exported):
    path, _ = exported
    r = run_cli("scan", path)
    assert r.returncode == 1 and r.stdout.startswith("CODE") and "torch-export" in r.stdout
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert info["format"] == "torch-export" and info["verdict"] == "code"


def test_export_is_not_written(exported, tmp_path):
    r = run_cli("convert", exported[0], tmp_path / "x.pt2", "--to", "torch-export")
    assert r.returncode != 0 and "does not write" in r.stderr and not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize("fmt, what", [("torch-export", "torch.export archives"), ("torchscript", "TorchScript archives")])
def test_read_only_formats_refuse_to_write_in_one_line(tmp_path, fmt, what):
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pth")
    r = run_cli("convert", tmp_path / "m.pth", tmp_path / "x.out", "--to", fmt)
    assert (r.returncode, r.stderr) == (2, f"Error: ckconv reads {what} but does not write them: pick another --to\n")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # nothing written, nothing staged


def _rewrite(src, dst, name_suffix, change):
    """A copy of archive ``src`` with the record ending in ``name_suffix`` replaced by ``change(bytes)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, change(data) if info.filename.endswith(name_suffix) else data)


@pytest.mark.parametrize("tamper, message", [
    (lambda c: c["config"]["features.0.0.weight"].update(path_name="missing"), "names no record"),
    (lambda c: c["config"]["features.0.0.weight"]["tensor_meta"]["sizes"][0].update(as_int=10**6),
     "reaches past its record"),
    (lambda c: c["config"]["features.0.0.weight"]["tensor_meta"].update(layout=1), "strided tensors"),
])
def test_export_lies_are_refused(exported, tmp_path, tamper, message):
    def change(raw):
        config = json.loads(raw)
        tamper(config)
        return json.dumps(config).encode()

    bad = tmp_path / "bad.pt2"
    _rewrite(exported[0], bad, "model_weights_config.json", change)
    out = tmp_path / "out.safetensors"
    r = run_cli("convert", bad, out)
    assert r.returncode != 0 and message in r.stderr and not out.exists()
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


class Odd(torch.nn.Module):
    """Tied weights, a frozen parameter, a None bias, a non-persistent buffer, a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.a.bias.requires_grad_(False)
        self.register_buffer("np", torch.ones(3), persistent=False)
        self.register_buffer("p", torch.arange(3.0))
        self.plain = torch.zeros(2)
        self.seq = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2, bias=False))

    def forward(self, x):
        return self.seq(self.b(self.a(x))) + self.p.sum() + self.np.sum() + self.plain.sum()


@pytest.fixture(scope="session")
def scripted(tmp_path_factory):
    """torch.jit.script and torch.jit.trace archives of a torchvision model and of an odd module."""
    folder = tmp_path_factory.mktemp("jit")
    torch.manual_seed(0)
    mnv3 = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    odd = Odd().eval()
    out = {}
    for label, model, x in (("mnv3", mnv3, torch.randn(1, 3, 32, 32)), ("odd", odd, torch.randn(2, 4))):
        for how, make in (("script", lambda m, x: torch.jit.script(m)), ("trace", torch.jit.trace)):
            path = folder / f"{label}_{how}.pt"
            torch.jit.save(make(model, x), path)
            out[label, how] = path
    return out, {"mnv3": mnv3, "odd": odd}


@pytest.mark.parametrize("label", ["mnv3", "odd"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_state_dict_is_what_torch_jit_load_gives(scripted, label, how, tmp_path):
    paths, _ = scripted
    path = paths[label, how]
    want = torch.jit.load(path).state_dict()  # the oracle: the saved module's own state_dict
    out = tmp_path / "w.safetensors"
    r = run_cli("convert", path, out)
    assert r.returncode == 0, r.stderr
    _same_state_dict(ckconv.load(out), want)
    pth = tmp_path / "w.pth"
    assert run_cli("convert", path, pth).returncode == 0
    _same_state_dict(torch.load(pth, weights_only=True), want)


def test_torchscript_weights_run_the_same_model(scripted):
    paths, models = scripted
    fresh = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    fresh.load_state_dict(ckconv.load(paths["mnv3", "trace"]))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), models["mnv3"](x))
    odd = Odd().eval()
    odd.load_state_dict(ckconv.load(paths["odd", "script"]), strict=False)  # np is kept by TorchScript
    y = torch.randn(3, 4)
    assert torch.equal(odd(y), models["odd"](y))


def test_torchscript_scan_says_code(scripted):
    paths, _ = scripted
    r = run_cli("scan", paths["mnv3", "script"], paths["odd", "trace"], "--json")
    assert r.returncode == 1
    assert [x["verdict"] for x in json.loads(r.stdout)["results"]] == ["code", "code"]


def _swap_record(src, dst, suffix, data):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith(suffix) else zin.read(info))


def test_torchscript_payload_is_refused(scripted, tmp_path):
    """A TorchScript archive whose data.pkl calls os.system: ckconv refuses it, scan says dangerous, nothing is
    written. Positive control: the pickle is armed (a plain unpickling in a subprocess fires the canary)."""
    import pickle
    import subprocess
    import sys

    canary = tmp_path / "canary"

    class Boom:
        def __reduce__(self):
            import os
            return os.system, (f"touch {canary}",)

    payload = pickle.dumps(Boom(), protocol=2)
    armed = tmp_path / "payload.pkl"
    armed.write_bytes(payload)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(armed)!r}, 'rb').read())"],
                   check=True, timeout=120)
    assert canary.exists()
    canary.unlink()
    bad = tmp_path / "bad.pt"
    _swap_record(scripted[0]["odd", "script"], bad, "/data.pkl", payload)
    out = tmp_path / "out.safetensors"
    r = run_cli("convert", bad, out)
    assert r.returncode != 0 and "system" in r.stderr and not out.exists()
    assert run_cli("scan", bad).stdout.startswith("DANGEROUS")
    assert not canary.exists()


def test_torchscript_inflation_is_bounded(scripted, tmp_path, monkeypatch):
    """The code records are the only deflated ones allowed, each inflated to at most what is left of the budget."""
    from ckconv.formats import torchscript

    monkeypatch.setattr(torchscript, "MAX_CODE", 100)
    with pytest.raises(Exception, match="inflates"):
        torchscript.read(scripted[0]["mnv3", "script"])
    bad = tmp_path / "deflated_data.pt"
    with zipfile.ZipFile(scripted[0]["odd", "script"]) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith("/data.pkl") else info.compress_type
            zout.writestr(info, data)
    r = run_cli("convert", bad, tmp_path / "o.safetensors")
    assert r.returncode != 0 and "compressed" in r.stderr
