"""The conversion progress bar: drawn on stderr when stderr is a TTY and the conversion runs over ~1 s, else silent.

A real ``ckconv convert`` runs in a child process whose stderr is a pseudo-terminal (or a pipe). To avoid a slow
test, the child moves the bar's start time back so that the one-second threshold has already passed.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs a POSIX pty")

CHILD = r"""
import sys, time
import ckconv.cli.convert_cmd as convert_cmd
from ckconv.cli import main

AGE = float(sys.argv[1])

class Aged(convert_cmd.Progress):   # as if the conversion had been running for a while already
    def __init__(self, enabled):
        super().__init__(enabled)
        self.t0 -= AGE

convert_cmd.Progress = Aged
sys.argv = ["ckconv", *sys.argv[2:]]
main()
"""


def run_child(args, *, tty, age=10.0):
    """Run the CLI with stderr on a pty (tty=True) or a pipe; returns (exit code, stdout, stderr) as text."""
    cmd = [sys.executable, "-c", CHILD, str(age), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k != "CKCONV_DEBUG"}
    if not tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    err = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                proc.kill()
                raise AssertionError("child hung")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            err += data
    finally:
        os.close(master)
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=120), out, err.decode(errors="replace")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress") / "src.pth"
    g = torch.Generator().manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(8)}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_bar_is_drawn_on_a_tty_and_ends_with_a_newline(source, tmp_path, suffix):
    code, out, err = run_child(["convert", source, tmp_path / f"out{suffix}"], tty=True)
    assert code == 0, err
    assert "\r[" in err and "MB" in err, repr(err)
    assert "%" in err
    assert err.endswith("\n")  # the prompt is not left after the bar (a pty turns "\n" into "\r\n")
    assert err.rstrip().rsplit("\r", 1)[-1].startswith("[" + "#" * 30 + "] 100.0%")  # ends on the final count
    assert "\r[" not in out and "Converted" in out  # data on stdout, the bar only on stderr


def test_no_bar_when_stderr_is_not_a_tty(source, tmp_path):
    code, out, err = run_child(["convert", source, tmp_path / "out.safetensors"], tty=False)
    assert code == 0, err
    assert err == ""
    assert "\r" not in out and "Converted" in out


def test_no_bar_for_a_short_conversion(source, tmp_path):
    code, _, err = run_child(["convert", source, tmp_path / "out.safetensors"], tty=True, age=0.0)
    assert code == 0, err
    assert "\r[" not in err  # a 2 MB conversion finishes well inside the first second


def test_no_bar_with_json_output(source, tmp_path):
    code, out, err = run_child(["convert", source, tmp_path / "out.safetensors", "--json"], tty=True)
    assert code == 0, err
    assert "\r[" not in err
    assert out.lstrip().startswith("{")


@pytest.mark.parametrize("width", [200, 80, 60, 40, 30, 20, 12, 5])
def test_the_bar_fits_any_width_and_keeps_rate_and_time_longest(width):
    from ckconv.cli.convert_cmd import bar_line

    line = bar_line("a.pth ", 0.45, "120/267 MB", "85 MB/s", "ETA 0:02", width)
    assert len(line) <= width and "45.0%" in line
    if width >= 30:
        assert line.endswith("85 MB/s, ETA 0:02")  # the bar and the amount go before the rate and the time
    if width >= 80:
        assert "[#############" in line and "120/267 MB" in line


def test_a_shorter_final_line_blanks_the_longer_one_before_it(monkeypatch):
    import io

    from ckconv.cli import convert_cmd

    err = io.StringIO()
    monkeypatch.setattr(convert_cmd.sys, "stderr", err)
    bar = convert_cmd.Progress(False)
    bar.enabled, bar.total, bar.done = True, 10**9, 10**8
    bar._draw(bar.t0 + 100)  # ETA 15:00: a longer line than the final one
    bar.done = 10**9
    bar._draw(bar.t0 + 3, final=True)  # "in 0:03"
    last = err.getvalue().split("\r")[-1]
    assert last.rstrip().endswith("in 0:03") and len(last) >= len(err.getvalue().split("\r")[-2])
