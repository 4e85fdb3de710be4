"""The ``ckconv`` command: parse, call the API, render the result. Errors become one line on stderr."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from .errors import CkconvError

DEBUG = os.environ.get("CKCONV_DEBUG", "") not in ("", "0")


class CkconvGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except CkconvError as exc:
            if DEBUG:
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written")
        except MemoryError:
            _fail("out of memory; nothing was written (try a machine with more memory)")
        except Exception as exc:  # noqa: BLE001 - last line of defence: no tracebacks for users
            if DEBUG:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with CKCONV_DEBUG=1 and report it)")


def _fail(message):
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _json(obj):
    click.echo(json.dumps(obj, indent=2, default=str))


def _table(rows, headers):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


@click.group(cls=CkconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckconv")
def cli():
    """Convert, inspect and compare PyTorch checkpoints safely and losslessly."""


class Progress:
    """A progress bar on stderr, shown only on a TTY and only for conversions that take over a second."""

    def __init__(self, enabled):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = self.done = 0
        self.t0 = time.monotonic()
        self.last = 0.0

    def start(self, total):
        self.total = total

    def __call__(self, n):
        self.done += n
        now = time.monotonic()
        if not self.enabled or now - self.t0 < 1.0 or now - self.last < 0.1 or not self.total:
            return
        self.last = now
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {frac:6.1%} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB")
        sys.stderr.flush()

    def finish(self):
        if self.enabled and self.last:
            sys.stderr.write("\n")


@cli.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--to", "to", help="Output format (default: from DST's extension). See `ckconv plugins`.")
@click.option("--model-only", is_flag=True, help="Write only the model state_dict, as flat keys.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Cast floating tensors (only).")
@click.option("--max-shard-size", help="Shard the output into a folder, e.g. 5GB (decimal) or 2GiB.")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src, dst, to, model_only, dtype, max_shard_size, force, as_json):
    """Convert SRC to DST, keeping everything (model, optimizer, scalars) unless told otherwise."""
    from .api import convert as do_convert
    from .inspection import size_text

    progress = Progress(not as_json)
    result = do_convert(src, dst, to=to, model_only=model_only, dtype=dtype, max_shard_size=max_shard_size,
                        force=force, progress=progress)
    progress.finish()
    if as_json:
        _json(result.to_dict())
        return
    click.echo(f"Converted {result.source} ({result.source_format}) -> {result.destination} "
               f"({result.destination_format}): {result.tensors} tensors, {size_text(result.bytes)}")
    for note in result.notes:
        click.echo(f"  note: {note}")


@cli.command()
@click.argument("src", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
def inspect(src, as_json):
    """Show what SRC holds (reads headers and pickles, not tensor data; never runs code)."""
    from .inspection import inspect as do_inspect
    from .inspection import size_text

    info = do_inspect(src)
    if as_json:
        _json(info.to_dict())
        return
    click.echo(f"{info.path}: {info.format} checkpoint")
    if info.dangerous:
        click.echo(f"DANGEROUS: loading this file with torch.load(weights_only=False) would call "
                   f"{', '.join(info.dangerous)}; ckconv refuses to convert it")
    click.echo("sections: " + ", ".join(f"{k} ({', '.join(map(str, v))})" for k, v in info.sections.items()))
    click.echo(f"tensors: {info.tensor_count}, {size_text(info.bytes)}; dtypes: "
               + ", ".join(f"{k} x{v}" for k, v in sorted(info.dtypes.items())))
    for item in info.foreign:
        click.echo(f"foreign object: {item['path']} is a {item['class']} (kept as an inert record)")
    bundle = info.bundle or {}
    if bundle.get("layout") not in (None, "state_dict", "unknown"):
        click.echo(f"layout: {bundle['layout']}" + (f", model at {bundle['model']}" if bundle.get("model") else ""))
    for opt in bundle.get("optimizers", []):
        hp = opt["hyperparameters"][0] if opt["hyperparameters"] else {}
        shown = ", ".join(f"{k}={v}" for k, v in hp.items() if k in ("lr", "betas", "momentum", "weight_decay", "eps"))
        click.echo(f"optimizer: {opt['path']}: {opt['kind']} ({len(opt['hyperparameters'])} group(s); {shown}); "
                   f"{opt['with_state']}/{opt['params']} parameters have state; names from {opt['how']}"
                   + ("; covers a subset of the model's parameters" if opt["subset"] else ""))
    if info.tensors:
        click.echo(_table([(t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar") for t in info.tensors],
                          ["name", "dtype", "shape"]))


@cli.command()
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def diff(a, b, as_json):
    """Compare two checkpoints in any formats. Exit 0 when equal, 1 when not."""
    from .diffing import diff as do_diff

    report = do_diff(a, b)
    if as_json:
        _json(report.to_dict())
    else:
        for k in report.only_in_a:
            click.echo(f"only in A: {k}")
        for k in report.only_in_b:
            click.echo(f"only in B: {k}")
        for d in report.tensors_differ:
            if d.max_abs_diff is None:
                click.echo(f"differs: {d.name}: {d.dtype} {d.shape} vs {d.other_dtype} {d.other_shape}")
            else:
                click.echo(f"differs: {d.name}: max abs diff {d.max_abs_diff:g}")
        for v in report.values_differ:
            click.echo(f"differs: {v['name']}: {v['a']} vs {v['b']}")
        click.echo(("equal" if report.equal else "different")
                   + f" ({report.tensors_compared} tensors, {report.values_compared} values compared)")
    sys.exit(0 if report.equal else 1)


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
        click.echo(f"problem: {p['plugin']}: {p['problem']}", err=True)


def main():
    cli(prog_name="ckconv")
