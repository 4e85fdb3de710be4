"""The ``ckconv`` command: parse, call the API, render the result. Errors become one line on stderr."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import click

from .errors import CkconvError
from .tree import json_safe, key_text

DEBUG = os.environ.get("CKCONV_DEBUG", "") not in ("", "0")
# This run's output settings: -q (-1) / -v (1), whether --json was asked for, bars still drawn on stderr.
_RUN: dict = {"verbosity": 0, "json": False, "bars": []}


class CkconvGroup(click.Group):
    def invoke(self, ctx):
        args = ctx.args[: ctx.args.index("--")] if "--" in ctx.args else ctx.args
        _RUN.update(verbosity=0, json="--json" in args, bars=[])
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # exit 2; under --json an object too
            if not _RUN["json"]:
                raise
            _end_bars()
            _json({"error": " ".join(exc.format_message().splitlines()), "type": "UsageError"})
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CkconvError as exc:
            if DEBUG:
                raise
            _fail(str(exc), type(exc).__name__)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written")
        except BrokenPipeError:
            _reader_went_away()
        except MemoryError:
            _fail("out of memory; nothing was written (try a machine with more memory)")
        except RecursionError:
            if DEBUG:
                raise
            _fail("the input nests too deeply to process; the file is malformed or hostile")
        except OSError as exc:
            if DEBUG:
                raise
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            _fail(f"cannot access{where}: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - last line of defence: no tracebacks for users
            if DEBUG:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with CKCONV_DEBUG=1 and report it)")


def _reader_went_away():
    """``ckconv inspect big.pth | head``: the reader closed the pipe; stop quietly, as cat and ls do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit must not fail again
    except OSError:
        pass
    sys.exit(0)


def _fail(message, kind="Error"):
    """One ``Error:`` line on stderr, exit 1; under ``--json`` the error is also an object on stdout."""
    _end_bars()  # a bar on stderr ends its line first: the error starts a line of its own
    text = " ".join(str(message).splitlines())  # one line, whatever a path or a file's names contain
    if _RUN["json"]:
        extra = click.get_current_context(silent=True)
        extra = extra.meta.get("ckconv.json_extra", {}) if extra is not None else {}
        _json({"error": text, "type": kind, **extra})
    click.echo(f"Error: {text}", err=True)
    sys.exit(1)


def _end_bars():
    for bar in _RUN["bars"]:
        bar.close()
    _RUN["bars"] = []


def warn(message):
    """``warning: ...`` on stderr (silenced by -q): something the user may not have meant, never data."""
    if _RUN["verbosity"] >= 0:
        click.echo(f"warning: {' '.join(str(message).splitlines())}", err=True)


def verbose() -> bool:
    return _RUN["verbosity"] > 0


def _json(obj):
    click.echo(json.dumps(json_safe(obj), indent=2, default=str))


def _table(rows, headers):
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


@click.group(cls=CkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckconv")
@click.option("-q", "--quiet", is_flag=True, help="Only data and errors: no warnings, notes or progress bar.")
@click.option("-v", "--verbose", "loud", is_flag=True,
              help="More detail: the keys behind a warning, every unknown global, skipped files.")
def cli(quiet, loud):
    """Convert, inspect and compare PyTorch checkpoints safely and losslessly.

    Data goes to stdout; warnings (`warning: ...`), the progress bar and errors to stderr. Shell completion:
    eval "$(_CKCONV_COMPLETE=bash_source ckconv)" (zsh_source, fish_source for other shells).
    """
    if quiet and loud:
        raise click.UsageError("-q and -v contradict each other; pass one")
    _RUN["verbosity"] = -1 if quiet else 1 if loud else 0


class Progress:
    """A progress bar on stderr, shown only on a TTY and only for conversions that take over a second.

    ``[#####      ]  45.0% 120/267 MB, 85 MB/s, ETA 0:02``, cut to the terminal's width. Its line is ended
    before anything else is written to stderr (an error, a warning), and on the final count when done.
    """

    def __init__(self, enabled, label=""):
        self.enabled = enabled and sys.stderr.isatty() and _RUN["verbosity"] >= 0
        self.label = label
        self.total = self.done = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def start(self, total):
        self.total = total

    def __call__(self, n):
        self.done += n
        now = time.monotonic()
        if not self.enabled or now - self.t0 < 1.0 or now - self.last < 0.1 or not self.total:
            return
        self.last = now
        self._draw(now)

    def _draw(self, now, final=False):
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * 30)
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        when = (f"in {_clock(elapsed)}" if final else
                f"ETA {_clock((self.total - self.done) / rate)}" if rate > 0 else "ETA ?")
        text = (f"{self.label}[{bar:<30}] {frac:6.1%} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB, "
                f"{rate / 1e6:,.0f} MB/s, {when}")
        sys.stderr.write("\r" + text[: shutil.get_terminal_size().columns - 1])
        sys.stderr.flush()
        if not self.drawn:
            self.drawn = True
            _RUN["bars"].append(self)

    def close(self):
        """End the bar's line (where one was drawn), so the next line on stderr starts at column 0."""
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False
            if self in _RUN["bars"]:
                _RUN["bars"].remove(self)

    def finish(self):
        if self.drawn:
            self._draw(time.monotonic(), final=True)  # the last update may have been throttled: the final count
        self.close()


def _clock(seconds) -> str:
    seconds = int(min(seconds, 359999))
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rest // 60:0{2 if h else 1}d}:{rest % 60:02d}"


# --dtype spellings -> the names the API takes (torch's own names and aliases, and the short ones).
CAST_SPELLINGS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                  "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _cast_name(ctx, param, value):
    return None if value is None else CAST_SPELLINGS[value.lower().removeprefix("torch.")]


def _dtype_option(*names, help):
    spellings = list(CAST_SPELLINGS) + [f"torch.{n}" for n in ("bfloat16", "float16", "half", "float32", "float")]
    return click.option(*names, type=click.Choice(spellings, case_sensitive=False), callback=_cast_name,
                        metavar="[bf16|fp16|fp32]", help=help + " Also bfloat16, float16/half, float32/float.")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="SRC... DST", type=click.Path(path_type=str))
@click.option("--to", "to", help="Output format (default: from DST's extension). See `ckconv plugins`.")
@click.option("--model-only", is_flag=True, help="Write only the model state_dict, as flat keys.")
@_dtype_option("--dtype", help="Cast the model's floating tensors (and EMA copies); optimizer state keeps its dtype.")
@_dtype_option("--dtype-optimizer",
               help="Cast the optimizer's floating state (moments) too; step counters are never cast.")
@click.option("--max-shard-size", help="Shard the output into a folder, e.g. 5GB (decimal) or 2GiB.")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--arch", help="Remap the model state_dict onto this architecture's names (resnet18, "
                             "torchvision:vgg16, auto). See `ckconv match`.")
@click.option("--arch-option", "arch_options", multiple=True, metavar="KEY=VALUE",
              help="Architecture builder option, a Python literal (num_classes=10). Repeatable.")
@click.option("--map", "map_file", type=click.Path(path_type=str),
              help="Use a mapping saved by `ckconv match --save-map` instead of matching.")
@click.option("--only", multiple=True, metavar="SELECTOR", help="Keep only this part, e.g. 'features[:10]'.")
@click.option("--drop", multiple=True, metavar="SELECTOR", help="Leave out this part, e.g. 'classifier[-1]'.")
@click.option("--rename", multiple=True, metavar="REGEX=REPL", help="Rename checkpoint keys first. Repeatable.")
@click.option("--section", help="Where the state_dict is inside a bundle (e.g. state_dict_ema).")
@click.option("--strict", is_flag=True, help="With --arch: refuse to write unless every target key is filled.")
@click.option("--optimizer", "optimizer", type=click.Choice(["remap", "drop"]), default="remap", show_default=True,
              help="Optimizer state: follow the remap (refused unless ckconv can prove which parameter each slot "
                   "is), or drop it and write the rest without it.")
@click.option("--keep-layout", is_flag=True,
              help="With --arch: keep the source's layout (Lightning, mmengine, ...) instead of writing "
                   "{'model', 'optimizer', ...}.")
@click.option("--freeze", multiple=True, metavar="SELECTOR",
              help="Record these parameters as frozen in the bundle, e.g. 'features[:10]' (with --arch; dotted "
                   "names without). Repeatable. ckconv.load_bundle restores the freeze.")
@click.option("--allow-global", "allow_globals", multiple=True, metavar="NAME",
              help="Let a .pth output name this global beyond ckconv's allowlist: a dotted name or 'prefix.*' "
                   "(mmengine.*). Only for files you trust. Repeatable.")
@click.option("--plain", is_flag=True,
              help="Write what torch.load(weights_only=True) loads: pickled modules become state_dicts, numpy "
                   "arrays tensors, records dicts, class references names. Every change is listed.")
def convert(paths, to, model_only, dtype, dtype_optimizer, max_shard_size, force, as_json, arch, arch_options,
            map_file, only, drop, rename, section, strict, optimizer, keep_layout, freeze, allow_globals, plain):
    """Convert SRC to DST, keeping everything (model, optimizer, scalars) unless told otherwise.

    With several SRC, DST is an existing folder and each goes to DST/<stem>.<ext>, as cp does (no file replaced
    without --force), one line per file; the first error stops the run and names the files not attempted.
    """
    from .api import convert as do_convert

    if len(paths) < 2:
        raise click.UsageError("missing DST: ckconv convert SRC... DST")
    *sources, dst = paths
    remap = {}
    if arch or map_file or only or drop or rename or section is not None:
        remap = dict(arch=arch, arch_options=list(arch_options), map=map_file, only=list(only), drop=list(drop),
                     rename=list(rename), section=section, strict=strict)
    options = dict(to=to, model_only=model_only, dtype=dtype, max_shard_size=max_shard_size, force=force,
                   freeze=list(freeze), distributed=True, allow_globals=list(allow_globals), optimizer=optimizer,
                   keep_layout=keep_layout, dtype_optimizer=dtype_optimizer, plain=plain, **remap)
    if len(sources) > 1:
        _convert_several(sources, dst, options, as_json)
        return
    progress = Progress(not as_json)
    result = do_convert(sources[0], dst, progress=progress, **options)
    progress.finish()
    from .formats.dcp import world_from_env  # under torchrun, only rank 0 reports

    if (world_from_env() or (0,))[0] != 0:
        return
    if as_json:
        _json(result.to_dict())
        return
    _report_conversion(result)


def _convert_several(sources, folder, options, as_json):
    """``convert a.pth b.pth DIR``: every name planned and checked first, then one conversion after another."""
    from .api import convert as do_convert

    _plan_several(sources, folder, options)
    results = []
    meta = click.get_current_context().meta
    for i, src in enumerate(sources):
        meta["ckconv.json_extra"] = {"results": [r.to_dict() for r in results], "failed": src,
                                     "not_attempted": sources[i + 1:]}
        progress = Progress(not as_json, label=f"{src} ")
        try:
            result = do_convert(src, folder, progress=progress, **options)
        except CkconvError as exc:
            rest = sources[i + 1:]
            text = str(exc) if src in str(exc) else f"{src}: {exc}"
            exc.args = (text + f" (stopped: {len(results)} of {len(sources)} converted"
                        + (f"; not attempted: {', '.join(rest)})" if rest else ")"),)
            raise
        except KeyboardInterrupt:
            _fail(f"interrupted while converting {src}; nothing of it was written ({len(results)} of "
                  f"{len(sources)} converted before it)")
        progress.finish()
        results.append(result)
        if not as_json:
            _report_conversion(result)
    meta.pop("ckconv.json_extra", None)
    if as_json:
        _json({"results": [r.to_dict() for r in results]})


def _plan_several(sources, folder, options):
    """Before any work: DST is a folder, every source exists, no two outputs share a name, and no file would be
    replaced without --force (cp semantics: DST/<stem>.<ext>)."""
    from .api import output_target
    from .errors import NotACheckpoint, OutputExists, UsageError
    from .model import Checkpoint

    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder: with several sources DST must be an existing folder, as with cp")
    planned: dict = {}
    for src in sources:
        if not os.path.exists(src):
            raise NotACheckpoint(f"{src}: no such file or folder")
        target = output_target(Checkpoint(root={}, path=src), folder, format=options["to"],
                               max_shard_size=options["max_shard_size"])
        if target.folder:
            raise UsageError(f"a {target.format.name} output is a folder of its own; with several sources use a "
                             "single-file format, or convert each source into its own folder")
        key = os.path.normcase(os.path.abspath(target.path))
        if key in planned:
            raise UsageError(f"{planned[key]} and {src} would both be written to {target.path}; convert them "
                             "one at a time")
        planned[key] = src
        if not options["force"] and os.path.lexists(target.path):
            raise OutputExists(f"{target.path} already exists; pass --force to overwrite it")


# Notes that call for attention (a part of the model not written, a freeze lost, a head that does not fit):
# shown as warnings on stderr; other notes describe the output, on stdout.
WARNING_NOTES = ("skipped keys with other shapes", "the recorded freeze follows the renames", "the checkpoint's ")


def _is_warning(note) -> bool:
    return str(note).startswith(WARNING_NOTES)


def _report_conversion(result):
    from .reports.inspection import size_text

    click.echo(f"Converted {result.source} ({result.source_format}) -> {result.destination} "
               f"({result.destination_format}): {result.tensors} tensors, {size_text(result.bytes)}")
    for message in _match_warnings(result.match):
        warn(message)
    for note in result.notes:
        if _is_warning(note):
            warn(note)
        elif _RUN["verbosity"] >= 0:
            click.echo(f"  note: {note}")
    for change in getattr(result, "changes", ()):
        click.echo(f"  plain: {printable(change)}")


def _match_warnings(match) -> list:
    """``coverage 80.0%``, ``198 checkpoint keys left out``: what --arch did not fill or did not use."""
    if not match or match["arch"] in ("<none>", "<map>", "", None):
        return []
    arch, out = match["arch"], []

    def keys(names):
        groups = _group_keys(names)
        if verbose() or len(groups) <= 3:
            return ": " + ", ".join(map(printable, groups))
        return ": " + ", ".join(map(printable, groups[:3])) + f", ... (-v lists all {len(names)})"

    unfilled = [e["name"] for e in match["missing"]] + [e["target"] for e in match["mismatched"]]
    if unfilled:
        out.append(f"coverage {match['coverage']:.1%}: {len(unfilled)} of {arch}'s {match['target_count']} keys "
                   f"not filled ({len(match['missing'])} missing, {len(match['mismatched'])} with other shapes)"
                   + keys(unfilled))
    if match["unexpected"]:
        out.append(f"{len(match['unexpected'])} checkpoint keys left out (no place in {arch})"
                   + keys([e["name"] for e in match["unexpected"]]))
    return out


@cli.command()
@click.argument("ckpt", required=False, type=click.Path(path_type=str))
@click.option("--arch", required=True, help="resnet18, torchvision:resnet18, or auto (auto:PATTERN,... limits the "
                                            "candidates, e.g. 'auto:resnet*,vgg*').")
@click.option("--arch-option", "arch_options", multiple=True, metavar="KEY=VALUE",
              help="Architecture builder option, a Python literal (num_classes=10). Repeatable.")
@click.option("--rename", multiple=True, metavar="REGEX=REPL",
              help="Rename checkpoint keys before matching (Python re.sub). Repeatable.")
@click.option("--select", "selectors", multiple=True, metavar="SELECTOR",
              help="Only this part of the architecture: 'features[24:]', 'classifier[-1]', layer4.")
@click.option("--section", help="Where the state_dict is inside a bundle (e.g. state_dict_ema).")
@click.option("--no-structural", is_flag=True, help="Do not align leftover layers by module order and shape.")
@click.option("--save-map", type=click.Path(path_type=str), help="Write the mapping as JSON, for `convert --map`.")
@click.option("--strict", is_flag=True, help="Exit 1 unless every target key is filled.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or the spec) as JSON.")
def match(ckpt, arch, arch_options, rename, selectors, section, no_structural, save_map, strict, as_json):
    """Match CKPT's keys onto an architecture and report how each key was found.

    Without CKPT, print the architecture's state_dict spec (with --select, that part of its module tree).
    """
    if ckpt is None:
        _show_spec(arch, arch_options, selectors, as_json)
        return
    from .matching.engine import match as do_match

    progress = _RankingProgress() if sys.stderr.isatty() and not as_json and _RUN["verbosity"] >= 0 else None
    report = do_match(ckpt, arch, arch_options=list(arch_options), rename=list(rename), section=section,
                      only=list(selectors), structural=not no_structural, progress=progress)
    if progress is not None:
        progress.finish()
    if save_map:
        from .matching.remap import save_map as write_map

        write_map(report, save_map)
    if as_json:
        _json(report.to_dict())
    else:
        _show_report(report)
        if save_map:
            click.echo(f"wrote the mapping to {save_map}")
    if strict:
        report.check_strict()


class _RankingProgress:
    """``--arch auto`` on a terminal: which architecture is being scored (the first run builds every spec)."""

    def __init__(self):
        self.width = 0

    def __call__(self, i, n, name):
        text = f"ranking architectures {i + 1}/{n}: {name}"[: shutil.get_terminal_size().columns - 1]
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        if not self.width:
            _RUN["bars"].append(self)
        self.width = max(self.width, len(text))

    def close(self):
        if self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")  # erased: what follows starts at column 0
            sys.stderr.flush()
            self.width = 0
            if self in _RUN["bars"]:
                _RUN["bars"].remove(self)

    finish = close


def _show_spec(arch, arch_options, selectors, as_json):
    from . import architectures
    from .errors import UsageError

    if arch == "auto" or arch.startswith("auto:"):
        raise UsageError("--arch auto needs a checkpoint to rank architectures against")
    spec = architectures.spec(arch, list(arch_options))
    tensors = spec.tensors
    modules = []
    if selectors:
        from .matching.selectors import select, under

        model = architectures.build(spec.arch, list(arch_options))
        for sel in selectors:
            modules.append((sel, select(model, sel)))
        names = [q for _, picked in modules for q, _ in picked]
        tensors = [t for t in tensors if under(t.name, names)]
    if as_json:
        out = spec.to_dict()
        out["tensors"] = [t.to_dict() for t in tensors]
        if modules:
            out["selected"] = {sel: [q for q, _ in picked] for sel, picked in modules}
        _json(out)
        return
    for sel, picked in modules:
        click.echo(f"{spec.arch} {sel}:")
        click.echo(_module_repr(sel, picked))
        click.echo()
    click.echo(_table([(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.kind) for t in tensors],
                      ["name", "shape", "dtype", "kind"]))
    params = [t for t in tensors if t.kind == "parameter"]
    count = sum(_numel(t.shape) for t in params)
    click.echo(f"{len(tensors)} keys: {len(params)} parameters ({count:,} elements), "
               f"{len(tensors) - len(params)} buffers")


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _module_repr(sel, picked):
    """What ``print(model.<sel>)`` shows: one module, or a Sequential of the picked children (names kept)."""
    from collections import OrderedDict

    from torch import nn

    if len(picked) == 1 and not _is_slice(sel):
        return repr(picked[0][1])
    if all(isinstance(m, nn.Module) for _, m in picked):
        return repr(nn.Sequential(OrderedDict((q.rsplit(".", 1)[-1], m) for q, m in picked)))
    return "\n".join(f"{q}: {m!r}" for q, m in picked)


def _is_slice(sel):
    from .matching.selectors import parse

    steps = parse(sel)
    return bool(steps) and steps[-1][0] == "slice"


def _group_keys(names):
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


def _shape(shape):
    return "x".join(map(str, shape)) or "scalar"


def _show_report(report):
    if report.candidates:
        click.echo(_table([(c["arch"], f"{c['coverage']:.1%}", f"{c['used']:.1%}", f"{c['score']:.3f}")
                           for c in report.candidates], ["candidate", "fills", "uses", "score"]))
        click.echo()
    click.echo(f"{report.source} [{report.section}] -> {report.arch}")
    rows = []
    for m in report.matched:
        shape = _shape(m.shape) + (f" (from {_shape(m.reshape)})" if m.reshape is not None else "")
        how = m.how if m.confidence >= 1 else f"{m.how} ({m.confidence:.2f})"
        rows.append((m.target, "<-", m.source, how, shape))
    if rows:
        click.echo(_table(rows, ["target", "", "source", "how", "shape"]))
    for m in report.mismatched:
        click.echo(f"mismatched: {m['target']} {_shape(m['target_shape'])} <- {m['source']} "
                   f"{_shape(m['source_shape'])} ({m['how']}); skipped")
    for a in report.ambiguous:
        who = a.get("target") or a.get("source")
        click.echo(f"ambiguous ({a['step']}): {who}: {', '.join(map(str, a['candidates']))}; skipped")
    for label, items, key in (("filled with 0", report.filled, "target"), ("missing", report.missing, "name"),
                              ("unexpected", report.unexpected, "name")):
        if items:
            click.echo(f"{label} ({len(items)}):")
            for line in _group_keys([e[key] for e in items]):
                click.echo(f"  {line}")
    for note in report.notes:  # part of the report (its data), not warnings
        click.echo(f"note: {note}")
    click.echo(f"coverage: {report.coverage:.1%} of {report.target_count} target keys "
               f"({len(report.matched)} matched, {len(report.filled)} filled); "
               f"used {len(report.matched)} of {report.source_count} checkpoint keys; "
               f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
               f"{len(report.mismatched)} mismatched")


@cli.command()
@click.argument("src", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@click.option("--allow-global", "allow_globals", multiple=True, metavar="NAME",
              help="Count this global (dotted name or 'prefix.*') as safe. Repeatable.")
@click.option("--summary", is_flag=True,
              help="Sections, counts, dtypes and top-level groups of tensors instead of every tensor.")
def inspect(src, as_json, allow_globals, summary):
    """Show what SRC holds (reads headers and pickles, not tensor data; never runs code).

    Exit 1 when the file is dangerous (it would run code under torch.load) or unreadable; the report is printed
    first. Globals ckconv does not know (verdict unknown) are a warning on stderr.
    """
    from .reports.inspection import inspect as do_inspect
    from .reports.inspection import size_text
    from .pickling.policy import check_patterns

    info = do_inspect(src, allow_globals=check_patterns(allow_globals))
    try:
        if summary:
            _show_summary(info, as_json, size_text)
        else:
            _show_inspection(info, as_json, size_text)
    finally:
        if info.verdict == "unknown" and not as_json:
            unknown = info.globals["unknown"] if verbose() else info.globals["unknown"][:8]
            warn(f"{src}: names globals ckconv does not know to be benign: {printable(', '.join(unknown))}"
                 + (", ..." if len(unknown) < len(info.globals["unknown"]) else "")
                 + "; torch.load(weights_only=False) would call them")
    if info.verdict == "dangerous":
        sys.exit(1)


def printable(text) -> str:
    """Names from files, escaped for a terminal: control characters and escape sequences shown, not obeyed."""
    text = key_text(text)  # an int past Python's 4,300-digit str() limit is shown by its size
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _show_inspection(info, as_json, size_text, tensors=True):
    if as_json:
        _json(info.to_dict())
        return
    click.echo(f"{printable(info.path)}: {info.format} checkpoint")
    if info.dangerous:
        click.echo(f"DANGEROUS: loading this file with torch.load(weights_only=False) would call "
                   f"{printable(', '.join(info.dangerous))}; ckconv refuses to convert it")
    elif info.error:
        click.echo(f"DANGEROUS: {printable(info.error)}")
    click.echo(f"verdict: {info.verdict}" + (f" (unknown globals: {printable(', '.join(info.globals['unknown'][:8]))})"
                                             if info.globals.get("unknown") else ""))
    kinds = {m["path"]: m["class"] for m in info.modules}

    def label(key):  # "model (pickled module torchvision.models.resnet.ResNet)"
        key = printable(key)
        if key not in kinds:
            return key
        return ("" if key == "<root>" else f"{key}: ") + f"pickled module {kinds[key]}"

    click.echo("sections: " + ", ".join(f"{k} ({', '.join(map(label, v))})" for k, v in info.sections.items()))
    for m in info.modules:
        if m["error"]:
            click.echo(f"pickled module: {m['error']}")
    click.echo(f"tensors: {info.tensor_count}, {size_text(info.bytes)}; dtypes: "
               + ", ".join(f"{k} x{v}" for k, v in sorted(info.dtypes.items())))

    def owner(path):  # records inside a pickled module (its submodules...) are counted on the module's line
        return next((q for q in kinds if path != q and (q == "<root>" or path.startswith(q + "."))), None)

    inside: dict = {}
    glance = {v["path"]: v for v in info.values}
    for item in info.foreign:
        inside[owner(item["path"])] = inside.get(owner(item["path"]), 0) + 1
    for v in info.values:
        if owner(v["path"]) is None:
            what = "a numpy " + v["text"] if v["kind"] == "numpy" else f"a reference to {v['text']} (never imported)"
            click.echo(f"{v['kind']}: {printable(v['path'])} is {printable(what)}")
    for item in info.foreign:
        if owner(item["path"]) is None and item["path"] not in glance and not any(
                item["path"].startswith(p + ".") for p in glance):
            more = f"; {inside[item['path']]} more records inside it" if inside.get(item["path"]) else ""
            click.echo(f"foreign object: {item['path']} is a {item['class']} (kept as an inert record{more})")
    bundle = info.bundle or {}
    if bundle.get("layout") not in (None, "state_dict", "unknown"):
        click.echo(f"layout: {bundle['layout']}" + (f", model at {bundle['model']}" if bundle.get("model") else ""))
    for opt in bundle.get("optimizers", []):
        hp = opt["hyperparameters"][0] if opt["hyperparameters"] else {}
        shown = ", ".join(f"{k}={v}" for k, v in hp.items() if k in ("lr", "betas", "momentum", "weight_decay", "eps"))
        click.echo(f"optimizer: {opt['path']}: {opt['kind']} ({len(opt['hyperparameters'])} group(s); {shown}); "
                   f"{opt['with_state']}/{opt['params']} parameters have state; names from {opt['how']}"
                   + ("; covers a subset of the model's parameters" if opt["subset"] else ""))
    if info.tensors and tensors:
        click.echo(_table([(printable(t.name), t.dtype, "x".join(map(str, t.shape)) or "scalar") for t in info.tensors],
                          ["name", "dtype", "shape"]))
        if info.tensors_omitted:
            click.echo(f"... and {info.tensors_omitted} more tensor references (the first {len(info.tensors)} listed)")


def tensor_groups(info) -> list:
    """[{group, tensors, bytes, dtypes}] in file order: each top-level name, split one level further while a group
    holds a single branch or is a bundle's section (``model.layer1``, ``optimizer.state``, ``lm_head``)."""
    in_bundle = {k for keys in info.sections.values() for k in keys if k != "<root>"}
    parts = [t.name.split(".") for t in info.tensors]
    depth = [2 if len(p) > 2 and p[0] in in_bundle else 1 for p in parts]
    for _ in range(3):  # a single branch (``model.`` of a flat transformer) says nothing: look one level deeper
        branches: dict = {}
        for p, d in zip(parts, depth):
            branches.setdefault(tuple(p[:d]), []).append(tuple(p[: d + 1]) if len(p) > d + 1 else None)
        deeper = {g for g, b in branches.items() if len(b) > 1 and len(set(b)) == 1 and b[0] is not None}
        if not deeper:
            break
        depth = [d + 1 if tuple(p[:d]) in deeper else d for p, d in zip(parts, depth)]
    groups: dict = {}
    for t, p, d in zip(info.tensors, parts, depth):
        g = groups.setdefault(".".join(p[:d]), {"tensors": 0, "bytes": 0, "dtypes": {}})
        g["tensors"] += 1
        g["bytes"] += t.bytes
        g["dtypes"][t.dtype] = g["dtypes"].get(t.dtype, 0) + 1
    return [{"group": name, **g} for name, g in groups.items()]


def _show_summary(info, as_json, size_text):
    """``inspect --summary``: the header of an inspection, then one row per top-level group of tensors."""
    groups = tensor_groups(info)
    if as_json:
        out = info.to_dict()
        out.pop("tensors")
        out["groups"] = groups
        _json(out)
        return
    _show_inspection(info, False, size_text, tensors=False)
    if groups:
        click.echo(_table([(printable(g["group"]), g["tensors"], size_text(g["bytes"]),
                            ", ".join(f"{k} x{v}" for k, v in sorted(g["dtypes"].items()))) for g in groups],
                          ["group", "tensors", "size", "dtypes"]))


def _tolerance(ctx, param, value):
    if value is not None and value != value:
        raise click.BadParameter("must be a number, not nan")
    return value


@cli.command()
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--atol", type=click.FloatRange(min=0), callback=_tolerance,
              help="Absolute tolerance: tensors are equal when |a-b| <= atol + rtol*|b| everywhere, compared by "
                   "value across dtypes (default: bit for bit in the same dtype).")
@click.option("--rtol", type=click.FloatRange(min=0), callback=_tolerance,
              help="Relative tolerance (see --atol); the other one defaults to 0.")
@click.option("--strict", is_flag=True,
              help="Also fail on notes: container types, key order, _metadata, dtypes within tolerance, flags.")
@click.option("--tensors-only", is_flag=True, help="Compare only the tensors, by name; ignore every other value.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def diff(a, b, atol, rtol, strict, tensors_only, as_json):
    """Compare two checkpoints in any formats. Exit 0 when equal, 1 when not.

    Tensors and non-tensor values (epoch, lr) decide; how they are held (dict vs OrderedDict, _metadata) is
    reported as notes, which fail only with --strict.
    """
    from .reports.diffing import diff as do_diff
    from .reports.diffing import render

    report = do_diff(a, b, atol=atol, rtol=rtol, strict=strict, tensors_only=tensors_only)
    if as_json:
        _json(report.to_dict())
    else:
        click.echo(render(report))
    sys.exit(0 if report.equal else 1)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--allow-global", "allow_globals", multiple=True, metavar="NAME",
              help="Count this global (dotted name or 'prefix.*') as safe. Repeatable.")
@click.option("-v", "--verbose", "loud", is_flag=True, help="Also list files that were skipped (not checkpoints).")
def scan(paths, as_json, allow_globals, loud):
    """Check checkpoints for code and damage without writing anything: a CI gate.

    Files and folders (recursively; a huggingface_hub cache too). One line per checkpoint: SAFE, UNKNOWN (names
    globals ckconv does not know), DANGEROUS (would run code under torch.load) or BROKEN (fails a check convert
    runs: CRC, bounds, limits, sharded/DCP consistency). Exit 0 only when every checkpoint is safe.
    """
    from .reports.scanning import exit_code, scan_paths

    results = scan_paths(paths, allow_globals)
    if as_json:
        _json({"results": [r.to_dict() for r in results], "exit_code": exit_code(results)})
    else:
        for r in results:
            if r.verdict == "skipped" and not (loud or verbose()):
                continue
            detail = r.message if r.verdict != "safe" else f"{r.format}, {r.tensors} tensors"
            detail = detail[len(r.path) + 2:] if detail.startswith(f"{r.path}: ") else detail
            click.echo(f"{r.verdict.upper():<9} {printable(r.path)}: {printable(detail)}")
        counts = {v: sum(r.verdict == v for r in results) for v in ("safe", "unknown", "dangerous", "broken")}
        if _RUN["verbosity"] >= 0:
            click.echo(f"scanned {sum(counts.values())} checkpoints: "
                       + ", ".join(f"{n} {v}" for v, n in counts.items()), err=True)
    sys.exit(exit_code(results))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the plugin list as JSON.")
def plugins(as_json):
    """List plugins, their versions and what each registers."""
    from .plugins import host

    h = host()
    rows = [{"name": p.name, "version": p.version, "builtin": p.builtin, **p.registers} for p in h.plugins.values()]
    problems = [{"plugin": n, "problem": m} for n, m in h.problems]
    if as_json:
        _json({"plugins": rows, "problems": problems})
        return
    click.echo(_table([(r["name"], r["version"], "built-in" if r["builtin"] else "third-party",
                        "; ".join(f"{k}: {', '.join(r[k])}" for k in ("formats", "architectures", "key_rules") if r[k]))
                       for r in rows], ["plugin", "version", "kind", "registers"]))
    for p in problems:
        warn(f"problem: {p['plugin']}: {p['problem']}")


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: staged outputs are removed, one line on stderr, exit 1


def main():
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # `kill`, a closed terminal, a scheduler's timeout
        signal.signal(sig, _terminated)
    try:
        cli(prog_name="ckconv")
    except BrokenPipeError:
        _reader_went_away()
