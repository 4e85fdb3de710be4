"""``ckconv convert``: one source to one output, or several into a folder as cp does, with a progress bar."""

from __future__ import annotations

import os

import click

from ..errors import CkconvError
from .common import RUN, echo_json, fail, group_keys, interrupted_code, printable, verbose, warn
from .progress import Progress


# --dtype spellings -> the names the API takes (torch's own names and aliases, and the short ones).
CAST_SPELLINGS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                  "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _cast_name(ctx, param, value):
    return None if value is None else CAST_SPELLINGS[value.lower().removeprefix("torch.")]


def _dtype_option(*names, help):
    spellings = list(CAST_SPELLINGS) + [f"torch.{n}" for n in ("bfloat16", "float16", "half", "float32", "float")]
    return click.option(*names, type=click.Choice(spellings, case_sensitive=False), callback=_cast_name,
                        metavar="[bf16|fp16|fp32]", help=help + " Also bfloat16, float16/half, float32/float.")


@click.command()
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
@click.option("--ema", is_flag=True, help="Write the EMA weights under the model's names (LitEma, timm "
                                          "state_dict_ema, AveragedModel, mmengine), EMA entries left out.")
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
            map_file, only, drop, rename, section, ema, strict, optimizer, keep_layout, freeze, allow_globals, plain):
    """Convert SRC to DST, keeping everything (model, optimizer, scalars) unless told otherwise.

    With several SRC, DST is an existing folder and each goes to DST/<stem>.<ext>, as cp does (no file replaced
    without --force), one line per file; the first error stops the run and names the files not attempted.

    \b
    Examples:
      ckconv convert model.pth model.safetensors
      ckconv convert run.ckpt out.pth --model-only --dtype bf16
      ckconv convert ckpt.pth resnet.safetensors --arch resnet50
      ckconv convert hf/pytorch_model.bin hf --max-shard-size 5GB
      ckconv convert a.pth b.pth out/ --to safetensors
    """
    from ..api import convert as do_convert

    if len(paths) < 2:
        raise click.UsageError("missing DST: ckconv convert SRC... DST")
    *sources, dst = paths
    remap = {}
    if arch or map_file or only or drop or rename or section is not None:
        remap = dict(arch=arch, arch_options=list(arch_options), map=map_file, only=list(only), drop=list(drop),
                     rename=list(rename), section=section, strict=strict)
    options = dict(to=to, model_only=model_only, dtype=dtype, max_shard_size=max_shard_size, force=force,
                   freeze=list(freeze), distributed=True, allow_globals=list(allow_globals), optimizer=optimizer,
                   keep_layout=keep_layout, dtype_optimizer=dtype_optimizer, plain=plain, ema=ema, **remap)
    if len(sources) > 1:
        _convert_several(sources, dst, options, as_json)
        return
    progress = Progress(not as_json)
    result = do_convert(sources[0], dst, progress=progress, **options)
    progress.finish()
    from ..torchrun import world_from_env  # under torchrun, only rank 0 reports

    if (world_from_env() or (0,))[0] != 0:
        return
    if as_json:
        echo_json(result.to_dict())
        return
    _report_conversion(result)


def _convert_several(sources, folder, options, as_json):
    """``convert a.pth b.pth DIR``: every name planned and checked first, then one conversion after another."""
    from ..api import convert as do_convert

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
            fail(f"interrupted while converting {src}; nothing of it was written ({len(results)} of "
                 f"{len(sources)} converted before it)", "Interrupted", code=interrupted_code())
        progress.finish()
        results.append(result)
        if not as_json:
            _report_conversion(result)
    meta.pop("ckconv.json_extra", None)
    if as_json:
        echo_json({"results": [r.to_dict() for r in results]})


def _plan_several(sources, folder, options):
    """Before any work: DST is a folder, every source exists, no two outputs share a name, and no file would be
    replaced without --force (cp semantics: DST/<stem>.<ext>)."""
    from ..api import output_target
    from ..errors import NotACheckpoint, OutputExists, UsageError
    from ..model import Checkpoint

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


def _report_conversion(result):
    from ..reports.inspection import size_text

    click.echo(f"Converted {result.source} ({result.source_format}) -> {result.destination} "
               f"({result.destination_format}): {result.tensors} tensors, {size_text(result.bytes)}")
    for note in result.notes:
        if note.warning:
            warn(note.head + _keys(note.names) if getattr(note, "names", ()) else note)
        elif RUN["verbosity"] >= 0:
            click.echo(f"  note: {note}")
    for change in getattr(result, "changes", ()):
        click.echo(f"  plain: {printable(change)}")


def _keys(names) -> str:
    """``: layer1.0.bn1.{weight,bias}, ..., fc.weight, ... (-v lists all 198)``: a warning's keys, all with -v."""
    groups = group_keys(names)
    if verbose() or len(groups) <= 3:
        return ": " + ", ".join(map(printable, groups))
    return ": " + ", ".join(map(printable, groups[:3])) + f", ... (-v lists all {len(names)})"
