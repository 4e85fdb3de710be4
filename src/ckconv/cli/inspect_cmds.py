"""The read-only commands: ``ckconv inspect`` (one file), ``ckconv scan`` (a CI gate over files and folders) and
``ckconv diff`` (two checkpoints)."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from operator import attrgetter

import click

from ..pickling.verdicts import Verdict, unknown_globals
from .common import RUN, echo_json, json_text, printable, table, trouble_exits, verbose, warn, write_report


@click.command()
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

    \b
    Examples:
      ckconv inspect model.pth
      ckconv inspect model.safetensors --summary
      ckconv inspect run.ckpt --json --allow-global 'mmengine.*'
    """
    from ..reports.inspection import inspect as do_inspect
    from ..reports.inspection import size_text
    from ..pickling.policy import check_patterns
    from ..tree import gc_paused

    info = do_inspect(src, allow_globals=check_patterns(allow_globals))
    try:
        with gc_paused():  # a dict per row, no cycles: collection passes would rescan them all
            if summary:
                _show_summary(info, as_json, size_text)
            else:
                _show_inspection(info, as_json, size_text)
    finally:
        if info.verdict == Verdict.UNKNOWN and not as_json:
            warn(f"{src}: " + printable(unknown_globals(info.globals[Verdict.UNKNOWN], None if verbose() else 8)))
    if info.verdict == Verdict.DANGEROUS:
        sys.exit(1)


def _show_inspection(info, as_json, size_text, tensors=True):
    if as_json:
        echo_json(info.to_dict())
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
        shown = ", ".join(f"{k}={printable(v)}" for k, v in hp.items()
                          if k in ("lr", "betas", "momentum", "weight_decay", "eps"))
        click.echo(f"optimizer: {opt['path']}: {opt['kind']} ({len(opt['hyperparameters'])} group(s); {shown}); "
                   f"{opt['with_state']}/{opt['params']} parameters have state; names from {opt['how']}"
                   + ("; covers a subset of the model's parameters" if opt["subset"] else ""))
    if info.tensors and tensors:
        click.echo(table([(printable(t.name), t.dtype, "x".join(map(str, t.shape)) or "scalar") for t in info.tensors],
                         ["name", "dtype", "shape"]))
        if info.tensors_omitted:
            click.echo(f"... and {info.tensors_omitted} more tensor references (the first {len(info.tensors)} listed)")


def tensor_groups(info) -> list:
    """[{group, tensors, bytes, dtypes}] in file order: each top-level name, split one level further while a group
    holds a single branch or is a bundle's section (``model.layer1``, ``optimizer.state``, ``lm_head``)."""
    in_bundle = {k for keys in info.sections.values() for k in keys if k != "<root>"}
    groups: dict = {}  # dotted prefix -> its rows, in the order of each group's first row
    for t in info.tensors:
        p = t.name.split(".", 2)
        groups.setdefault(p[0] + "." + p[1] if len(p) > 2 and p[0] in in_bundle else p[0], []).append(t)
    out = []
    for name, rows in groups.items():
        for _ in range(3):  # a single branch (``model.`` of a flat transformer) says nothing: look one level deeper
            branch = _single_branch(name, rows)
            if branch is None:
                break
            name = branch
        out.append({"group": name, "tensors": len(rows), "bytes": sum(map(attrgetter("bytes"), rows)),
                    "dtypes": dict(Counter(map(attrgetter("dtype"), rows)))})
    return out


def _single_branch(name, rows):
    """``name.part`` when the rows under ``name`` (two or more) all continue with the same ``part`` and go at least
    one level below it; else None."""
    if len(rows) < 2:
        return None
    start, part = len(name) + 1, None
    for t in rows:
        end = t.name.find(".", start)
        if end < 0:
            return None
        if part is None:
            part = t.name[start:end]
        elif t.name[start:end] != part:
            return None
    return f"{name}.{part}"


def _show_summary(info, as_json, size_text):
    """``inspect --summary``: the header of an inspection, then one row per top-level group of tensors."""
    groups = tensor_groups(info)
    if as_json:
        out = replace(info, tensors=[]).to_dict()
        out.pop("tensors")
        out["groups"] = groups
        echo_json(out)
        return
    _show_inspection(info, False, size_text, tensors=False)
    if groups:
        click.echo(table([(printable(g["group"]), g["tensors"], size_text(g["bytes"]),
                           ", ".join(f"{k} x{v}" for k, v in sorted(g["dtypes"].items()))) for g in groups],
                         ["group", "tensors", "size", "dtypes"]))


def _tolerance(ctx, param, value):
    if value is not None and value != value:
        raise click.BadParameter("must be a number, not nan")
    return value


@click.command()
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
    """Compare two checkpoints in any formats. Exit 0 when equal, 1 when not, 2 on trouble (as diff and cmp).

    Tensors and non-tensor values (epoch, lr) decide; how they are held (dict vs OrderedDict, _metadata) is
    reported as notes, which fail only with --strict.

    \b
    Examples:
      ckconv diff model.pth model.safetensors
      ckconv diff fp32.pth bf16.safetensors --rtol 0.004
      ckconv diff a.pth b.pth --tensors-only --json
    """
    from ..reports.diffing import diff as do_diff
    from ..reports.diffing import render

    trouble_exits(2)  # as diff and cmp: 0 same, 1 different, 2 trouble (a missing or unreadable file)
    report = do_diff(a, b, atol=atol, rtol=rtol, strict=strict, tensors_only=tensors_only)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(render(report))
    sys.exit(0 if report.equal else 1)


def _format(ctx, param, value):
    as_json = ctx.params.get("as_json")
    if as_json and value not in (None, "json"):
        raise click.BadParameter(f"--json asks for json, --format for {value}; pass one", ctx, param)
    return "json" if as_json else value or "text"


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str, exists=True))
@click.option("--json", "as_json", is_flag=True, is_eager=True, help="Print the results as JSON (--format json).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), callback=_format,
              help="text (default), json, or sarif (SARIF 2.1.0, for GitHub code scanning and security dashboards).")
@click.option("-o", "--output", type=click.Path(path_type=str, dir_okay=False),
              help="Write the report to this file instead of stdout (replaced if it exists).")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Scan only files matching this pattern ('*.safetensors'; * crosses /). Repeatable.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Skip files and folders matching this pattern ('tests/fixtures/*'). Repeatable.")
@click.option("--allow-global", "allow_globals", multiple=True, metavar="NAME",
              help="Count this global (dotted name or 'prefix.*') as safe. Repeatable.")
def scan(paths, as_json, fmt, output, include, exclude, allow_globals):
    """Check checkpoints for code and damage without writing anything: a CI gate.

    Files and folders (recursively). One line per checkpoint: SAFE, UNKNOWN (names globals ckconv does not
    know), DANGEROUS (would run code under torch.load) or BROKEN (fails a check convert runs: CRC, bounds,
    limits, sharded/DCP consistency). Files in a huggingface_hub cache are named org/name@revision:file.
    Exit 0 only when every checkpoint is safe, 1 otherwise, 2 on a usage error.

    \b
    Examples:
      ckconv scan downloads/
      ckconv scan ~/.cache/huggingface/hub --include '*.bin'
      ckconv scan . --format sarif -o ckconv.sarif --exclude 'tests/*'
    """
    from .. import __version__
    from ..reports.scan_report import Selection, display_name, scan_json, scan_sarif, summary
    from ..reports.scanning import exit_code, scan_paths

    select = Selection(paths, include, exclude) if include or exclude else None
    results = scan_paths(paths, allow_globals, select=select)
    code = exit_code(results)
    if fmt == "json":
        text = json_text(scan_json(results, code, __version__))
    elif fmt == "sarif":
        text = json_text(scan_sarif(results, paths, __version__))
    else:
        lines = []
        for r in results:
            if r.verdict == Verdict.SKIPPED and not verbose():
                continue
            detail = r.message if r.verdict != Verdict.SAFE else f"{r.format}, {r.tensors} tensors"
            detail = detail[len(r.path) + 2:] if detail.startswith(f"{r.path}: ") else detail
            lines.append(f"{r.verdict.upper():<9} {printable(display_name(r.path))}: {printable(detail)}")
        text = "\n".join(lines)
    write_report(text, output, inputs=[*paths, *(r.path for r in results)])
    if fmt == "text" and RUN["verbosity"] >= 0:
        counts = summary(results)
        click.echo(f"scanned {counts['checkpoints']} checkpoints: "
                   + ", ".join(f"{counts[v]} {v}" for v in ("safe", "unknown", "code", "dangerous", "broken")),
                   err=True)
    sys.exit(code)
