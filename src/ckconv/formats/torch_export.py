"""Built-in format plugin: ``torch.export.save`` archives (``.pt2``), read for the weights.

A ``.pt2`` is a zip archive holding the exported program's graph as JSON (``models/<name>.json``), and the state_dict
as raw tensor records (``data/weights/weight_N``) described by ``data/weights/model_weights_config.json``: for each
state_dict name its record, dtype, sizes, strides and storage offset. Reading takes that description and the bytes;
the graph is never deserialised, only its ``module_call_graph`` is read, to put the names in ``model.state_dict()``
order (each module's parameters, then its buffers, module by module). The graph is code: the checkpoint says so
(``Checkpoint.code``), and ``scan`` gives such a file a verdict of its own. Read only; checked against torch 2.14.1.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .. import dtypes
from ..errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint, UnsupportedContent
from ..hookspecs import hookimpl
from ..model import Checkpoint, Storage, TensorRef
from ..storage.zipdir import sniffed_names
from ..storage.zipio import ZipRecords
from .base import ReadOnlyFormat, guarded
from .safetensors_file import parse_json
from .torch_archive import ZIP_MAGIC, top_folder

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
MAX_JSON = 64 << 20  # bytes of JSON read for the weights' description and the module order
MAX_OBJECTS = 4_000_000
# torch/_export/serde/schema.py ScalarType -> ckconv's dtype names
SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
                9: "complex32", 10: "complex64", 11: "complex128", 12: "bool", 13: "bfloat16", 28: "uint16",
                29: "float8_e4m3fn", 30: "float8_e5m2", 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz",
                33: "float8_e8m0fnu", 34: "uint32", 35: "uint64"}
STRIDED = 7  # schema Layout.Strided


def sniff(path: Path, head: bytes) -> bool:
    if path.is_dir() or not head.startswith(ZIP_MAGIC):
        return False
    try:
        names = sniffed_names(path)
    except Exception:  # noqa: BLE001 - not a zip this plugin reads; another plugin may say why
        return False
    top = top_folder(names)
    return top is not None and top + "archive_format" in names and top + WEIGHTS_CONFIG in names


def read(path: Path) -> Checkpoint:
    records = ZipRecords(path)
    top = top_folder(list(records.records))
    if top is None or records.read(top + "archive_format", limit=16).strip() != b"pt2":
        raise NotACheckpoint(f"{path}: not a torch.export archive (no pt2 archive_format)")
    if top + "data.pkl" in records.records:  # (any other spelling is refused by the lookup itself)
        raise CorruptCheckpoint(f"{path}: a torch.export archive holding a data.pkl, which torch.load reads as a "
                                "torch.save file; refusing a file with two readings (re-save the original)")
    config = _json(records, top + WEIGHTS_CONFIG, path).get("config")
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{path}: {WEIGHTS_CONFIG} has no config mapping")
    storages: dict = {}
    state = OrderedDict()
    for name, entry in config.items():
        state[name] = _tensor(records, top, name, entry, storages, path)
    state = _module_order(state, _module_fqns(records, top, path))
    models = [n[len(top):] for n in records.records if n.startswith(top + "models/") and n.endswith(".json")]
    return Checkpoint(root=state, format="torch-export", path=str(path), code=models,
                      notes=[f"read the state_dict of a torch.export archive; its graph ({', '.join(models[:3])}) "
                             "is code and was not loaded"])


def _json(records, name, path):
    if name not in records.records:
        raise CorruptCheckpoint(f"{path}: torch.export archive without {name}")
    size = records.records[name][1]
    if size > MAX_JSON:
        raise LimitExceeded(f"{path}: {name} holds {size} bytes, over ckconv's {MAX_JSON}-byte limit")
    return parse_json(records.read(name, limit=MAX_JSON), MAX_OBJECTS,
                      LimitExceeded(f"{path}: {name} holds more than {MAX_OBJECTS} objects"), f"{path}: {name}")


def _ints(values, what, name, path):
    try:
        out = [v["as_int"] for v in values]
    except (TypeError, KeyError):
        raise UnsupportedContent(f"{path}: weight {name!r:.80} has symbolic {what}; ckconv reads concrete "
                                 "tensors only") from None
    if not all(type(v) is int and v >= 0 for v in out):
        raise CorruptCheckpoint(f"{path}: weight {name!r:.80} has malformed {what}")
    return out


def _tensor(records, top, name, entry, storages, path) -> TensorRef:
    if not isinstance(name, str) or not isinstance(entry, dict) or not isinstance(entry.get("tensor_meta"), dict):
        raise CorruptCheckpoint(f"{path}: malformed entry {name!r:.80} in {WEIGHTS_CONFIG}")
    if entry.get("use_pickle"):
        raise UnsupportedContent(f"{path}: weight {name!r:.80} is stored as a pickle (a tensor subclass); ckconv "
                                 "reads plain tensors of a torch.export archive only")
    meta = entry["tensor_meta"]
    dtype = SCALAR_TYPES.get(meta.get("dtype"))
    if dtype is None or meta.get("layout") != STRIDED:
        raise UnsupportedContent(f"{path}: weight {name!r:.80} has dtype code {meta.get('dtype')!r:.20} and "
                                 f"layout {meta.get('layout')!r:.20}; ckconv reads strided tensors of known dtypes")
    shape = _ints(meta.get("sizes"), "sizes", name, path)
    stride = _ints(meta.get("strides"), "strides", name, path)
    (offset,) = _ints([meta.get("storage_offset")], "storage offset", name, path)
    record = top + "data/weights/" + str(entry.get("path_name"))
    if len(shape) != len(stride) or record not in records.records:
        raise CorruptCheckpoint(f"{path}: weight {name!r:.80} names no record of the archive, or its strides "
                                "do not fit its sizes")
    start, size, crc = records.records[record][:3]
    if record not in storages:
        storages[record] = Storage(record, dtype, size, path=str(path), offset=start, crc=crc, label=record)
    storage = storages[record]
    item = dtypes.itemsize(dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else offset - 1
    if storage.dtype != dtype or (last + 1) * item > size or size % item:
        raise CorruptCheckpoint(f"{path}: weight {name!r:.80} reaches past its record, or shares it under "
                                "another dtype")
    return TensorRef(storage, dtype, shape, stride, offset)


def _module_fqns(records, top, path) -> list:
    """Module names in ``named_modules()`` order, from the graph's module_call_graph; [] when absent."""
    for name in records.records:
        if name.startswith(top + "models/") and name.endswith(".json"):
            graph = _json(records, name, path).get("graph_module")
            calls = graph.get("module_call_graph") if isinstance(graph, dict) else None
            if isinstance(calls, list):
                return [c["fqn"] for c in calls if isinstance(c, dict) and isinstance(c.get("fqn"), str)]
    return []


def _module_order(state: OrderedDict, fqns: list) -> OrderedDict:
    """``model.state_dict()`` order: module by module (``fqns``), parameters before buffers within each (the
    config lists every parameter first, then every buffer); names of no listed module keep their place after."""
    rank = {fqn: i for i, fqn in enumerate(fqns)}
    position = {name: i for i, name in enumerate(state)}

    def key(name):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        return rank.get(module, len(rank)), position[name]

    return OrderedDict((name, state[name]) for name in sorted(state, key=key))


class TorchExportFormat(ReadOnlyFormat):
    name = "torch-export"
    description = "torch.export.save archives (.pt2), read for their state_dict; the graph is never loaded"
    what = "torch.export archives"

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(path, head)

    def read(self, path: Path) -> Checkpoint:
        return guarded(read, path)


@hookimpl
def ckconv_register_formats(register):
    register(TorchExportFormat())
