"""Conversion, the one orchestration: read, find the model, match it to an architecture, restructure, cast, write.

The one place that strings the stages together; each step is a function of the stage that owns it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

from . import dtypes, tree, tree_keys
from .contents import ema as ema_weights
from .contents.cast import cast_notes
from .contents.layout import drop_optimizers
from .contents.optimizer_slots import model_parameters
from .contents.plain import plain as make_plain
from .contents.unwrap import model_state_dict, refuse_placeholders, replace
from .errors import UsageError
from .formats.base import user_metadata
from .io import PathLike, Progress, check_extension, output_target, read, write
from .matching import targets
from .matching.remap import remap_checkpoint
from .matching.selectors import _names, freeze as select_frozen, under
from .matching.report import MatchReport
from .model import Checkpoint, Note, TensorRef, warning
from .pickling.policy import check_patterns
from .storage.atomic import check_destination
from .torchrun import world_from_env, write_distributed


@dataclass
class ConversionResult:
    source: str
    destination: str
    source_format: str
    destination_format: str
    tensors: int
    bytes: int
    model_only: bool = False
    dtype: str | None = None
    cast: int = 0  # tensors cast by --dtype
    notes: list = field(default_factory=list)  # [Note]: a warning calls for attention, a note describes
    match: MatchReport | None = None  # when keys were remapped (--arch, --map, --rename, ...)
    changes: list = field(default_factory=list)  # what --plain rewrote, one line each

    @property
    def warnings(self) -> list:
        return [n for n in self.notes if n.warning]

    def to_dict(self):
        """JSON-able: ``notes`` and ``warnings`` as lines, ``match`` as the report's own dict."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["notes"] = [n.text for n in self.notes if not n.warning]
        out["warnings"] = [n.text for n in self.warnings]
        out["match"] = self.match.to_dict() if self.match is not None else None
        return out


def convert(src: PathLike, dst: PathLike, *, to: str | None = None, model_only: bool = False,
            dtype: str | None = None, max_shard_size: int | str | None = None, force: bool = False,
            progress: Progress | None = None, arch: str | None = None, arch_options: dict | list | None = None,
            map: PathLike | None = None, only: Iterable[str] = (), drop: Iterable[str] = (),
            rename: Iterable[str] = (), section: str | None = None, strict: bool = False,
            freeze: Iterable[str] = (), distributed: bool = False, allow_globals: Iterable[str] = (),
            optimizer: str = "remap", keep_layout: bool = False, dtype_optimizer: str | None = None,
            plain: bool = False, ema: bool = False) -> ConversionResult:
    """Convert ``src`` to ``dst`` losslessly (unless ``model_only`` or ``dtype`` ask otherwise).

    ``arch`` / ``map`` / ``rename`` / ``only`` / ``drop`` remap the model state_dict onto an architecture's names
    (see :func:`ckconv.match`); the other sections of a bundle are kept unless ``model_only``.
    ``freeze``: selectors (``features[:10]``; dotted names without ``arch``) whose parameters the written bundle
    lists under ``frozen``, for :func:`ckconv.load_bundle` to restore.
    ``allow_globals``: globals a pickle output may name beyond ckconv's allowlist (see :func:`save`).
    ``optimizer``: ``"remap"`` (optimizer state follows the remapped model; refused when it cannot be proven to fit)
    or ``"drop"`` (left out). With ``arch`` a bundle is written as ``{'model', 'optimizer', ...}`` unless
    ``keep_layout``. ``dtype`` casts the model (and EMA copies) only; ``dtype_optimizer`` casts optimizer state,
    never its ``step`` counters (docs/bundles.md).
    ``plain``: rewrite what only ``torch.load(weights_only=False)`` can load (pickled modules, numpy values,
    records, class references) into what ``weights_only=True`` loads (:mod:`ckconv.contents.plain`); the result lists each
    change in ``changes``.
    ``ema``: the model's tensors replaced by their EMA values and the EMA entries left out
    (:mod:`ckconv.contents.ema`); refused when the checkpoint holds no EMA.
    ``distributed``: when this process is one rank of a torchrun job, write only this rank's share of the output
    (:func:`ckconv.torchrun.write_distributed`; every rank must call convert). The CLI sets it.
    """
    src = Path(src)
    check_patterns(allow_globals)  # a bad pattern is a usage error before anything is read
    check_extension(Path(dst), to)  # out.safetensors --to torch: refused before anything is read
    if freeze and model_only:
        raise UsageError("--freeze records the frozen parameters in a bundle, but --model-only writes a bare "
                         "state_dict; drop one of the two")
    if ema:
        ema_weights.refuse_section(section)
    ckpt = read(src)
    refuse_placeholders(ckpt.root, str(src))  # a ZeRO-3 model-states file: placeholders are never "converted"
    if ema:
        root, note = ema_weights.apply(ckpt.root)
        ckpt = dataclasses.replace(ckpt, root=root, notes=ckpt.notes + [note])
    # The output planned once, from the checkpoint as read (its files are all an output may come from), and
    # refused before any matching or casting if it would replace the source or an existing file without --force.
    target = output_target(ckpt, dst, format=to, max_shard_size=max_shard_size, progress=progress,
                           allow_globals=allow_globals)
    if not target.folder:
        check_destination(target.path, force, target.protect)
    notes = list(ckpt.notes)
    root, report, changes = _restructure(
        ckpt, notes, arch=arch, arch_options=arch_options, map=map, only=only, drop=drop, rename=rename,
        section=section, strict=strict, model_only=model_only, optimizer=optimizer, keep_layout=keep_layout,
        plain=plain, freeze=freeze)
    cast = 0
    if dtype or dtype_optimizer:
        root, cast, cast_note = cast_notes(root, dtype, dtype_optimizer, model_only)
        notes += cast_note
    refs = _unique_tensors(root)
    notes += _output_notes(root, refs, target.options.max_shard_size, ckpt.foreign)
    notes += metadata_notes(ckpt.metadata, target.format)
    out = Checkpoint(root=root, format=ckpt.format, path=str(src), metadata=user_metadata(ckpt.metadata))
    notes += target.format.output_notes(out, target.options)
    total = sum(r.nbytes for r in refs)
    if progress is not None and hasattr(progress, "start"):
        progress.start(total)
    name = _writer(distributed)(out, target, force=force)
    return ConversionResult(str(src), str(target.path), ckpt.format, name, len(refs), total, model_only,
                            dtypes.CAST_NAMES.get(dtype) if dtype else None, cast, [Note.of(n) for n in notes],
                            report, changes)


def _restructure(ckpt, notes, *, arch, arch_options, map, only, drop, rename, section, strict, model_only,
                 optimizer, keep_layout, plain, freeze):
    """-> (root, MatchReport or None, --plain changes): the tree to write; what was done is added to ``notes``."""
    root = ckpt.root
    report = None
    if arch is not None or map is not None or rename or only or drop or section is not None:
        root, report, remap_notes = remap_checkpoint(
            ckpt, arch=arch, arch_options=arch_options, map=map, only=only, drop=drop, rename=rename,
            section=section, strict=strict, model_only=model_only, optimizer=optimizer, keep_layout=keep_layout)
        notes += remap_notes + report.fit_warnings()  # what --arch left unfilled, what fits nowhere in it
    elif model_only:
        root, where = model_state_dict(root)
        notes.append(f"wrote only the model state_dict (found at {where})")
    elif optimizer == "drop":
        root, dropped = drop_optimizers(root)
        notes.append(f"left out {dropped} optimizer state_dicts (--optimizer drop)")
    changes: list = []
    if plain:
        root, changes = make_plain(root)
        notes.append(f"--plain: {len(changes)} values rewritten for torch.load(weights_only=True)" if changes else
                     "--plain: nothing to rewrite; the checkpoint already loads with weights_only=True")
    if freeze:
        target = report.architecture if report is not None else None
        root, _, note = record_freeze(root, freeze, arch=target, arch_options=report.arch_options if target else None)
        notes.append(note)
    return root, report, changes


def _output_notes(root, refs, shard, foreign) -> list:
    """What the user should know about the output itself: tensors over the shard size, foreign objects kept."""
    notes = []
    over = [r for r in refs if shard is not None and r.nbytes > shard]
    if over:
        notes.append(warning(f"the checkpoint's largest tensor ({max(r.nbytes for r in over)} bytes) exceeds "
                             f"--max-shard-size: {len(over)} tensor(s) over the limit each get a shard of their own, "
                             "as huggingface_hub does"))
    kept = tree_keys.foreign_objects(root) if foreign else []  # what the output holds, not the source
    if kept:
        classes = sorted({c for _, c in kept})
        notes.append(f"kept {len(kept)} foreign objects as inert records: " + ", ".join(classes[:12])
                     + (f" and {len(classes) - 12} more classes" if len(classes) > 12 else ""))
    return notes


def metadata_notes(metadata, fmt) -> list:
    """A warning naming the source's metadata keys when the output format has no place for them (issue 23)."""
    lost = [k for k in user_metadata(metadata) if k != "format"]
    if not lost or fmt.carries_metadata:
        return []
    return [warning(f"the {fmt.name} format has no place for metadata: left out {len(lost)} key"
                    f"{'s' if len(lost) > 1 else ''} of the source's metadata: " + ", ".join(lost[:8])
                    + (f" and {len(lost) - 8} more" if len(lost) > 8 else ""))]


def _writer(distributed: bool):
    """``io.write``, or under torchrun (``distributed``, issue 8) the writer that gives each rank its share."""
    if distributed and world_from_env() is not None:
        return write_distributed
    return write


def _unique_tensors(root):
    """The distinct tensors of ``root`` (equal :meth:`TensorRef.view_key`: tied views once), each the first place it
    is found. A storage one ref reaches costs a dict slot holding that ref, no key tuple: view keys are made only
    for storages that several refs reach (a million tensors, a million tuples and ints less)."""
    first: dict = {}  # storage (or its id(), for a class that defines equality) -> its ref, or the set of view keys
    out = []
    for ref in tree.instances(root, TensorRef):
        st = ref.storage
        slot = st if type(st).__eq__ is object.__eq__ else id(st)
        seen = first.get(slot)
        if seen is None:
            first[slot] = ref
        else:
            if type(seen) is not set:
                seen = first[slot] = {seen.view_key()}
            key = ref.view_key()
            if key in seen:
                continue
            seen.add(key)
        out.append(ref)
    return out


def record_freeze(root, selectors, *, arch=None, arch_options=None):
    """-> (new root, frozen names, note): ``root`` with the parameters under ``selectors`` listed as ``frozen``.

    With ``arch`` the selectors resolve against that architecture's module tree (``features[:10]``); without one
    only dotted names work (``features.0``). A bare state_dict becomes ``{'model': sd, 'frozen': [...]}``.
    """
    selectors = [selectors] if isinstance(selectors, str) else list(selectors)
    sd, where = model_state_dict(root)
    if arch:
        model = targets.build(arch, arch_options or None)  # on the meta device: no memory, no weights
        selected = set(select_frozen(model, selectors))
        params = [n for n, _ in model.named_parameters() if n in sd]
        frozen = [n for n in params if n in selected]
    else:
        params = [name for name, _ in model_parameters(sd)]
        prefixes = _names(selectors, None)
        frozen = [n for n in params if under(n, prefixes)]
    if not frozen:
        raise UsageError(f"--freeze {' '.join(selectors)}: selects no parameter of the model state_dict (found at "
                         f"{where}); check the names with `ckconv inspect`" + ("" if arch else " or pass --arch"))
    if where == "<root>":
        new = {"model": root, "frozen": frozen}
        note = "wrapped the state_dict as a bundle {'model': ..., 'frozen': [...]} to record the freeze"
    else:
        new = replace(root, ("frozen",), frozen)
        note = "replaced the bundle's earlier freeze" if "frozen" in root else "recorded the freeze"
    trainable = len(params) - len(frozen)
    return new, frozen, (f"{note}: {len(frozen)} parameters frozen, {trainable} trainable "
                         "(ckconv.load_bundle restores it)")
