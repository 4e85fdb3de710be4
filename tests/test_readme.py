"""The README runs: every ``$ ckconv ...`` line of its console blocks is executed in a folder holding the files the
examples name (with the output the README shows, "..." standing for any text), and every Python block runs after a
prelude that defines ``model``, ``opt`` and ``sched`` (a torchvision VGG16 with seeded random weights, its
optimizer and scheduler) and writes the checkpoints the block reads."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from helpers import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
# Commands the README shows failing on purpose, with their exit status (the rest must exit 0).
EXIT_STATUS = {"inspect suspicious.pth": 1, "scan downloads/": 1, "scan . --format sarif": 1, "convert picture.png.pth": 1,
               "convert runs/a.pth picture.png.pth": 1, "convert resnet.pth out.safetensors --arch resnt18": 2}


class Payload:
    """Pickles as a call to os.system: a stand-in for a hostile checkpoint. Nothing here ever unpickles it."""

    def __reduce__(self):
        return os.system, ("echo this would run",)


def blocks(kind):
    return re.findall(rf"^```{kind}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def console_steps():
    """[(command, expected output lines)] of every console block, in README order."""
    steps = []
    for block in blocks("console"):
        current = None
        for line in block.splitlines():
            if line.startswith("$ "):
                current = (line[2:], [])
                steps.append(current)
            elif current is not None and line.strip():
                current[1].append(line)
    return [(cmd, out) for cmd, out in steps if cmd.startswith("ckconv ")]


def make_files(folder: Path):
    """What the console examples name: a resnet18 state_dict, a hostile file, a downloads folder."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), folder / "resnet.pth")
    torch.save({"weight": torch.ones(2), "config": Payload()}, folder / "suspicious.pth")
    (folder / "downloads" / "sub").mkdir(parents=True)
    shutil.copy(folder / "resnet.pth", folder / "downloads" / "resnet.pth")
    (folder / "downloads" / "sub" / "payload.pkl").write_bytes(pickle.dumps(Payload(), protocol=2))
    (folder / "runs").mkdir()
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        torch.save({"model": torchvision.models.resnet18(weights=None).state_dict(), "epoch": 3},
                   folder / "runs" / f"{name}.pth")
    (folder / "picture.png.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (folder / "st").mkdir()


def matches(expected: str, actual: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual.rstrip()) is not None


def test_console_examples_run_and_print_what_the_readme_shows(tmp_path):
    make_files(tmp_path)
    steps = console_steps()
    assert len(steps) >= 10
    for command, expected in steps:
        args = shlex.split(command)[1:]
        result = run_cli(*args, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
        want = next((code for key, code in EXIT_STATUS.items() if " ".join(args).startswith(key)), 0)
        assert result.returncode == want, f"$ {command}\n{result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr, command
        streams = [result.stdout.splitlines(), result.stderr.splitlines()]
        at = [0, 0]
        for line in expected:  # each line shown matches a line of stdout or stderr, in order within each stream
            found = next(((s, i) for s in (0, 1) for i in range(at[s], len(streams[s]))
                          if matches(line, streams[s][i])), None)
            assert found is not None, (f"$ {command}\nREADME shows: {line}\nit printed:\n{result.stdout}"
                                       f"{result.stderr}")
            at[found[0]] = found[1] + 1


PRELUDE = """
import torch, torchvision
import ckconv
torch.manual_seed(0)
model = torchvision.models.vgg16(weights=None)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
torch.save(model.state_dict(), "ckpt.pth")
"""


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks("python")
    assert len(code) >= 2
    namespace: dict = {}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)
    for name in ("model.pth", "in.pth"):  # the same checkpoint under the names the examples use
        os.link("ckpt.pth", name)
    for i, block in enumerate(code):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    model = namespace["model"]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [f"features.{i}.{k}" for i in (0, 2, 5, 7) for k in ("weight", "bias")]  # four convs


def test_the_readme_says_what_features_10_is():
    text = README.read_text()
    assert "first three conv blocks" not in text
    assert "VGG16's first two conv blocks (four convs)" in text
