"""The on-disk cache of architecture specs and model-name lists: small JSON files, written atomically.

Where: ``$CKCONV_CACHE_DIR`` (set but empty: no disk cache), else ``$XDG_CACHE_HOME/ckconv``, else
``~/.cache/ckconv``. Entries are keyed by (source, its version, model, builder options) and by ckconv's own spec
format (:data:`FORMAT`), so a new torchvision or a new ckconv never reads an old entry. An entry is checked in full
before it is used (types, shapes, dtype names, unique keys); one that fails is ignored and rebuilt, never trusted.
Nothing here imports torch: a warm cache answers ``ckconv match`` without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from ..dtypes import DTYPES, QUANTIZED

FORMAT = 2  # bump when what a spec holds changes
KINDS = ("parameter", "buffer")
MAX_ENTRY_BYTES = 64 << 20  # a spec of the largest torchvision model is under 1 MiB


def cache_dir() -> Path | None:
    env = os.environ.get("CKCONV_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckconv"


@functools.lru_cache(maxsize=None)
def distribution_version(name: str) -> str:
    """The installed version of a distribution, read from its metadata (no import); '' when not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def options_key(options) -> str:
    return json.dumps(options or {}, sort_keys=True, default=repr)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-+" else "_" for c in str(text))[:120] or "_"


def _root(namespace, version):
    root = cache_dir()
    if root is None:
        return None
    return root / f"specs-v{FORMAT}" / _safe(namespace) / _safe(version or "unversioned")


def spec_path(namespace, version, model, options) -> Path | None:
    root = _root(namespace, version)
    if root is None:
        return None
    key = options_key(options)
    digest = hashlib.sha256(f"{model}\0{key}".encode()).hexdigest()[:12]
    return root / f"{_safe(model)}-{digest}.json"


def names_path(namespace, version) -> Path | None:
    root = _root(namespace, version)
    return None if root is None else root / "_models.json"


# --- reading, always validated --------------------------------------------------------------------------------

def _read(path):
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ENTRY_BYTES + 1)
        if len(raw) > MAX_ENTRY_BYTES:
            return None
        return json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # missing or damaged: the caller rebuilds


def _is_str(x):
    return type(x) is str


_DTYPE_NAMES = frozenset(DTYPES) | frozenset(QUANTIZED)


def _tensors_ok(rows) -> bool:
    """[[name, shape, dtype, kind, module, module_type]]: every field of the right type, keys unique."""
    if type(rows) is not list:
        return False
    names = set()
    for row in rows:  # one plain loop: `--arch auto` checks about 45,000 of these
        if type(row) is not list or len(row) != 6:
            return False
        name, shape, dtype, kind, module, module_type = row
        if type(name) is not str or type(module) is not str or type(module_type) is not str \
                or type(dtype) is not str or dtype not in _DTYPE_NAMES or type(kind) is not str \
                or kind not in KINDS or type(shape) is not list or name in names:
            return False
        for d in shape:
            if type(d) is not int or d < 0:
                return False
        names.add(name)
    return True


def _modules_ok(rows) -> bool:
    if type(rows) is not list:
        return False
    for row in rows:
        if type(row) is not list or len(row) != 2 or type(row[0]) is not str or type(row[1]) is not str:
            return False
    return len({r[0] for r in rows}) == len(rows)


def read_names(namespace, version) -> list | None:
    """The cached model names of a source, or None (absent, damaged, or for another version)."""
    data = _read(names_path(namespace, version))
    if not (isinstance(data, dict) and data.get("ckconv_names") == FORMAT and data.get("source") == namespace
            and data.get("version") == version):
        return None
    names = data.get("models")
    if not isinstance(names, list) or not all(_is_str(n) and n for n in names) or len(set(names)) != len(names):
        return None
    return names


def read_spec(namespace, version, model, options) -> dict | None:
    """-> {"tensors": [[name, shape, dtype, kind, module, module_type]], "modules": [[qual, type]]}
    or {"error": message} for a model known not to build with these options; None when not cached (or damaged)."""
    data = _read(spec_path(namespace, version, model, options))
    arch = f"{namespace}:{model}"
    if not (isinstance(data, dict) and data.get("ckconv_spec") == FORMAT and data.get("arch") == arch
            and data.get("version") == version and data.get("options") == options_key(options)):
        return None
    if "error" in data:
        return {"error": data["error"]} if _is_str(data["error"]) else None
    tensors, modules = data.get("tensors"), data.get("modules")
    if not (_tensors_ok(tensors) and _modules_ok(modules)):
        return None
    known = {r[0] for r in modules}
    if modules and any(r[4] not in known for r in tensors):
        return None
    return {"tensors": tensors, "modules": modules}


# --- writing, atomically ----------------------------------------------------------------------------------------

def _write(path, data):
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(staged, "x", encoding="utf-8") as f:  # made here, exclusively: only then ours to remove
            tmp = staged
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
        tmp = None
    except OSError:
        pass  # a read-only or full cache only costs speed
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass


def write_names(namespace, version, names):
    _write(names_path(namespace, version),
           {"ckconv_names": FORMAT, "source": namespace, "version": version, "models": list(names)})


def write_spec(namespace, version, model, options, tensors=None, modules=None, error=None):
    data = {"ckconv_spec": FORMAT, "arch": f"{namespace}:{model}", "version": version,
            "options": options_key(options)}
    if error is not None:
        data["error"] = str(error)
    else:
        data["tensors"], data["modules"] = tensors, modules
    _write(spec_path(namespace, version, model, options), data)
