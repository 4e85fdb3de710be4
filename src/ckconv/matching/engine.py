"""Matching a checkpoint's keys onto an architecture's state_dict, and the report that says how each key went.

The pipeline (docs/matching.md): unwrap -> exact -> --rename -> wrapper prefixes -> common prefixes -> plugin
rules -> dotted-suffix matching -> structural alignment -> fill ``num_batches_tracked``. Each step only sees the
keys the steps before it left; every pairing records the step (``how``) and the renames on the way (``steps``).
Matching needs names and shapes only: no tensor data is read, and architectures are built on the meta device.
"""

from __future__ import annotations

import fnmatch
import os
from math import prod
from collections import Counter, defaultdict

from . import alignment, inference, targets
from .report import Ambiguity, Candidate, Filled, KeyEntry, Match, MatchReport, Mismatch
from .selectors import filter_keys
from .. import tree
from ..architectures import spec_of_model
from ..contents import ema as ema_weights
from ..contents.unwrap import unwrap
from ..errors import UsageError
from ..io import read
from ..model import Checkpoint, Note, TensorRef, warning
from ..plugins import host
from ..rules import parse_renames, rename, rules_for

NBT = "num_batches_tracked"
WRAPPERS = ("module", "_orig_mod")  # DataParallel/DDP and torch.compile
MAX_PREFIX_PARTS = 3
MAX_FANOUT = 64  # a name shared by more keys than this says nothing about where it belongs
CONFIDENCE = {"exact": 1.0, "rename": 1.0, "prefix": 1.0, "rule": 1.0, "map": 1.0, "suffix": 0.9}


# --- the pipeline on names and shapes --------------------------------------------------------------------

class _Pipeline:
    def __init__(self, source, target, allow_reshape=True):
        self.src = {name: (tuple(shape), dtype) for name, shape, dtype in source}
        self.tgt = {t.name: t for t in target}
        self.free_src = dict.fromkeys(self.src)  # ordered sets
        self.free_tgt = dict.fromkeys(self.tgt)
        self.name = dict(zip(self.src, self.src))  # source key -> its name after the renames so far
        self.steps = defaultdict(list)
        self.matched: dict = {}
        self.mismatched: dict = {}
        self.ambiguous: list = []
        self.notes: list = []
        self.prefixes: list = []  # accepted (strip, add) prefix pairs
        self.allow_reshape = allow_reshape

    def pair(self, t, s, how, confidence=None):
        del self.free_src[s], self.free_tgt[t]
        tshape, sshape = tuple(self.tgt[t].shape), self.src[s][0]
        confidence = CONFIDENCE.get(how, 0.8) if confidence is None else confidence
        if tshape == sshape:
            self.matched[t] = Match(t, s, how, tshape, self.steps.get(s, []), None, confidence)
        elif self.allow_reshape and alignment.reshape_ok(sshape, tshape):
            self.matched[t] = Match(t, s, how, tshape, self.steps.get(s, []), sshape, round(confidence - 0.1, 2))
        else:
            self.mismatched[t] = Mismatch(t, s, tshape, sshape, how)

    def lookup(self, how, proposals=None):
        """Pair each free target with the one free source proposing it (by default: the source's current name)."""
        if proposals is None:
            proposals = ((s, self.name[s]) for s in self.free_src)
        hits = defaultdict(list)
        for s, t in proposals:
            if t in self.free_tgt:
                hits[t].append(s)
        for t, sources in hits.items():
            if len(sources) == 1:
                self.pair(t, sources[0], how)
            else:
                self.ambiguous.append(Ambiguity(how, sources, target=t))

    def renamed(self, s, new, note):
        if new != self.name[s]:
            self.name[s] = new
            self.steps[s].append(note)

    # 2-3: exact names, the user's renames, wrapper prefixes
    def user_renames(self, rules):
        if not rules:
            return
        for s in self.free_src:
            new, applied = rename(self.name[s], rules)
            for r in applied:
                self.steps[s].append(r)
            self.name[s] = new
        self.lookup("rename")

    def wrappers(self):
        blocked = {w for w in WRAPPERS if any(w in t.split(".") for t in self.tgt if w in t)}
        strip = [w for w in WRAPPERS if w not in blocked]
        for s in self.free_src:
            name = self.name[s]
            if not any(w in name for w in strip):
                continue
            parts = name.split(".")
            lead = 0
            while lead < len(parts) - 1 and parts[lead] in strip:
                lead += 1
            rest = parts[lead:]
            inner = [p for p in rest[:-1] if p != "_orig_mod" or "_orig_mod" not in strip] + rest[-1:]
            removed = parts[:lead] + (["_orig_mod"] if len(inner) < len(rest) else [])
            if removed:
                self.renamed(s, ".".join(inner), "strip " + ", ".join(f"'{p}.'" for p in dict.fromkeys(removed)))
        self.lookup("prefix")

    def common_prefixes(self):
        for _ in range(8):
            best = self._best_prefix()
            if best is None:
                return
            strip, add = best
            self.prefixes.append(best)
            proposals = []
            for s in self.free_src:
                name = self.name[s]
                if name.startswith(strip) and add + name[len(strip):] in self.free_tgt:
                    self.renamed(s, add + name[len(strip):], f"prefix '{strip}' -> '{add}'")
                    proposals.append((s, self.name[s]))
            self.lookup("prefix", proposals)

    def _best_prefix(self):
        """The (strip, add) prefix pair that lines up the most keys with equal shapes, if it is convincing."""
        tails = defaultdict(list)
        for t in self.free_tgt:
            parts = t.split(".")
            for j in range(min(MAX_PREFIX_PARTS, len(parts) - 2) + 1):  # keep at least "module.leaf"
                tails[".".join(parts[j:])].append(".".join(parts[:j]) + "." if j else "")
        counts = Counter()
        under = Counter()
        for s in self.free_src:
            parts = self.name[s].split(".")
            shape = self.src[s][0]
            for k in range(min(MAX_PREFIX_PARTS, len(parts) - 2) + 1):
                strip = ".".join(parts[:k]) + "." if k else ""
                under[strip] += 1
                rest = ".".join(parts[k:])
                adds = tails.get(rest)
                if adds and len(adds) <= MAX_FANOUT:
                    for add in adds:
                        if add != strip and tuple(self.tgt[add + rest].shape) == shape:
                            counts[(strip, add)] += 1
        for pair, gain in sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0][0]) + len(kv[0][1]))):
            if pair in self.prefixes:
                continue
            # convincing: it lines up several keys, and at least half of those under the stripped prefix
            if gain >= 2 and 2 * gain >= under[pair[0]]:
                return pair
        return None

    # 4: plugin rules, tried on the current name and on each accepted prefix mapping of it
    def plugin_rules(self, rules):
        if not rules:
            return
        proposals = []
        for s in self.free_src:
            name = self.name[s]
            variants = [(name, None)] + [(add + name[len(strip):], (strip, add))
                                         for strip, add in self.prefixes if name.startswith(strip)]
            for variant, via in variants:
                new, applied = rename(variant, rules)
                if applied and new in self.free_tgt:
                    break
            else:
                (new, applied), via = rename(name, rules), None  # keep the rename for the suffix step
            if not applied:
                continue
            if via:
                self.steps[s].append(f"prefix '{via[0]}' -> '{via[1]}'")
            self.steps[s].extend(f"rule {r}" for r in applied)
            self.name[s] = new
            proposals.append((s, new))
        self.lookup("rule", proposals)

    # 5: dotted-suffix matching, longest suffix wins (detectron2's align_and_update_state_dicts)
    def suffixes(self):
        by_tail = defaultdict(list)
        for t in self.free_tgt:
            parts = t.split(".")
            for k in range(1, len(parts) - 1):
                by_tail[".".join(parts[k:])].append(t)
        src_tail = defaultdict(list)
        for s in self.free_src:
            parts = self.name[s].split(".")
            for k in range(1, len(parts) - 1):
                src_tail[".".join(parts[k:])].append(s)
        scores = defaultdict(dict)  # target -> {source: suffix length in parts}
        too_wide = []
        for s in self.free_src:
            name = self.name[s]
            tails = by_tail.get(name, ())
            if len(tails) > MAX_FANOUT:
                too_wide.append(s)
                continue
            for t in tails:
                scores[t][s] = name.count(".") + 1
        for t in self.free_tgt:
            for s in src_tail.get(t, ())[:MAX_FANOUT + 1]:
                scores[t][s] = max(scores[t].get(s, 0), t.count(".") + 1)
        for s in too_wide:
            self.ambiguous.append(Ambiguity("suffix", by_tail[self.name[s]][:5] + ["..."], source=s))
        claims = defaultdict(list)
        for t, by_source in scores.items():
            best = max(by_source.values())
            top = [s for s, v in by_source.items() if v == best]
            if len(top) == 1:
                claims[top[0]].append(t)
            else:
                self.ambiguous.append(Ambiguity("suffix", top, target=t))
        for s, claimed in claims.items():
            if len(claimed) == 1:
                self.pair(claimed[0], s, "suffix")
            else:
                self.ambiguous.append(Ambiguity("suffix", claimed, source=s))

    # 6: structural alignment of what is left
    def structure(self):
        src_items = [(s, self.src[s][0]) for s in self.free_src if not s.endswith(NBT)]
        tgt_items = [(t, self.tgt[t].shape) for t in self.free_tgt if not t.endswith(NBT)]
        if not src_items or not tgt_items:
            return
        src_groups = alignment.group(src_items, lambda n: n.rpartition(".")[0])
        tgt_groups = alignment.group(tgt_items, lambda n: self.tgt[n].module)
        accepted, ambiguous, note = alignment.align(src_groups, tgt_groups, self.allow_reshape)
        if note:
            self.notes.append(Note(note))
        for src_module, tgt_module, pairs, by_name in accepted:
            for s, t, _ in pairs:
                self.steps[s].append(f"aligned {src_module or '<root>'} -> {tgt_module or '<root>'}"
                                     + ("" if by_name else " by shape"))
                self.pair(t, s, "structural", 0.8 if by_name else 0.7)
        for src_module, tgt_modules in ambiguous:
            self.ambiguous.append(Ambiguity("structural", tgt_modules, source=src_module))

    def finish(self, report: MatchReport):
        order = report.targets = list(self.tgt)
        report.matched = [self.matched[t] for t in order if t in self.matched]
        report.mismatched = [self.mismatched[t] for t in order if t in self.mismatched]
        report.filled = [Filled(t) for t in self.free_tgt if t.rpartition(".")[2] == NBT and not self.tgt[t].shape]
        filled = {f.target for f in report.filled}
        report.missing = [KeyEntry(t, self.tgt[t].shape, self.tgt[t].dtype) for t in self.free_tgt if t not in filled]
        report.unexpected = [KeyEntry(s, *self.src[s]) for s in self.free_src]
        report.ambiguous = self.ambiguous
        report.notes = [Note.of(n) for n in report.notes] + self.notes + _hints(report) + self._dtype_notes(report)
        return report

    def _dtype_notes(self, report):
        cast = Counter((self.src[m.source][1], self.tgt[m.target].dtype) for m in report.matched
                       if self.src[m.source][1] != self.tgt[m.target].dtype)
        return [Note(f"{n} matched tensors are {have} where {report.arch} has {want}; they are written as they are "
                     f"(load_state_dict casts them; convert --dtype changes them)") for (have, want), n in cast.items()]


def _hints(report):
    heads = {(m.source_shape[0], m.target_shape[0]) for m in report.mismatched
             if len(m.source_shape) == len(m.target_shape) and m.source_shape[1:] == m.target_shape[1:]}
    if len(heads) == 1:
        (have, want), = heads
        return [warning(f"the checkpoint's {have}-way head does not fit the {want}-way head of {report.arch}; "
                        f"if {have} is the number of classes, try --arch-option num_classes={have}")]
    return []


def match_keys(source, target, *, arch="", rules=(), renames=(), structural=True, allow_reshape=True,
               report=None) -> MatchReport:
    """Match ``source`` [(name, shape, dtype)] onto ``target`` [TensorSpec] by names and shapes only."""
    source = list(source)
    report = report or MatchReport(arch, "<keys>", "<root>", 0, 0)
    report.target_count, report.source_count = len(target), len(source)
    p = _Pipeline(source, target, allow_reshape)
    p.lookup("exact")
    p.user_renames(parse_renames(renames))
    p.wrappers()
    p.common_prefixes()
    p.plugin_rules(rules_for(arch, rules))
    p.suffixes()
    if structural:
        p.structure()
    return p.finish(report)


# --- the API -----------------------------------------------------------------------------------------------

def source_tensors(ckpt, section=None, ema=False):
    """-> (root tree, {name: TensorRef}, where, path, label) for a path, a Checkpoint or torch objects.

    ``ema``: the model state_dict with the EMA values in place (:mod:`ckconv.contents.ema`)."""
    if isinstance(ckpt, (str, os.PathLike)):
        root, label = read(ckpt).root, str(ckpt)
    elif isinstance(ckpt, Checkpoint):
        root, label = ckpt.root, ckpt.path or "<checkpoint>"
    else:
        root, label = tree.from_torch(ckpt), "<memory>"
    if ema:
        ema_weights.refuse_section(section)
        root, _ = ema_weights.apply(root)
    flat, where, path = unwrap(root, section)
    packed = next((k for k, v in flat.items() if not isinstance(v, TensorRef)), None)
    if packed is not None:  # a quantized model's packed parameters (tensor_kinds.packed_param): no shape to match
        raise UsageError(f"the model state_dict at {where} is a quantized model's ({packed} holds packed "
                         "parameters); remapping it onto an architecture is not supported: convert it without "
                         "--arch, --map, --rename, --only, --drop or --section")
    return root, flat, where, path, label


def target_spec(arch, arch_options=None):
    """-> (ArchSpec, model or None) for an architecture name or an ``nn.Module``."""
    if hasattr(arch, "state_dict") and hasattr(arch, "named_modules"):
        return spec_of_model(arch, type(arch).__name__), arch
    return targets.spec(arch, arch_options), None


def match(ckpt, arch, *, arch_options=None, rename=(), section=None, only=(), drop=(), structural=True,
          allow_reshape=True, progress=None, ema=False) -> MatchReport:
    """Match the model state_dict in ``ckpt`` (a path, a Checkpoint or torch objects) onto ``arch``.

    ``arch``: a name (``resnet18``, ``torchvision:resnet18``), ``auto`` / ``auto:PATTERN,...`` to pick the best
    registered architecture, or an ``nn.Module``. ``rename``: ``'REGEX=REPLACEMENT'`` strings applied first.
    ``only``/``drop``: selectors limiting the target keys. ``ema``: match the EMA weights (``--ema``).
    Reads no tensor data.
    """
    auto = isinstance(arch, str) and (arch == "auto" or arch.startswith("auto:"))
    if isinstance(arch, str) and not auto:
        targets.resolve(arch)  # a typo is told before the checkpoint is read
    _, flat, where, path, label = source_tensors(ckpt, section, ema)
    source = [(k, v.shape, v.dtype) for k, v in flat.items()]
    options = targets.parse_options(arch_options)
    ranking = []
    if auto:
        ranking = rank(source, arch[5:], options, rename, progress, top=5)
        arch = pick(ranking)
    def run(options):
        spec, model = target_spec(arch, options)
        wanted = spec.tensors
        if only or drop:
            modules = model if model is not None else spec.module_tree()  # selectors count modules: no torch needed
            keep = set(filter_keys([t.name for t in wanted], only=only, drop=drop, model=modules))
            wanted = [t for t in wanted if t.name in keep]
        report = MatchReport(spec.arch, label, where, 0, 0, arch_options=options, candidates=ranking[:5],
                             source_tensors=flat, section_path=path)
        return match_keys(source, wanted, arch=spec.arch, rules=host().key_rules, renames=rename,
                          structural=structural, allow_reshape=allow_reshape, report=report)

    report = run(options)
    if isinstance(arch, str):  # builder options the checkpoint's shapes determine, unless the user set them
        inferred = inference.infer_options(report, arch, options)
        if inferred:
            better = run({**options, **inferred})
            if len(better.mismatched) < len(report.mismatched) and better.coverage >= report.coverage:
                better.notes.insert(0, inference.inference_note(inferred, report))
                return better
    return report


def rank(source, patterns="", arch_options=None, rename=(), progress=None, top=None) -> list:
    """Score every registered architecture (or those matching ``patterns``) by how well ``source`` fills it.

    -> [Candidate] best first; ``score`` is the harmonic mean of the share of target keys
    filled and the share of checkpoint keys used. Architectures that fail to build are skipped. With ``top``
    only the best ``top`` are sure to be listed (ties included): an architecture whose element counts alone
    prove it cannot score that high is left out without being matched.
    """
    wanted = [p.strip() for p in str(patterns or "").split(",") if p.strip()]
    names = targets.all_architectures(auto=True)
    if wanted:  # bare patterns pick among the auto candidates; "ns:pattern" reaches any namespace
        everything = targets.all_architectures() if any(":" in p for p in wanted) else names
        names = [a for a in everything if any(fnmatch.fnmatchcase(a if ":" in p else a.split(":", 1)[1], p)
                                              for p in wanted)]
    if not names:
        raise UsageError(f"no registered architecture matches {patterns!r}")
    source = list(source)
    rules = host().key_rules
    specs = []
    for i, name in enumerate(names):
        if progress is not None:
            progress(i, len(names), name)
        try:
            specs.append((name, targets.spec(name, arch_options)))
        except Exception:  # noqa: BLE001 - one model that cannot be built must not stop the ranking
            continue
    src_numels = Counter(prod(shape) for _, shape, _ in source)
    bounded = sorted(((_score_bound(src_numels, len(source), spec.tensors), name, spec) for name, spec in specs),
                     key=lambda b: -b[0])
    out = []
    for bound, name, spec in bounded:
        if top and len(out) >= top and bound < sorted(c.score for c in out)[-top] - 1e-6:
            break  # sorted by bound: no architecture left can reach the top
        r = match_keys(source, spec.tensors, arch=name, rules=rules, renames=rename, structural=False)
        score = 2 * r.coverage * r.used / (r.coverage + r.used) if r.coverage + r.used else 0.0
        out.append(Candidate(name, round(r.coverage, 6), round(r.used, 6), round(score, 6)))
    out.sort(key=lambda c: (-c.score, -c.coverage, c.arch))
    return out


def _score_bound(src_numels: Counter, n_source, wanted) -> float:
    """The best score matching could give: a pair (reshaped or not) always holds equal element counts, and
    ``num_batches_tracked`` targets may be filled."""
    if not wanted or not n_source:
        return 0.0
    tgt_numels = Counter(prod(t.shape) for t in wanted)
    pairs = sum(min(n, src_numels.get(k, 0)) for k, n in tgt_numels.items())
    fills = sum(1 for t in wanted if t.name.rpartition(".")[2] == NBT)
    coverage, used = min(1.0, (pairs + fills) / len(wanted)), pairs / n_source
    return 2 * coverage * used / (coverage + used) if coverage + used else 0.0


def pick(ranking) -> str:
    """The best architecture of a ranking, when it is unambiguous."""
    if not ranking or ranking[0].score == 0:
        raise UsageError("no registered architecture matches this checkpoint's keys; name one with --arch and "
                         "use --rename")
    best = ranking[0]
    ties = [c.arch for c in ranking if c.score == best.score]
    if len(ties) > 1:
        raise UsageError(f"--arch auto is ambiguous: {', '.join(ties[:6])} fit equally well "
                         f"({best.coverage:.0%} of their keys); name one with --arch")
    return best.arch
