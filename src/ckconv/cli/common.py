"""What every ``ckconv`` command shares: this run's output settings (-q/-v/--json), the one-line errors, warnings,
JSON and tables that fit the terminal.

Commands render through these helpers so that every command fails, warns and prints JSON the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings

import click

from ..errors import CkconvError, CkconvWarning
from ..tree import json_safe, key_text

DEBUG = os.environ.get("CKCONV_DEBUG", "") not in ("", "0")
# This run's output settings: -q (-1) / -v (1), whether --json was asked for, bars still drawn on stderr.
RUN: dict = {"verbosity": 0, "json": False, "bars": []}


class CkconvGroup(click.Group):
    """The group every command runs under: resets this run's settings, and turns whatever a command raises into one
    line on stderr (and an object under ``--json``) with exit 1, or 2 for a usage error; never a traceback. All it
    prints goes through :class:`Escaped` streams: a name from a file cannot drive the terminal, in any command."""

    def main(self, *args, **kwargs):
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Escaped(sys.stdout), Escaped(sys.stderr)
        try:
            return super().main(*args, **kwargs)
        finally:
            sys.stdout, sys.stderr = streams

    def invoke(self, ctx):
        args = ctx.args[: ctx.args.index("--")] if "--" in ctx.args else ctx.args
        RUN.update(verbosity=0, json="--json" in args, bars=[])
        try:
            with warnings.catch_warnings():
                _warnings_as_lines()
                return super().invoke(ctx)
        except click.UsageError as exc:  # exit 2; under --json an object too
            if not RUN["json"]:
                raise
            end_bars()
            echo_json({"error": " ".join(exc.format_message().splitlines()), "type": "UsageError"})
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CkconvError as exc:
            if DEBUG:
                raise
            fail(str(exc), type(exc).__name__)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written")
        except BrokenPipeError:
            reader_went_away()
        except MemoryError:
            fail("out of memory; nothing was written (try a machine with more memory)")
        except RecursionError:
            if DEBUG:
                raise
            fail("the input nests too deeply to process; the file is malformed or hostile")
        except OSError as exc:
            if DEBUG:
                raise
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            fail(f"cannot access{where}: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - last line of defence: no tracebacks for users
            if DEBUG:
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (rerun with CKCONV_DEBUG=1 and report it)")


def _warnings_as_lines():
    """The library's :class:`CkconvWarning`s printed as :func:`warn` lines (each time); other warnings as usual."""
    shown = warnings.showwarning
    warnings.simplefilter("always", CkconvWarning)

    def show(message, category, *args, **kwargs):
        if issubclass(category, CkconvWarning):
            warn(message)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show


def reader_went_away():
    """``ckconv inspect big.pth | head``: the reader closed the pipe; stop quietly, as cat and ls do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit must not fail again
    except OSError:
        pass
    sys.exit(0)


def fail(message, kind="Error"):
    """One ``Error:`` line on stderr, exit 1; under ``--json`` the error is also an object on stdout."""
    end_bars()  # a bar on stderr ends its line first: the error starts a line of its own
    text = " ".join(str(message).splitlines())  # one line, whatever a path or a file's names contain
    if RUN["json"]:
        extra = click.get_current_context(silent=True)
        extra = extra.meta.get("ckconv.json_extra", {}) if extra is not None else {}
        echo_json({"error": text, "type": kind, **extra})
    click.echo(f"Error: {text}", err=True)
    sys.exit(1)


def end_bars():
    for bar in RUN["bars"]:
        bar.close()
    RUN["bars"] = []


def warn(message):
    """``warning: ...`` on stderr (silenced by -q): something the user may not have meant, never data."""
    if RUN["verbosity"] >= 0:
        click.echo(f"warning: {' '.join(str(message).splitlines())}", err=True)


def verbose() -> bool:
    return RUN["verbosity"] > 0


def echo_json(obj):
    click.echo(json.dumps(json_safe(obj), indent=2, default=str))


def table(rows, headers):
    """Columns padded to their widest cell; on a terminal (or with COLUMNS set) the widest columns are cut with an
    ellipsis until a row fits the width: a line never wraps. Piped output keeps every cell whole."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    limit = _columns()
    if limit:
        floor = [max(len(h), 8) for h in headers]
        while sum(widths) + 2 * (len(widths) - 1) > limit:
            i = max(range(len(widths)), key=lambda j: widths[j] - floor[j])
            if widths[i] <= floor[i]:
                break
            widths[i] = max(floor[i], widths[i] - (sum(widths) + 2 * (len(widths) - 1) - limit))
        rows = [[_cut(c, w) for c, w in zip(r, widths)] for r in rows]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _columns() -> int | None:
    """The terminal's width for stdout, or None when stdout is a pipe or a file (unless COLUMNS is set)."""
    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return max(shutil.get_terminal_size().columns, 40)
    return None


def _ellipsis(stream) -> str:
    try:
        "\u2026".encode(getattr(stream, "encoding", None) or "ascii")
        return "\u2026"
    except (UnicodeEncodeError, LookupError):
        return "..."


def _cut(text, width):
    """``layer4.1.downsample.0.weight`` in 16 columns: ``layer4.…0.weight`` (both ends kept: prefix and leaf)."""
    if len(text) <= width:
        return text
    mark = _ellipsis(sys.stdout)
    keep = max(width - len(mark), 1)
    head = (keep + 1) // 2
    return text[:head] + mark + text[len(text) - (keep - head):] if keep > head else text[:keep] + mark


def group_keys(names):
    """``layer1.0.bn1.{weight,bias}`` style groups, in order."""
    groups: dict = {}
    for n in names:
        module, _, leaf = n.rpartition(".")
        groups.setdefault(module, []).append(leaf)
    out = []
    for module, leaves in groups.items():
        inner = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        out.append(f"{module}.{inner}" if module else inner)
    return out


def printable(value) -> str:
    """A name or value from a file as one line of text: control characters (a newline too) shown escaped, an int
    past Python's 4,300-digit ``str`` limit shown by its size, also inside a tuple or list (``betas``)."""
    if type(value) in (tuple, list):
        inner = ", ".join(map(printable, value)) + ("," if type(value) is tuple and len(value) == 1 else "")
        return f"({inner})" if type(value) is tuple else f"[{inner}]"
    return escape_controls(key_text(value), keep="")


def escape_controls(text: str, keep: str = "\n") -> str:
    """``text`` with every character that is not printable (escape sequences, ``\\r``, bidi overrides, lone
    surrogates) shown as its Python escape, except those in ``keep``."""
    if text.isprintable() or "".join(c for c in text if c not in keep).isprintable():
        return text
    return "".join(c if c in keep or c.isprintable() else ascii(c)[1:-1] for c in text)


class Escaped:
    """A run's stdout or stderr: whatever a command writes is shown with :func:`escape_controls`, so no name from a
    file retitles, clears or rewrites the terminal, whichever command prints it. Line ends pass, and a ``\\r``
    that opens a write (the progress bar redrawing its line)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if isinstance(text, (bytes, bytearray)):  # click's own bytes (the shell completion script), never a name
            if not text:  # click's probe: answer as a text stream does, or it would wrap us in another
                raise TypeError("write() argument must be str, not bytes")
            return self._stream.write(bytes(text).decode(getattr(self._stream, "encoding", None) or "utf-8"))
        lead = "\r" if text.startswith("\r") else ""
        return self._stream.write(lead + escape_controls(text[len(lead):]))

    def __getattr__(self, name):
        if name == "buffer":  # click would write the bytes around us; it writes through ``write`` without one
            raise AttributeError(name)
        return getattr(self._stream, name)
