"""What ``ckconv scan`` found, in the forms CI gates read: JSON with a summary, and SARIF 2.1.0; the names of files
in a huggingface_hub cache (``org/name@revision:file``); include/exclude patterns.

Pure functions of :class:`ckconv.reports.scanning.ScanResult` lists: nothing here reads a checkpoint.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

__all__ = ["JSON_SCHEMA_VERSION", "RULES", "Selection", "hub_name", "scan_json", "scan_sarif", "summary"]

JSON_SCHEMA_VERSION = 1  # of `scan --json`: raised when a field changes meaning or goes away (new fields do not)
VERDICTS = ("safe", "unknown", "code", "dangerous", "broken", "skipped")
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFORMATION_URI = "https://github.com/ckconv/ckconv"
# One SARIF rule per kind of finding: (id, verdict, level, short description, full description).
RULES = (
    ("CKCONV001", "dangerous", "error", "Checkpoint runs code when loaded",
     "Loading this file with torch.load(weights_only=False) would call a global that runs code (os.system, "
     "builtins.eval, ...). Do not load it; ckconv refuses to convert it."),
    ("CKCONV002", "unknown", "warning", "Checkpoint names globals not known to be benign",
     "torch.load(weights_only=False) would import and call globals ckconv does not know to be benign. Check "
     "where they come from; allow them with --allow-global only if you trust the file."),
    ("CKCONV003", "broken", "error", "Checkpoint is damaged or not readable as one reading",
     "The file fails a check a conversion runs (CRC, bounds, limits, sharded or DCP consistency), or could be "
     "read differently by torch and ckconv. Replace it with an intact copy."),
    ("CKCONV004", "code", "error", "Checkpoint holds code its loader runs",
     "The file holds code that its loader compiles and runs (TorchScript, a torch.export graph). ckconv reads "
     "its weights apart; convert it to safetensors to share the weights without the code."),
)


def hub_name(path) -> str | None:
    """``org/name@revision:file`` for a file under a huggingface_hub cache's ``snapshots/`` (the layout
    ``models--org--name/snapshots/<revision>/<file>``; datasets and spaces alike), else None."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and "--" in parts[i - 1]:
            kind, _, repo = parts[i - 1].partition("--")
            if kind not in ("models", "datasets", "spaces") or not repo:
                return None
            name = repo.replace("--", "/")
            name = name if kind == "models" else f"{kind}/{name}"
            inner = "/".join(parts[i + 2:])
            return f"{name}@{parts[i + 1]}" + (f":{inner}" if inner else "")
    return None


def display_name(path) -> str:
    return hub_name(path) or str(path)


class Selection:
    """``--include``/``--exclude``: fnmatch patterns (``*`` crosses ``/``) matched against a path as scanned and as
    relative to the folder given on the command line. A folder matching an exclude pattern is not entered; a file
    (or a folder read as one checkpoint, through any file in it) is scanned when it matches an include pattern
    (any file, when there are none) and no exclude pattern."""

    def __init__(self, roots, include=(), exclude=()):
        self.roots = [Path(r) for r in roots]
        self.include, self.exclude = tuple(include), tuple(exclude)

    def _names(self, path: Path) -> list:
        names = [path.as_posix()]
        for root in self.roots:
            try:
                names.append(path.relative_to(root).as_posix())
            except ValueError:
                continue
        hub = hub_name(path)
        return names + ([hub.partition(":")[2]] if hub and ":" in hub else [])

    def _matches(self, path: Path, patterns) -> bool:
        return any(fnmatchcase(name, p) for name in self._names(path) for p in patterns)

    def enter(self, folder: Path) -> bool:
        return not self._matches(folder, self.exclude)

    def scan(self, path: Path, members=()) -> bool:
        if self._matches(path, self.exclude):
            return False
        if not self.include:
            return True
        return any(self._matches(p, self.include) for p in [path, *members])


def summary(results) -> dict:
    """{checkpoints, safe, unknown, dangerous, broken, skipped}: counts by verdict (skipped files are no
    checkpoints)."""
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    return {"checkpoints": len(results) - counts["skipped"], **counts}


def scan_json(results, exit_code, version) -> dict:
    """The ``scan --json`` document: schema and ckconv versions, every result (with its display ``name``), the
    summary and the exit code."""
    return {"schema_version": JSON_SCHEMA_VERSION, "ckconv_version": version,
            "results": [{**r.to_dict(), "name": display_name(r.path)} for r in results],
            "summary": summary(results), "exit_code": exit_code}


def scan_root(paths) -> Path:
    """The folder SARIF locations are relative to: the deepest folder holding every path given to scan."""
    folders = [os.path.abspath(p if os.path.isdir(p) else os.path.dirname(p) or ".") for p in paths]
    return Path(os.path.commonpath(folders)) if folders else Path.cwd()


def scan_sarif(results, paths, version) -> dict:
    """A SARIF 2.1.0 log: one run, one rule per kind of finding, one result per finding (a checkpoint that is
    dangerous, names unknown globals, or is broken), located by a URI relative to the scanned root."""
    root = scan_root(paths)
    rules = [{"id": rid, "name": _camel(short), "shortDescription": {"text": short},
              "fullDescription": {"text": full}, "defaultConfiguration": {"level": level},
              "helpUri": f"{INFORMATION_URI}/blob/main/docs/safety.md", "properties": {"verdict": verdict}}
             for rid, verdict, level, short, full in RULES]
    index = {verdict: i for i, (_, verdict, *_rest) in enumerate(RULES)}
    found, artifacts = [], {}
    for r in results:
        kinds = [v for v in ("dangerous", "unknown") if r.globals.get(v)] or ([str(r.verdict)]
                                                                             if r.verdict in index else [])
        for kind in kinds:
            uri = _relative_uri(r.path, root)
            artifacts.setdefault(uri, len(artifacts))
            found.append({"ruleId": RULES[index[kind]][0], "ruleIndex": index[kind], "level": RULES[index[kind]][2],
                          "message": {"text": _message(r, kind)},
                          "locations": [{"physicalLocation": {"artifactLocation": {
                              "uri": uri, "uriBaseId": "SCANROOT", "index": artifacts[uri]}}}],
                          "properties": {"name": display_name(r.path), "format": r.format,
                                         "globals": list(r.globals.get(kind, []))}})
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [{
        "tool": {"driver": {"name": "ckconv", "version": version, "semanticVersion": version,
                            "informationUri": INFORMATION_URI, "rules": rules}},
        "originalUriBaseIds": {"SCANROOT": {"uri": root.as_uri() + "/"}},
        "artifacts": [{"location": {"uri": uri, "uriBaseId": "SCANROOT"}} for uri in artifacts],
        "results": found,
        "properties": {"summary": summary(results)},
    }]}


def _message(result, kind) -> str:
    name = display_name(result.path)
    names = result.globals.get(kind, [])
    if kind == "dangerous":
        return f"{name}: torch.load(weights_only=False) would call {', '.join(names)}"
    if kind == "unknown":
        return f"{name}: names globals ckconv does not know to be benign: {', '.join(names)}"
    detail = result.message[len(result.path) + 2:] if result.message.startswith(f"{result.path}: ") else result.message
    return f"{name}: {detail}"


def _relative_uri(path, root: Path) -> str:
    """``models/a%20b.pth``: the path relative to the root, '/'-separated and percent-encoded as a URI reference."""
    from urllib.parse import quote

    absolute = Path(os.path.abspath(path))
    try:
        rel = PurePosixPath(absolute.relative_to(root).as_posix())
    except ValueError:
        return absolute.as_uri()
    return quote(str(rel), safe="/") if str(rel) != "." else "./"


def _camel(text) -> str:
    return "".join(w[:1].upper() + w[1:] for w in text.replace("-", " ").split())
