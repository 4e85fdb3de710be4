"""Every name ckconv prints is escaped, in every command (issue 21): file names, tensor names, keys and values from
a checkpoint cannot retitle, clear or rewrite the terminal; ints past Python's 4,300-digit ``str`` limit are shown
shortened, never an internal error. Run through the real CLI in subprocesses, bytes as the terminal gets them."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

ESC = "\x1b]0;PWNED\x07\x1b[2J\r\u202e\x9b"  # retitle, clear screen, carriage return, bidi override, C1 CSI


def run(*args, cwd):
    exe = Path(sys.executable).with_name("ckconv")
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, cwd=cwd, env=env, timeout=300)
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def obeyable(text: str) -> list:
    """Characters a terminal would act on: C0/C1 controls (a newline aside), DEL, format characters (bidi)."""
    return sorted({c for c in text if c != "\n" and (unicodedata.category(c) in ("Cc", "Cf", "Cs"))})


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("esc")
    sd = {f"fc{ESC}.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 2**20000, "params": [0, 1]}]},
                f"note{ESC}": f"value{ESC}", "epoch": 10**5000}, folder / f"src{ESC}.pth")
    torch.save({"model": dict(sd, extra=torch.ones(1)), "epoch": 10**5000 + 1}, folder / "other.pth")
    (folder / f"junk{ESC}.pth").write_bytes(b"not a checkpoint at all")
    return folder


@pytest.mark.parametrize("args", [
    ("convert", "SRC", "out.safetensors", "--force"),
    ("convert", "SRC", "out.pth", "--force", "--model-only", "--dtype", "fp16"),
    ("convert", "JUNK", "out.safetensors"),
    ("inspect", "SRC"),
    ("inspect", "--summary", "SRC"),
    ("scan", "."),
    ("diff", "SRC", "other.pth"),
    ("match", "SRC", "--arch", "resnet18"),
], ids=lambda a: " ".join(a[:3]))
def test_no_command_prints_a_control_character(hostile, args):
    names = {"SRC": f"src{ESC}.pth", "JUNK": f"junk{ESC}.pth"}
    rc, out, err = run(*[names.get(a, a) for a in args], cwd=hostile)
    assert "internal error" not in err and "Traceback" not in err, err
    assert rc in (0, 1), (rc, err)
    assert obeyable(out) == [] and obeyable(err) == [], (out, err)
    assert "\\x1b]0;PWNED\\x07" in out + err  # the name is shown, escaped


def test_the_converted_line_shows_both_names_escaped(hostile):
    rc, out, err = run("convert", f"src{ESC}.pth", f"dst{ESC}.safetensors", "--force", cwd=hostile)
    assert rc == 0, err
    line = out.splitlines()[0]
    # (off a terminal click itself drops the CSI sequence \x1b[2J; on one it is escaped like the rest)
    assert line.startswith("Converted src\\x1b]0;PWNED\\x07"), line
    assert "\\r\\u202e\\x9b.pth (torch) -> dst\\x1b]0;PWNED\\x07" in line, line
    assert (hostile / f"dst{ESC}.safetensors").is_file()  # the file itself keeps its real name


def test_huge_ints_are_shown_shortened(hostile):
    rc, out, err = run("inspect", f"src{ESC}.pth", cwd=hostile)
    assert rc == 0 and "lr=<20001-bit int 0x10000000...00000000>" in out, (out, err)
    rc, out, err = run("diff", f"src{ESC}.pth", "other.pth", cwd=hostile)
    assert rc == 1 and "-bit int 0x" in out and "internal error" not in err, (out, err)
    rc, out, err = run("inspect", "--json", f"src{ESC}.pth", cwd=hostile)
    assert rc == 0 and obeyable(out) == [] and "internal error" not in err
