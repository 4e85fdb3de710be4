"""The one progress line on stderr: a conversion's bytes, or which architecture ``--arch auto`` is scoring."""

from __future__ import annotations

import shutil
import sys
import time

from .common import RUN


class Progress:
    """One line on stderr redrawn in place, shown only on a TTY and not under ``-q``; its line is ended before
    anything else is written to stderr (an error, a warning), and cut to the terminal's width. Two feeds:

    - bytes: ``start(total)``, then ``bar(n)`` for each ``n`` bytes done: ``[#####      ]  45.0% 120/267 MB,
      85 MB/s, ETA 0:02``, drawn once the work has run ``delay`` seconds (a short conversion shows nothing) and at
      most every ``interval``; ``finish()`` draws the final count and ends the line;
    - steps (``keep=False``): ``step(i, n, name)`` says which of ``n`` items is at work (``ranking architectures
      3/80: resnet50``), drawn at once; ``finish()`` erases it, so what follows starts at column 0.

    ``clock`` (seconds, ``time.monotonic`` by default) decides the delay, the throttle and the rate.
    """

    def __init__(self, enabled=True, label="", *, delay=1.0, interval=0.1, keep=True, clock=time.monotonic):
        self.enabled = enabled and sys.stderr.isatty() and RUN["verbosity"] >= 0
        self.label, self.delay, self.interval, self.keep, self.clock = label, delay, interval, keep, clock
        self.total = self.done = 0
        self.t0 = clock()
        self.last = None  # when the line was drawn last
        self.width = 0  # of the line drawn last; 0: none drawn

    def start(self, total):
        self.total = total

    def __call__(self, n):
        self.done += n
        if not self.enabled or not self.total:
            return
        now = self.clock()
        if now - self.t0 < self.delay or (self.last is not None and now - self.last < self.interval):
            return
        self.last = now
        self._draw_bytes(now)

    def step(self, i, n, name):
        if self.enabled:
            self._show(f"{self.label}{i + 1}/{n}: {name}"[: shutil.get_terminal_size().columns - 1])

    def _draw_bytes(self, now, final=False):
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        when = (f"in {_clock(elapsed)}" if final else
                f"ETA {_clock((self.total - self.done) / rate)}" if rate > 0 else "ETA ?")
        self._show(bar_line(self.label, frac, f"{self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB",
                            f"{rate / 1e6:,.0f} MB/s", when, shutil.get_terminal_size().columns - 1))

    def _show(self, text):
        sys.stderr.write("\r" + text.ljust(self.width))  # blanks what a longer line before it left
        sys.stderr.flush()
        if not self.width:
            RUN["bars"].append(self)
        self.width = max(len(text), 1)

    def close(self):
        """End the line (where one was drawn): kept with a newline, or erased, so the next line on stderr starts at
        column 0."""
        if self.width:
            sys.stderr.write("\n" if self.keep else "\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0
            if self in RUN["bars"]:
                RUN["bars"].remove(self)

    def finish(self):
        if self.width and self.keep and self.total:
            self._draw_bytes(self.clock(), final=True)  # the last update may have been throttled: the final count
        self.close()


def bar_line(label, frac, amount, rate, when, width) -> str:
    """``label[#####     ]  45.0% 120/267 MB, 85 MB/s, ETA 0:02`` in at most ``width`` columns. A narrow terminal
    loses the bar's length first, then the bar, then the amount, then the label: percent, rate and time go last."""
    pct = f"{frac:6.1%}"
    tail = f"{rate}, {when}"
    for bar_width in (30, 20, 10):
        bar = "#" * int(frac * bar_width)
        line = f"{label}[{bar:<{bar_width}}] {pct} {amount}, {tail}"
        if len(line) <= width:
            return line
    for line in (f"{label}{pct.strip()} {amount}, {tail}", f"{label}{pct.strip()}, {tail}", f"{pct.strip()}, {tail}",
                 f"{pct.strip()} {when}"):
        if len(line) <= width:
            return line
    return pct.strip()[:max(width, 1)]


def _clock(seconds) -> str:
    seconds = int(min(seconds, 359999))
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rest // 60:0{2 if h else 1}d}:{rest % 60:02d}"
