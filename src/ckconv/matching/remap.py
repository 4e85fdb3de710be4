"""The remapping half of ``convert`` (``--arch``, ``--map``, ``--rename``, ``--only``, ``--drop``): the model
section replaced by the remapped state_dict, optimizer state following the renames, the bundle in the torch layout.

Applying a match is :mod:`.apply`, map files :mod:`.mapfile`, reports without an architecture :mod:`.identity`.
"""

from __future__ import annotations

from ..contents.layout import drop_optimizers, find_optimizers, frozen_names, layout_of, standard_layout
from ..contents.optimizer_slots import model_parameters, remap_optimizer, resolve
from ..contents.unwrap import replace
from ..errors import UsageError
from ..model import Note, warning
from . import targets
from .apply import remap_refs
from .engine import match
from .identity import identity_report, restrict
from .mapfile import load_map, report_from_map
from .report import MatchReport


def remap_checkpoint(ckpt, *, arch=None, arch_options=None, map=None, only=(), drop=(), rename=(), section=None,
                     strict=False, model_only=False, structural=True, optimizer="remap", keep_layout=False):
    """-> (new root, MatchReport, notes): the model section replaced by the remapped state_dict.

    Optimizer state follows the renames (``optimizer="remap"``) or is left out (``"drop"``). With an architecture
    a bundle is written in the torch layout ``{'model': sd, 'optimizer': osd, ...}`` unless ``keep_layout``.
    """
    if optimizer not in ("remap", "drop"):
        raise UsageError(f"unknown --optimizer {optimizer!r}; use remap or drop")
    options = targets.parse_options(arch_options)
    if map is not None:
        data = load_map(map)
        if rename:
            raise UsageError("--rename and --map do not go together: the map already names every key")
        arch = arch or data["arch"]
        options = options or targets.parse_options(data["arch_options"])
        report = report_from_map(data, ckpt, arch=arch, arch_options=options, section=section)
        if only or drop:
            restrict(report, only, drop, targets.spec(arch, options).module_tree() if arch else None)
    elif arch is not None:
        report = match(ckpt, arch, arch_options=options, rename=rename, section=section, only=only, drop=drop,
                       structural=structural)
    else:
        report = identity_report(ckpt, rename=rename, section=section)
        if only or drop:
            restrict(report, only, drop, None)
    if strict:
        report.check_strict()
    if not report.matched:
        raise UsageError(f"no checkpoint key matched {report.arch}; nothing to write (see `ckconv match`)")
    state = remap_refs(report)
    root = state if model_only else replace(ckpt.root, report.section_path, state)
    notes = [_summary(report, model_only)]
    if not model_only:
        frozen = frozen_names(ckpt.root)
        if optimizer == "drop":
            root, dropped = drop_optimizers(root)
            if dropped:
                notes.append(f"left out {dropped} optimizer state_dict{'s' if dropped > 1 else ''} (--optimizer drop)")
        else:
            root, optimizer_notes = remap_optimizers(root, report, options, frozen=frozen)
            notes += optimizer_notes
        if frozen and isinstance(root, dict) and "frozen" in root:
            mapping = {m.source: m.target for m in report.matched}
            kept = [mapping[n] for n in frozen if n in mapping]
            root = replace(root, ("frozen",), kept)
            if len(kept) < len(frozen):
                notes.append(warning(f"the recorded freeze follows the renames: {len(frozen) - len(kept)} frozen "
                                     "parameters are not in the output"))
        if report.architecture and not keep_layout and isinstance(root, dict) and len(report.section_path) == 1:
            root, note = standard_layout(root, report.section_path[0], layout_of(ckpt.root))
            notes += [note] if note else []
        elif report.architecture and not keep_layout and len(report.section_path) > 1:
            notes.append(f"the model sits at {report.section}, inside another section; kept the source layout")
    if report.mismatched:
        notes.append(warning(f"skipped {len(report.mismatched)} keys with other shapes: " + ", ".join(
            f"{m.target} {list(m.source_shape)} vs {list(m.target_shape)}" for m in report.mismatched[:5])
            + (" ..." if len(report.mismatched) > 5 else "")))
    notes += report.notes
    return root, report, [Note.of(n) for n in notes]


def remap_optimizers(root, report: MatchReport, options=None, *, frozen=()):
    """Optimizer state in a bundle follows the model's renames, reshapes and drops (slots in target order).

    Refuses (:class:`UsageError`) an optimizer whose slots cannot be proven to belong to particular parameters,
    or whose state would not fit its new parameter: such state is never written.
    """
    if not isinstance(root, dict):
        return root, []
    found = find_optimizers(root)
    if not found:
        return root, []
    mapping = {m.source: m.target for m in report.matched}
    shapes = {m.target: tuple(m.shape) for m in report.matched}
    source_sd = report.source_tensors or {}
    source_shapes = {n: tuple(ref.shape) for n, ref in source_sd.items()}
    restart = {m.source: m.target for m in report.mismatched}  # a new head keeps its group, without state
    if report.architecture:
        spec = targets.spec(report.arch, options or report.arch_options or None)
        target_params = [t.name for t in spec.tensors if t.kind == "parameter"]
    else:
        target_params = [mapping[n] for n, _ in model_parameters(source_sd) if n in mapping]
    in_place = [mapping.get(n) for n, _ in model_parameters(source_sd)] == target_params and all(
        m.reshape is None for m in report.matched)
    notes = []
    for path, osd in found:
        res = resolve(osd, source_sd, frozen)
        if res.problem is not None:
            if in_place and res.ambiguous:  # each parameter keeps its place and shape: slots point where they did
                notes.append(f"optimizer at {path}: kept unchanged (the parameters keep their order and shapes; "
                             f"{res.problem})")
                continue
            raise UsageError(f"optimizer at {path}: {res.problem}; ckconv cannot move its state onto "
                             f"{report.arch}'s parameters: pass --optimizer drop to write the model without it, or "
                             "save the optimizer with param_names (torch >= 2.6, built from named_parameters())")
        try:
            new_osd, info = remap_optimizer(osd, res.names, mapping, target_params, shapes, source_shapes, restart)
        except UsageError as exc:
            raise UsageError(f"optimizer at {path}: {exc}") from None
        keys = tuple(int(p) if p.isdigit() else p for p in path.split("."))
        root = _replace_path(root, keys, new_osd)
        groups = len(osd["param_groups"])
        notes.append(f"optimizer at {path}: state of {info['moved']} parameters follows the renames (slot names "
                     f"from {res.how}; {groups} param group{'s' if groups != 1 else ''}); {len(info['dropped'])} "
                     f"dropped, {len(info['new_without_state'])} new parameters start without state"
                     + (" in the last group" if info["new_without_state"] and groups > 1 else "")
                     + (f", {len(info['restarted'])} with new shapes start without state in their source's group"
                        if info["restarted"] else ""))
    return root, notes


def _replace_path(root, keys, new):
    if not keys:
        return new
    head, rest = keys[0], keys[1:]
    if isinstance(root, list):
        return [(_replace_path(v, rest, new) if i == head else v) for i, v in enumerate(root)]
    return replace(root, (head,), _replace_path(root[head], rest, new))


def _summary(report, model_only):
    where = "wrote only the remapped state_dict" if model_only else f"replaced the state_dict at {report.section}"
    parts = [f"{where}: {len(report.matched)} tensors under {report.arch}'s names"]
    if report.architecture:
        parts.append(f"{report.coverage:.1%} of its {report.target_count} keys")
    if report.filled:
        parts.append(f"{len(report.filled)} num_batches_tracked filled with 0")
    if report.missing:
        parts.append(f"{len(report.missing)} missing")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} checkpoint keys left out")
    return "; ".join(parts)
