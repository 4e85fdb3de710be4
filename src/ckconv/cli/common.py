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
# This run's output settings: -q (-1) / -v (1) and where they were given, whether --json was asked for, bars still
# drawn on stderr, the signal that interrupted the run.
RUN: dict = {"verbosity": 0, "levels": set(), "json": False, "args": [], "bars": [], "signal": None}

# Exit codes, as diff and cmp have them: 0 yes, 1 no (or a failed command), 2 trouble (usage errors, and for
# commands that answer a question, like diff, any error), 128 + signal number when interrupted.
EXIT_NO, EXIT_TROUBLE, EXIT_INTERRUPTED = 1, 2, 128 + 2


def _set_level(ctx, param, value):
    """-q/-v before or after the command (``ckconv -q convert ...`` or ``ckconv convert ... -q``)."""
    if value:
        RUN["levels"].add(param.name)
        if len(RUN["levels"]) > 1:
            raise click.UsageError("-q and -v contradict each other; pass one", ctx)
        RUN["verbosity"] = -1 if param.name == "quiet" else 1


def verbosity_options(command):
    """The -q/--quiet and -v/--verbose flags, for the group and every command."""
    command = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_level,
                           help="More detail: the keys behind a warning, every unknown global, skipped files.")(command)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_level,
                        help="Only data and errors: no warnings, notes or progress bar.")(command)


def trouble_exits(code):
    """Set the exit code of this command's errors (``diff``: 2, as for diff and cmp; otherwise 1)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().meta["ckconv.trouble"] = code


class CkconvGroup(click.Group):
    """The group every command runs under: resets this run's settings, and turns whatever a command raises into one
    line on stderr (and an object under ``--json``) with exit 1 (2 for a usage error or a command's trouble, 128 +
    the signal when interrupted); never a traceback. All it prints goes through :class:`Escaped` streams: a name from
    a file cannot drive the terminal, in any command."""

    def main(self, *args, **kwargs):
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Escaped(sys.stdout), Escaped(sys.stderr)
        try:
            return super().main(*args, **kwargs)
        finally:
            sys.stdout, sys.stderr = streams

    def make_context(self, info_name, args, parent=None, **extra):
        RUN.update(verbosity=0, levels=set(), json=False, bars=[], signal=None)  # before -q/-v are parsed
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        given = list(ctx.args)  # the command's arguments (its name aside)
        args = given[: given.index("--")] if "--" in given else given
        RUN.update(json="--json" in args or _json_format(args), args=args)
        try:
            with warnings.catch_warnings():
                _warnings_as_lines()
                return super().invoke(ctx)
        except click.UsageError as exc:  # exit 2; under --json an object too
            if not RUN["json"]:
                raise
            end_bars()
            echo_json({"error": " ".join(exc.format_message().splitlines()), "type": "UsageError"})
            sys.exit(EXIT_TROUBLE)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CkconvError as exc:
            if DEBUG:
                raise
            fail(str(exc), type(exc).__name__, code=None if exc.exit_code == EXIT_NO else exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", "Interrupted", code=interrupted_code())
        except BrokenPipeError:
            reader_went_away()
        except ModuleNotFoundError as exc:
            if DEBUG or (exc.name or "").partition(".")[0] not in TORCH_EXTRA:
                raise
            fail(needs_torch(ctx), "MissingExtra", code=EXIT_TROUBLE)
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


# What `pip install 'ckconv[torch]'` adds; the convert options that need it, named in the message when given.
TORCH_EXTRA = ("torch", "torchvision")
TORCH_OPTIONS = ("--arch", "--map", "--only", "--drop", "--freeze", "--dtype", "--dtype-optimizer", "--to")


def needs_torch(ctx) -> str:
    """``ckconv convert --dtype needs torch, which is not installed: pip install 'ckconv[torch]'``."""
    command = ctx.invoked_subcommand or ""
    given = [o for o in TORCH_OPTIONS if command == "convert" and any(a == o or a.startswith(o + "=")
                                                                     for a in RUN.get("args", ()))]
    what = " ".join(["ckconv", command, *given[:1]]).strip()
    return f"{what} needs torch, which is not installed: pip install 'ckconv[torch]'"


def reader_went_away():
    """``ckconv inspect big.pth | head``: the reader closed the pipe; stop quietly, as cat and ls do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit must not fail again
    except OSError:
        pass
    sys.exit(0)


def _json_format(args) -> bool:
    """``--format json``/``--format=json`` asks for JSON as ``--json`` does (``scan``)."""
    return any(a in ("--format=json", "--format=sarif") or (a == "--format" and nxt in ("json", "sarif"))
               for a, nxt in zip(args, args[1:] + [""]))


def interrupted_code() -> int:
    """128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + RUN["signal"] if RUN["signal"] else EXIT_INTERRUPTED


def fail(message, kind="Error", code=None):
    """One ``Error:`` line on stderr and exit 1 (2 for a usage error or under ``diff``, ``code`` when given); under
    ``--json`` the error is also an object on stdout."""
    end_bars()  # a bar on stderr ends its line first: the error starts a line of its own
    text = " ".join(str(message).splitlines())  # one line, whatever a path or a file's names contain
    if RUN["json"]:
        extra = click.get_current_context(silent=True)
        extra = extra.meta.get("ckconv.json_extra", {}) if extra is not None else {}
        echo_json({"error": text, "type": kind, **extra})
    click.echo(f"Error: {text}", err=True)
    if code is None:
        root = click.get_current_context(silent=True)
        code = EXIT_TROUBLE if kind == "UsageError" else (
            root.find_root().meta.get("ckconv.trouble", EXIT_NO) if root is not None else EXIT_NO)
    sys.exit(code)


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
    click.echo(json_text(obj))


def json_text(obj) -> str:
    return json.dumps(json_safe(obj), indent=2, default=str)


def write_report(text, output=None, inputs=()):
    """A report to stdout, or with ``-o FILE`` to that file, written whole (staged beside it, then renamed over
    what was there; never over one of the ``inputs``)."""
    if output is None:
        if text:
            click.echo(text)
        return
    from ..storage.atomic import identities, staged_file

    with staged_file(output, force=True, protect=identities(inputs)) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text + "\n" if text else "")


def table(rows, headers):
    """Columns padded to their widest cell; on a terminal (or with COLUMNS set) the columns too wide to fit share
    the room fairly (:func:`fit_widths`) and their cells are cut in the middle, so both ends of a name stay
    readable. Piped output keeps every cell whole."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    limit = _columns()
    if limit:
        widths = fit_widths(widths, [max(len(h), 8) for h in headers], limit - 2 * (len(widths) - 1))
        rows = [[_cut(c, w) for c, w in zip(r, widths)] for r in rows]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def fit_widths(widths, floors, room) -> list:
    """Column widths that add up to at most ``room``, by water-filling: every column is capped at one level, the
    highest that fits, so narrow columns stay whole and the wide ones end up equally wide (within one). No column
    goes below its floor (or its own width, when narrower): when the floors alone are wider than the room, the
    line is as wide as the floors and wraps rather than losing more of every name."""
    if sum(widths) <= room:
        return list(widths)
    floors = [min(w, f) for w, f in zip(widths, floors)]

    def capped(level):
        return [max(f, min(w, level)) for w, f in zip(widths, floors)]

    low, high = 0, max(widths)  # sum(capped(low)) <= room < sum(capped(high))
    if sum(capped(low)) > room:
        return floors
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if sum(capped(mid)) <= room else (low, mid)
    out = capped(low)
    spare = room - sum(out)
    for i, w in enumerate(widths):  # what is left of the room: one more column each, left to right
        if spare and out[i] == low < w:
            out[i] += 1
            spare -= 1
    return out


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
