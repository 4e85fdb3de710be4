"""``ckconv match``: how a checkpoint's keys map onto an architecture, or the architecture's own spec."""

from __future__ import annotations

import math

import click

from .common import echo_json, group_keys, table
from .progress import Progress


@click.command()
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
@click.option("--ema", is_flag=True, help="Match the EMA weights (LitEma, timm, AveragedModel, mmengine).")
@click.option("--no-structural", is_flag=True, help="Do not align leftover layers by module order and shape.")
@click.option("--save-map", type=click.Path(path_type=str), help="Write the mapping as JSON, for `convert --map`.")
@click.option("--strict", is_flag=True, help="Exit 1 unless every target key is filled.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (or the spec) as JSON.")
def match(ckpt, arch, arch_options, rename, selectors, section, ema, no_structural, save_map, strict, as_json):
    """Match CKPT's keys onto an architecture and report how each key was found.

    Without CKPT, print the architecture's state_dict spec (with --select, that part of its module tree).

    \b
    Examples:
      ckconv match ckpt.pth --arch resnet50
      ckconv match ckpt.pth --arch auto --save-map map.json
      ckconv match --arch vgg16 --select 'classifier[-1]'
    """
    if ckpt is None:
        _show_spec(arch, arch_options, selectors, as_json)
        return
    from ..matching.engine import match as do_match

    progress = Progress(not as_json, "ranking architectures ", keep=False)  # --arch auto on a terminal
    report = do_match(ckpt, arch, arch_options=list(arch_options), rename=list(rename), section=section,
                      only=list(selectors), structural=not no_structural, progress=progress.step, ema=ema)
    progress.finish()
    if save_map:
        from ..matching.mapfile import save_map as write_map

        write_map(report, save_map)
    if as_json:
        echo_json(report.to_dict())
    else:
        _show_report(report)
        if save_map:
            click.echo(f"wrote the mapping to {save_map}")
    if strict:
        report.check_strict()


def _show_spec(arch, arch_options, selectors, as_json):
    from ..errors import UsageError
    from ..matching import targets

    if arch == "auto" or arch.startswith("auto:"):
        raise UsageError("--arch auto needs a checkpoint to rank architectures against")
    spec = targets.spec(arch, list(arch_options))
    tensors = spec.tensors
    modules = []
    if selectors:
        from ..matching.selectors import select, under

        model = targets.build(spec.arch, list(arch_options))
        for sel in selectors:
            modules.append((sel, select(model, sel)))
        names = [q for _, picked in modules for q, _ in picked]
        tensors = [t for t in tensors if under(t.name, names)]
    if as_json:
        out = spec.to_dict()
        out["tensors"] = [t.to_dict() for t in tensors]
        if modules:
            out["selected"] = {sel: [q for q, _ in picked] for sel, picked in modules}
        echo_json(out)
        return
    for sel, picked in modules:
        click.echo(f"{spec.arch} {sel}:")
        click.echo(_module_repr(sel, picked))
        click.echo()
    click.echo(table([(t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, t.kind) for t in tensors],
                     ["name", "shape", "dtype", "kind"]))
    params = [t for t in tensors if t.kind == "parameter"]
    count = sum(math.prod(t.shape) for t in params)
    click.echo(f"{len(tensors)} keys: {len(params)} parameters ({count:,} elements), "
               f"{len(tensors) - len(params)} buffers")


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
    from ..matching.selectors import parse

    steps = parse(sel)
    return bool(steps) and steps[-1][0] == "slice"


def _shape(shape):
    return "x".join(map(str, shape)) or "scalar"


def _show_report(report):
    if report.candidates:
        click.echo(table([(c.arch, f"{c.coverage:.1%}", f"{c.used:.1%}", f"{c.score:.3f}")
                          for c in report.candidates], ["candidate", "fills", "uses", "score"]))
        click.echo()
    click.echo(f"{report.source} [{report.section}] -> {report.arch}")
    rows = []
    for m in report.matched:
        shape = _shape(m.shape) + (f" (from {_shape(m.reshape)})" if m.reshape is not None else "")
        how = m.how if m.confidence >= 1 else f"{m.how} ({m.confidence:.2f})"
        rows.append((m.target, "<-", m.source, how, shape))
    if rows:
        click.echo(table(rows, ["target", "", "source", "how", "shape"]))
    for m in report.mismatched:
        click.echo(f"mismatched: {m.target} {_shape(m.target_shape)} <- {m.source} {_shape(m.source_shape)} "
                   f"({m.how}); skipped")
    for a in report.ambiguous:
        click.echo(f"ambiguous ({a.step}): {a.name}: {', '.join(map(str, a.candidates))}; skipped")
    for label, names in (("filled with 0", [f.target for f in report.filled]), ("missing", report.missing_keys),
                         ("unexpected", report.unexpected_keys)):
        if names:
            click.echo(f"{label} ({len(names)}):")
            for line in group_keys(names):
                click.echo(f"  {line}")
    for note in report.notes:  # part of the report (its data), not warnings
        click.echo(f"note: {note}")
    click.echo(f"coverage: {report.coverage:.1%} of {report.target_count} target keys "
               f"({len(report.matched)} matched, {len(report.filled)} filled); "
               f"used {len(report.matched)} of {report.source_count} checkpoint keys; "
               f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
               f"{len(report.mismatched)} mismatched")
