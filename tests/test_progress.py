"""The progress line: drawn on stderr when stderr is a TTY and the conversion runs over 1 s, else silent.

A real ``ckconv convert`` runs in a child process whose stderr is a pseudo-terminal (or a pipe). Time is the
bar's injected clock, not the machine's: in the child it reads 0 when the bar starts and ``ELAPSED`` at every
reading after that, so "a long conversion" and "a short one" do not depend on how busy the machine is.
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

import pytest
import torch

from ckconv.cli import progress as progress_mod

pytestmark = pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs a POSIX pty")

CHILD = r"""
import sys
from ckconv.cli import convert_cmd, main

ELAPSED = float(sys.argv[1])

class Timed(convert_cmd.Progress):  # a clock reading 0 when the bar starts and ELAPSED at every reading after it
    def __init__(self, *args, **kwargs):
        readings = iter([0.0])
        super().__init__(*args, clock=lambda: next(readings, ELAPSED), **kwargs)

convert_cmd.Progress = Timed
sys.argv = ["ckconv", *sys.argv[2:]]
main()
"""


def run_child(args, *, tty, elapsed=10.0):
    """Run the CLI with stderr on a pty (tty=True) or a pipe; returns (exit code, stdout, stderr) as text."""
    cmd = [sys.executable, "-c", CHILD, str(elapsed), *map(str, args)]
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
    code, _, err = run_child(["convert", source, tmp_path / "out.safetensors"], tty=True, elapsed=0.9)
    assert code == 0, err
    assert "\r" not in err and err == ""  # every byte written, all of it inside the first second by the clock


def test_no_bar_with_json_output(source, tmp_path):
    code, out, err = run_child(["convert", source, tmp_path / "out.safetensors", "--json"], tty=True)
    assert code == 0, err
    assert "\r[" not in err
    assert out.lstrip().startswith("{")


@pytest.mark.parametrize("width", [200, 80, 60, 40, 30, 20, 12, 5])
def test_the_bar_fits_any_width_and_keeps_rate_and_time_longest(width):
    line = progress_mod.bar_line("a.pth ", 0.45, "120/267 MB", "85 MB/s", "ETA 0:02", width)
    assert len(line) <= width and "45.0%" in line
    if width >= 30:
        assert line.endswith("85 MB/s, ETA 0:02")  # the bar and the amount go before the rate and the time
    if width >= 80:
        assert "[#############" in line and "120/267 MB" in line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def on_a_terminal(monkeypatch):
    """stderr a TTY, for the test's body (pytest puts its own stderr back between a fixture and the test)."""
    err = Terminal()
    monkeypatch.setattr(progress_mod.sys, "stderr", err)
    monkeypatch.setitem(progress_mod.RUN, "bars", [])
    return err


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_bar_waits_one_second_then_redraws_at_most_every_tenth(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    clock = Clock()
    bar = progress_mod.Progress(clock=clock)
    bar.start(100 * 10**6)
    draws = []
    for now in (0.0, 0.5, 0.999, 1.0, 1.05, 1.099, 1.1, 1.3):
        clock.now = now
        bar(10**6)
        draws.append(terminal.getvalue().count("\r"))
    assert draws == [0, 0, 0, 1, 1, 1, 2, 3]
    assert bar in progress_mod.RUN["bars"]  # an error or a warning ends its line first
    clock.now = 2.0
    bar.finish()
    final = terminal.getvalue().split("\r")[-1]
    assert final.endswith("\n") and final.rstrip().endswith("8.0% 8/100 MB, 4 MB/s, in 0:02")
    assert not progress_mod.RUN["bars"]


def test_a_short_run_draws_nothing_and_ends_no_line(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    clock = Clock()
    bar = progress_mod.Progress(clock=clock)
    bar.start(10**6)
    for now in (0.1, 0.5, 0.99):
        clock.now = now
        bar(10**5)
    bar.finish()
    assert terminal.getvalue() == ""


def test_steps_are_drawn_at_once_and_erased_at_the_end(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    bar = progress_mod.Progress(label="ranking architectures ", keep=False, clock=Clock())
    bar.step(0, 2, "resnet152")
    bar.step(1, 2, "vgg11")
    out = terminal.getvalue()
    assert out == "\rranking architectures 1/2: resnet152\rranking architectures 2/2: vgg11    "
    bar.finish()
    assert terminal.getvalue() == out + "\r" + " " * len("ranking architectures 2/2: vgg11") + "\r"


def test_a_shorter_final_line_blanks_the_longer_one_before_it(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    clock = Clock()
    bar = progress_mod.Progress(clock=clock)
    bar.total, bar.done = 10**9, 10**8
    bar._draw_bytes(100)  # ETA 15:00: a longer line than the final one
    bar.done = 10**9
    bar._draw_bytes(3, final=True)  # "in 0:03"
    last = terminal.getvalue().split("\r")[-1]
    assert last.rstrip().endswith("in 0:03") and len(last) >= len(terminal.getvalue().split("\r")[-2])
