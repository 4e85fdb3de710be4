"""Exit codes as diff and cmp have them, checked on the real ``ckconv`` in subprocesses: 0 yes, 1 no, 2 trouble
(every usage error, and any error under ``diff``), 128 + the signal when interrupted, with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BUNDLE = FIXTURES / "tiny_bundle.pth"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    torch.save({"w": torch.ones(3), "epoch": 1}, root / "a.pth")
    torch.save({"w": torch.ones(3), "epoch": 2}, root / "b.pth")
    return root


def test_diff_answers_0_same_1_different_2_trouble(pair):
    assert run_cli("diff", pair / "a.pth", pair / "a.pth").returncode == 0
    assert run_cli("diff", pair / "a.pth", pair / "b.pth").returncode == 1
    missing = run_cli("diff", pair / "a.pth", pair / "missing.pth")
    assert missing.returncode == 2 and missing.stderr.startswith("Error: ") and missing.stderr.count("\n") == 1
    as_json = run_cli("diff", pair / "a.pth", pair / "missing.pth", "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["type"] == "NotACheckpoint"
    broken = pair / "broken.pth"
    broken.write_bytes(BUNDLE.read_bytes()[:300])
    assert run_cli("diff", broken, pair / "a.pth").returncode == 2


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
@pytest.mark.parametrize("args", [
    ["convert", str(BUNDLE)],  # click: missing DST
    ["convert", str(BUNDLE), "{tmp}/x.pth", "--dtype", "int3"],  # click: a bad choice
    ["convert", str(BUNDLE), "{tmp}/x.weird"],  # ckconv: the output format cannot be told
    ["convert", str(BUNDLE), "{tmp}/x.pth", "--to", "nosuch"],  # ckconv: an unknown format
    ["inspect", str(BUNDLE), "--allow-global", "os..x"],  # ckconv: a pattern that is no dotted name
    ["scan", "{tmp}/missing"],
    ["diff", str(BUNDLE)],
    ["nosuchcommand"],
])
def test_every_usage_error_exits_2(tmp_path, args, json_flag):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], *json_flag)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    if json_flag and args[0] != "nosuchcommand":
        assert json.loads(result.stdout)["type"] == "UsageError"
    assert not list(tmp_path.iterdir())


def test_quiet_and_verbose_after_the_command(tmp_path):
    torch.save({"w": torch.ones(2, dtype=torch.float64)}, tmp_path / "a.pth")
    loud = run_cli("convert", tmp_path / "a.pth", tmp_path / "a.safetensors", "--dtype", "fp32")
    assert loud.returncode == 0 and "note:" in loud.stdout
    for args in (["-q", "convert", "{a}", "{b}", "--dtype", "fp32"], ["convert", "{a}", "{b}", "--dtype", "fp32", "-q"],
                 ["convert", "--quiet", "{a}", "{b}", "--dtype", "fp32"]):
        (tmp_path / "b.safetensors").unlink(missing_ok=True)
        quiet = run_cli(*[a.format(a=tmp_path / "a.pth", b=tmp_path / "b.safetensors") for a in args])
        assert quiet.returncode == 0 and "note:" not in quiet.stdout and quiet.stderr == "", args
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "notes.txt" not in run_cli("scan", tmp_path).stdout
    assert "SKIPPED" in run_cli("scan", tmp_path, "-v").stdout
    assert "SKIPPED" in run_cli("-v", "scan", tmp_path).stdout
    both = run_cli("-q", "scan", tmp_path, "-v")
    assert both.returncode == 2 and "contradict" in both.stderr


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """256 MB: converting it takes seconds, long enough to interrupt while the output is staged."""
    path = tmp_path_factory.mktemp("big") / "big.pth"
    torch.save({"a": torch.zeros(32 << 20), "b": torch.ones(32 << 20)}, path)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_exits_128_plus_signal_and_leaves_nothing(tmp_path, big, sig):
    exe = Path(sys.executable).with_name("ckconv")
    proc = subprocess.Popen([str(exe), "convert", str(big), str(tmp_path / "out.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not os.listdir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.002)
    staged = os.listdir(tmp_path)
    assert proc.poll() is None and staged, "the conversion ended before its output was staged: use a bigger file"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.splitlines() == ["Error: interrupted; nothing was written"] and out == ""
    assert os.listdir(tmp_path) == [], f"left behind: {os.listdir(tmp_path)} (staged: {staged})"


@pytest.mark.parametrize("command", ["", "convert", "match", "inspect", "diff", "scan", "plugins"])
def test_every_help_has_examples_that_name_the_command(command):
    from click.testing import CliRunner

    from ckconv.cli import cli

    result = CliRunner().invoke(cli, [*command.split(), "--help"], terminal_width=80)
    assert result.exit_code == 0
    examples = result.stdout.split("Examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) >= 2 and all(line.strip().startswith(f"ckconv {command}".strip()) for line in examples)
