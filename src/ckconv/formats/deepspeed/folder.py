"""A DeepSpeed ZeRO checkpoint folder on disk: which tag, which files, and their pickles read as inert data.

``engine.save_checkpoint(dir)`` writes ``dir/latest`` (the tag's name) and ``dir/<tag>/`` holding, per data-parallel
rank, ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` and the model states: one
``mp_rank_00_model_states.pt`` under ZeRO-1/2, ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank under ZeRO-3.
Every file goes through ckconv's restricted unpickler; the DeepSpeed classes these pickles name are recognised by
exact name (:data:`DEEPSPEED_RECORDS`) and turned into plain values, and nothing of DeepSpeed is ever imported.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import CorruptCheckpoint, NotACheckpoint, UnsupportedContent
from ...model import Foreign, TensorRef
from .. import torch_file

LATEST = "latest"
OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL_FILE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
ZERO_STAGE_ENUM = "deepspeed.runtime.zero.config.ZeroStageEnum"
# DeepSpeed's classes that its checkpoints pickle, each a record of data (its pickled state is all there is to it):
# the stage enum (called with its value), the loss scalers and the fragment addresses (state dicts of numbers).
DEEPSPEED_RECORDS = frozenset({
    ZERO_STAGE_ENUM, "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
})
MAX_TAG = 255
MAX_SNIFF_ENTRIES = 1000  # a checkpoint root holds a few tags; sniffing a huge folder stops early


@dataclass
class ZeroFolder:
    """The files of one checkpoint tag, read: ``models`` (one root per model-states file, rank order) and ``optims``
    (each rank's ``optimizer_state_dict``), the ZeRO stage and the data-parallel world size."""

    path: Path
    tag: str
    stage: int
    world: int
    models: list
    optims: list
    globals: list  # (module, qualname) of every global the files' pickles name, for verdicts


def tag_folder(path: Path) -> tuple:
    """(tag folder, tag) for a folder holding ``latest`` or a tag folder itself."""
    latest = path / LATEST
    if latest.is_file() and not _rank_files(path):
        with open(latest, "rb") as f:
            raw = f.read(MAX_TAG + 1)
        try:
            tag = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            tag = ""
        if not tag or len(raw) > MAX_TAG or "/" in tag or "\\" in tag or tag in (".", "..") or "\0" in tag:
            raise CorruptCheckpoint(f"{latest}: does not name a checkpoint tag folder ({raw[:40]!r}); "
                                    "give the tag folder itself (global_stepN)")
        folder = path / tag
        if not folder.is_dir():
            raise NotACheckpoint(f"{latest}: names tag {tag!r}, but {folder} is not a folder; give an existing "
                                 "tag folder (global_stepN)")
        return folder, tag
    return path, path.name


def _rank_files(path: Path) -> list:
    try:
        return [p for p in path.iterdir() if OPTIM_FILE.fullmatch(p.name)]
    except OSError:
        return []


def looks_like(path: Path) -> bool:
    """Cheap sniff: a tag folder with ZeRO optimizer-state files, or a folder holding ``latest`` and a tag folder
    (whatever ``latest`` says: reading checks it)."""
    if not path.is_dir():
        return False
    if _rank_files(path):
        return True
    if not (path / LATEST).is_file():
        return False
    try:
        with os.scandir(path) as entries:
            for i, entry in enumerate(entries):
                if i > MAX_SNIFF_ENTRIES:
                    return False
                if entry.is_dir() and _rank_files(Path(entry.path)):
                    return True
    except OSError:
        return False
    return False


def _ranked(folder: Path, pattern, what) -> list:
    """The files matching ``pattern`` in rank order, checked to be ranks 0..n-1 of model-parallel rank 0."""
    found = {}
    for p in folder.iterdir():
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        rank, mp = int(m.group(1) or 0), int(m.group(2))
        if mp != 0:
            raise UnsupportedContent(f"{p}: model-parallel rank {mp}: ckconv reads data-parallel ZeRO checkpoints "
                                     "only (mp_rank_00); convert tensor or pipeline parallel ones with DeepSpeed's "
                                     "ds_to_universal.py first")
        if rank in found:
            raise CorruptCheckpoint(f"{folder}: two {what} files for rank {rank} ({found[rank].name}, {p.name}); "
                                    "remove the stray one")
        found[rank] = p
    if sorted(found) != list(range(len(found))):
        raise CorruptCheckpoint(f"{folder}: {what} files for ranks {sorted(found)[:8]}, not 0..{len(found) - 1}; a "
                                "rank's file is missing: the checkpoint was not saved completely")
    return [found[r] for r in range(len(found))]


def read_folder(path: Path) -> ZeroFolder:
    folder, tag = tag_folder(path)
    optim_files = _ranked(folder, OPTIM_FILE, "optimizer-states")
    if not optim_files:
        raise NotACheckpoint(f"{folder}: no *_optim_states.pt files; not a DeepSpeed ZeRO checkpoint tag folder")
    names: list = []
    optims = [_read(f, "optimizer_state_dict", names) for f in optim_files]
    stage = zero_stage(optims[0].get("zero_stage"), optim_files[0])
    world = partition_count(optims[0].get("partition_count"), optim_files[0])
    if world != len(optim_files):
        raise CorruptCheckpoint(f"{folder}: the checkpoint was saved by {world} ranks but holds {len(optim_files)} "
                                "*_optim_states.pt files; a rank's file is missing or left over from another run")
    for f, o in zip(optim_files[1:], optims[1:]):
        if zero_stage(o.get("zero_stage"), f) != stage:
            raise CorruptCheckpoint(f"{f}: a different ZeRO stage than rank 0's; the folder mixes two checkpoints")
    model_files = _ranked(folder, MODEL_FILE, "model-states")
    want = world if stage == 3 else 1
    if len(model_files) != want:
        raise CorruptCheckpoint(f"{folder}: {len(model_files)} *_model_states.pt files, a ZeRO-{stage} checkpoint of "
                                f"{world} ranks has {want}; the checkpoint was not saved completely")
    models = [_read(f, None, names) for f in model_files]
    for f, m in zip(model_files, models):
        for key in ("module", "buffer_names", "param_shapes", "shared_params"):
            if key not in m:
                raise CorruptCheckpoint(f"{f}: no {key!r}; not a DeepSpeed model-states file")
    return ZeroFolder(folder, tag, stage, world, models, optims, list(dict.fromkeys(names)))


def _read(path: Path, key, names: list) -> dict:
    """A rank file's pickle (or its ``key`` part), with DeepSpeed's records turned into plain values; the globals
    it names are added to ``names``."""
    ckpt = torch_file.read(path)
    names.extend(ckpt.globals)
    root = ckpt.root
    if not isinstance(root, dict) or (key is not None and not isinstance(root.get(key), dict)):
        raise NotACheckpoint(f"{path}: not a DeepSpeed checkpoint file (no {key or 'state'} dict)")
    return plain(root[key] if key is not None else root, path)


def plain(node, path):
    """DeepSpeed's records as plain values: the stage enum its int, the others their state dicts.

    A record of any other class is left as the inert record it is (client state may hold anything)."""
    if isinstance(node, Foreign) and node.class_name in DEEPSPEED_RECORDS:
        if node.class_name == ZERO_STAGE_ENUM:
            return zero_stage(node, path)
        if not isinstance(node.state, dict) or node.args or node.listitems or node.dictitems:
            raise CorruptCheckpoint(f"{path}: a {node.class_name} record that DeepSpeed never writes")
        return {k: plain(v, path) for k, v in node.state.items()}
    if type(node) in (dict, list, tuple) or (isinstance(node, dict) and type(node).__module__ == "collections"):
        if isinstance(node, dict):
            out = type(node)()
            for k, v in node.items():
                out[k] = plain(v, path)
            return out
        return type(node)(plain(v, path) for v in node)
    return node


def zero_stage(value, path) -> int:
    if isinstance(value, Foreign) and value.class_name == ZERO_STAGE_ENUM and not value.newobj:
        value = value.args[0] if len(value.args) == 1 and not value.kwargs else None
    if type(value) is not int or value not in (1, 2, 3):
        raise NotACheckpoint(f"{path}: no ZeRO stage 1, 2 or 3 recorded (zero_stage); not a ZeRO checkpoint that "
                             "ckconv reads (DeepSpeed's bf16 optimizer without ZeRO is not supported)")
    return value


def partition_count(value, path) -> int:
    """The data-parallel world size: ZeRO-1/2 record it per parameter group (the largest counts)."""
    counts = value if isinstance(value, list) else [value]
    if not counts or any(type(c) is not int or not 1 <= c <= 1 << 20 for c in counts):
        raise CorruptCheckpoint(f"{path}: partition_count {str(value)[:60]} is not a world size")
    if len(set(counts)) != 1:
        raise UnsupportedContent(f"{path}: parameter groups partitioned over different world sizes (mixture of "
                                 "experts); convert with DeepSpeed's ds_to_universal.py first")
    return counts[0]


def flat_tensor(value, what) -> TensorRef:
    """A 1-D contiguous tensor (a flat partition or one of its optimizer moments)."""
    if not isinstance(value, TensorRef) or len(value.shape) != 1 or not value.is_contiguous:
        raise CorruptCheckpoint(f"{what} is not a flat tensor")
    return value
