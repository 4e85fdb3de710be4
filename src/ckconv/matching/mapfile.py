"""Map files: a :class:`MatchReport` saved by ``match --save-map`` and read back by ``convert --map`` (checked
against the checkpoint and, when it names one, the architecture's spec)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import CkconvError, UsageError
from ..storage.atomic import staged
from ..storage.files import read_capped
from .engine import source_tensors, target_spec
from .report import Filled, KeyEntry, Match, MatchReport

MAP_VERSION = 1
MAX_MAP_BYTES = 64 * 2**20  # a map of 100,000 tensors is a few MB


def map_dict(report: MatchReport) -> dict:
    mapping = report.mapping()
    filled = {f.target for f in report.filled}
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
            report.filled.append(Filled(t))
            continue
        s = e["source"]
        if s not in flat:
            raise UsageError(f"the map takes {t!r} from {s!r}, which this checkpoint does not have (at {where})")
        shape = tuple(e.get("reshape") or flat[s].shape)
        if spec is not None and tuple(spec[t].shape) != shape:
            raise UsageError(f"the map gives {t!r} shape {list(shape)}, {report.arch} wants {list(spec[t].shape)}")
        reshape = tuple(flat[s].shape) if shape != tuple(flat[s].shape) else None
        if reshape is not None and math.prod(reshape) != math.prod(shape):
            raise UsageError(f"the map reshapes {s!r} from {list(reshape)} to {list(shape)}: element counts differ")
        report.matched.append(Match(t, s, "map", shape, (), reshape, 1.0))
    if spec is not None:
        done = set(report.targets)
        report.missing = [KeyEntry(n, v.shape, v.dtype) for n, v in spec.items() if n not in done]
    used = {m.source for m in report.matched}
    report.unexpected = [KeyEntry(k, v.shape, v.dtype) for k, v in flat.items() if k not in used]
    report.target_count = len(report.targets) + len(report.missing)
    return report
