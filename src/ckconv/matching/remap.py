"""Applying a match: remapped state_dicts, map files, ``load_into`` and the remapping half of ``convert``."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path

from ..errors import CkconvError, UsageError
from ..storage.files import read_capped
from .engine import match
from .report import Match, MatchReport
from ..model import Note, Storage, TensorRef, gather, warning

MAP_VERSION = 1
MAX_MAP_BYTES = 64 * 2**20  # a map of 100,000 tensors is a few MB


# --- remapped state_dicts ----------------------------------------------------------------------------------

def _zero_ref(name):
    return TensorRef(Storage(f"ckconv-fill-{name}", "int64", 8, buffer=bytes(8)), "int64", ())


def _reshaped(ref: TensorRef, shape):
    if ref.is_contiguous:
        return TensorRef(ref.storage, ref.dtype, shape, None, ref.offset, ref.requires_grad, ref.parameter)
    data = gather(ref)
    return TensorRef(Storage(f"{ref.storage.key}-reshaped", ref.dtype, len(data), buffer=data), ref.dtype, shape,
                     None, 0, ref.requires_grad, ref.parameter)


def remap_refs(report: MatchReport, refs=None) -> OrderedDict:
    """{target name: TensorRef} in target order: matched tensors (reshaped where recorded) and filled zeros."""
    return _remapped(report, report.source_tensors if refs is None else refs, _reshaped, _zero_ref)


def remap_tensors(report: MatchReport, tensors) -> OrderedDict:
    """The same for torch tensors ``{source name: tensor}``."""
    import torch

    return _remapped(report, tensors, lambda t, shape: t.reshape(shape),
                     lambda _name: torch.tensor(0, dtype=torch.int64))


def _remapped(report, values, reshape, zero):
    mapping = report.mapping()
    filled = {f["target"] for f in report.filled}
    out = OrderedDict()
    for t in report.targets:
        if t in mapping:
            m = mapping[t]
            out[t] = reshape(values[m.source], m.shape) if m.reshape is not None else values[m.source]
        elif t in filled:
            out[t] = zero(t)
    return out


def load_into(model, ckpt, *, rename=(), section=None, only=(), drop=(), strict=False, structural=True,
              allow_reshape=True, ema=False) -> MatchReport:
    """Match ``ckpt`` onto ``model`` and copy the matched tensors in; -> the MatchReport, whose ``missing_keys``,
    ``unexpected_keys`` and ``mismatched_keys`` say what was skipped, as ``load_state_dict``'s result does (and a
    warning says it too: nothing is skipped silently).

    ``ema``: load the EMA weights (LitEma, timm, AveragedModel, mmengine layouts; refused when there are none).
    With ``strict`` nothing is loaded unless every key of ``model`` (or of its ``only`` part) is filled.
    """
    import torch

    from .. import tree

    report = match(ckpt, model, rename=rename, section=section, only=only, drop=drop, structural=structural,
                   allow_reshape=allow_reshape, ema=ema)
    if strict:
        report.check_strict()
    needed = {m.source: report.source_tensors[m.source] for m in report.matched}
    state = remap_tensors(report, tree.materialize(needed))
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    skipped = report.skipped_text()
    if skipped:  # never silently: load_state_dict(strict=False) returns its lists, load_into warns too
        warnings.warn(f"ckconv.load_into: loaded {len(report.matched)} tensors into {report.arch}; skipped "
                      f"{skipped} (the MatchReport lists all: missing_keys, unexpected_keys, mismatched_keys)",
                      stacklevel=2)
    return report


# --- map files ---------------------------------------------------------------------------------------------

def map_dict(report: MatchReport) -> dict:
    mapping = report.mapping()
    filled = {f["target"] for f in report.filled}
    entries = []
    for t in report.targets:
        if t in mapping:
            m = mapping[t]
            entries.append({"target": t, "source": m.source, "reshape": None if m.reshape is None else list(m.shape)})
        elif t in filled:
            entries.append({"target": t, "fill": 0})
    return {"ckconv_map": MAP_VERSION, "arch": report.arch, "arch_options": report.arch_options,
            "section": report.section, "map": entries}


def save_map(report: MatchReport, path):
    from ..storage.atomic import staged

    text = json.dumps(map_dict(report), indent=2, default=repr) + "\n"
    with staged(Path(path), directory=False, force=True) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def load_map(path) -> dict:
    """Read a map file written by ``--save-map``, or a plain JSON object ``{target: source}``."""
    try:  # a regular file of bounded size: a FIFO would block, /dev/zero behind a link never end
        data = json.loads(read_capped(path, MAX_MAP_BYTES, f"map {path}").decode("utf-8"))
    except CkconvError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot read map {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"map {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "ckconv_map" not in data and all(isinstance(v, str) for v in data.values()):
        data = {"map": [{"target": t, "source": s} for t, s in data.items()]}
    entries = data.get("map") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("target"), str)
                                                and (isinstance(e.get("source"), str) or "fill" in e)
                                                for e in entries):
        raise UsageError(f"map {path} is not a ckconv map: expected {{\"map\": [{{\"target\", \"source\"}}]}} or "
                         "{target: source}")
    return {"arch": data.get("arch"), "arch_options": data.get("arch_options") or {},
            "section": data.get("section"), "map": entries}


def report_from_map(data, ckpt, *, arch=None, arch_options=None, section=None) -> MatchReport:
    """A MatchReport that follows a map file; checked against the checkpoint (and ``arch``'s spec if given)."""
    from .engine import source_tensors, target_spec

    section = section if section is not None else (data.get("section") if data.get("section") != "<root>" else "")
    _, flat, where, path, label = source_tensors(ckpt, section or None)
    spec = {t.name: t for t in target_spec(arch, arch_options)[0].tensors} if arch else None
    report = MatchReport(arch or data.get("arch") or "<map>", label, where, 0, len(flat),
                         arch_options=dict(arch_options or {}), source_tensors=flat, section_path=path)
    for e in data["map"]:
        t = e["target"]
        if spec is not None and t not in spec:
            raise UsageError(f"the map names target key {t!r}, which {report.arch} does not have")
        report.targets.append(t)
        if "fill" in e and "source" not in e:
            report.filled.append({"target": t, "shape": [], "dtype": "int64", "value": 0})
            continue
        s = e["source"]
        if s not in flat:
            raise UsageError(f"the map takes {t!r} from {s!r}, which this checkpoint does not have (at {where})")
        shape = tuple(e.get("reshape") or flat[s].shape)
        if spec is not None and tuple(spec[t].shape) != shape:
            raise UsageError(f"the map gives {t!r} shape {list(shape)}, {report.arch} wants {list(spec[t].shape)}")
        reshape = tuple(flat[s].shape) if shape != tuple(flat[s].shape) else None
        if reshape is not None and _numel(reshape) != _numel(shape):
            raise UsageError(f"the map reshapes {s!r} from {list(reshape)} to {list(shape)}: element counts differ")
        report.matched.append(Match(t, s, "map", shape, [], reshape, 1.0))
    if spec is not None:
        done = set(report.targets)
        report.missing = [{"name": n, "shape": list(v.shape), "dtype": v.dtype} for n, v in spec.items()
                          if n not in done]
    used = {m.source for m in report.matched}
    report.unexpected = [{"name": k, "shape": list(v.shape), "dtype": v.dtype} for k, v in flat.items()
                         if k not in used]
    report.target_count = len(report.targets) + len(report.missing)
    return report


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def identity_report(ckpt, *, rename=(), section=None) -> MatchReport:
    """No architecture: every checkpoint key maps to itself after ``rename``."""
    from .engine import source_tensors
    from ..rules import parse_renames
    from ..rules import rename as apply_renames

    rules = parse_renames(rename)
    _, flat, where, path, label = source_tensors(ckpt, section)
    report = MatchReport("<none>", label, where, len(flat), len(flat), source_tensors=flat, section_path=path)
    seen = {}
    for s, ref in flat.items():
        t, applied = apply_renames(s, rules)
        if t in seen:
            raise UsageError(f"--rename maps both {seen[t]!r} and {s!r} to {t!r}")
        seen[t] = s
        report.targets.append(t)
        report.matched.append(Match(t, s, "rename" if applied else "exact", tuple(ref.shape), applied))
    return report


def _restrict(report: MatchReport, only, drop, model):
    from .selectors import filter_keys

    keep = set(filter_keys(report.targets, only=only, drop=drop, model=model))
    dropped = [t for t in report.targets if t not in keep]
    report.targets = [t for t in report.targets if t in keep]
    report.matched = [m for m in report.matched if m.target in keep]
    report.filled = [f for f in report.filled if f["target"] in keep]
    report.missing = [e for e in report.missing if e["name"] in keep]
    report.target_count = len(report.targets) + len(report.missing)
    return dropped


# --- convert --arch / --map / --only / --drop / --rename ---------------------------------------------------

def remap_checkpoint(ckpt, *, arch=None, arch_options=None, map=None, only=(), drop=(), rename=(), section=None,
                     strict=False, model_only=False, structural=True, optimizer="remap", keep_layout=False):
    """-> (new root, MatchReport, notes): the model section replaced by the remapped state_dict.

    Optimizer state follows the renames (``optimizer="remap"``) or is left out (``"drop"``). With an architecture
    a bundle is written in the torch layout ``{'model': sd, 'optimizer': osd, ...}`` unless ``keep_layout``.
    """
    from . import targets
    from ..contents.layout import drop_optimizers, frozen_names, layout_of, standard_layout
    from ..contents.unwrap import replace

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
            _restrict(report, only, drop, targets.spec(arch, options).module_tree() if arch else None)
    elif arch is not None:
        report = match(ckpt, arch, arch_options=options, rename=rename, section=section, only=only, drop=drop,
                       structural=structural)
    else:
        report = identity_report(ckpt, rename=rename, section=section)
        if only or drop:
            _restrict(report, only, drop, None)
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
            f"{m['target']} {m['source_shape']} vs {m['target_shape']}" for m in report.mismatched[:5])
            + (" ..." if len(report.mismatched) > 5 else "")))
    notes += report.notes
    return root, report, [Note.of(n) for n in notes]


def remap_optimizers(root, report: MatchReport, options=None, *, frozen=()):
    """Optimizer state in a bundle follows the model's renames, reshapes and drops (slots in target order).

    Refuses (:class:`UsageError`) an optimizer whose slots cannot be proven to belong to particular parameters,
    or whose state would not fit its new parameter: such state is never written.
    """
    from . import targets
    from ..contents.layout import find_optimizers
    from ..contents.optimizer_slots import model_parameters, remap_optimizer, resolve

    if not isinstance(root, dict):
        return root, []
    found = find_optimizers(root)
    if not found:
        return root, []
    mapping = {m.source: m.target for m in report.matched}
    shapes = {m.target: tuple(m.shape) for m in report.matched}
    source_sd = report.source_tensors or {}
    source_shapes = {n: tuple(ref.shape) for n, ref in source_sd.items()}
    restart = {m["source"]: m["target"] for m in report.mismatched}  # a new head keeps its group, without state
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
    from ..contents.unwrap import replace

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
