"""Built-in format plugin: DeepSpeed ZeRO 1/2/3 checkpoint folders (read only).

A source is the folder ``engine.save_checkpoint(dir)`` wrote (holding ``latest``) or one of its tag folders
(``global_stepN``). It reads as the bundle ``{'model', 'frozen', 'optimizer', 'scheduler', <client state>,
'deepspeed'}``: the model state_dict consolidated the way DeepSpeed's ``zero_to_fp32`` does it (:mod:`.consolidate`),
a torch optimizer state_dict with one slot per parameter in the model's ``named_parameters()`` order, the
``lr_scheduler`` state, the client state given to ``save_checkpoint``, and DeepSpeed's own bookkeeping (version,
config, step counts, ZeRO stage, loss scaler). Tensors stream from the rank files when written; DeepSpeed is never
imported (:mod:`.folder`).
"""

from __future__ import annotations

from pathlib import Path

from ... import tree, tree_keys
from ...errors import UnsupportedContent, UsageError
from ...hookspecs import hookimpl
from ...model import Checkpoint
from ..base import Format, guarded
from .consolidate import (INFO_KEYS, STRUCTURE_KEYS, Layout, frozen_shapes, model_state_dict,
                          optimizer_state_dict)
from .folder import looks_like, read_folder

RESERVED = ("model", "frozen", "optimizer", "scheduler", "deepspeed")


class DeepSpeedFormat(Format):
    name = "deepspeed"
    description = "DeepSpeed ZeRO 1/2/3 checkpoint folders (latest + global_stepN/*_optim_states.pt), read only"
    extensions = ()

    def sniff(self, path: Path, head: bytes) -> bool:
        return looks_like(path)

    def read(self, path: Path) -> Checkpoint:
        return guarded(read_zero, Path(path))

    def write(self, checkpoint, path: Path, options) -> None:
        raise UsageError("ckconv reads DeepSpeed checkpoints but does not write them: pick another --to (DeepSpeed "
                         "loads a torch state_dict with load_state_dict)")


def read_zero(path: Path) -> Checkpoint:
    zf = read_folder(path)
    layout = Layout(zf)
    model = zf.models[0]
    state = model_state_dict(zf, layout)
    shared = set(model["shared_params"])
    frozen = list(frozen_shapes(zf))
    trainable = {p[0] for p in layout.params}
    order = [k for k in state if (k in trainable or k in frozen) and k not in shared]
    root = {"model": state}
    if frozen:
        root["frozen"] = frozen
    root["optimizer"] = optimizer_state_dict(zf, layout, order)
    if model.get("lr_scheduler") is not None:
        root["scheduler"] = model["lr_scheduler"]
    for key, value in model.items():
        if key in STRUCTURE_KEYS or key in INFO_KEYS:
            continue
        if key in RESERVED:
            raise UnsupportedContent(f"{zf.path}: the client state saved with the checkpoint has a key {key!r}, "
                                     "which ckconv's bundle uses itself")
        root[key] = value
    info = {k: model[k] for k in INFO_KEYS if model.get(k) is not None}
    info["zero_stage"] = zf.stage
    if "loss_scaler" in zf.optims[0]:
        info["loss_scaler"] = zf.optims[0]["loss_scaler"]
    root["deepspeed"] = info
    tree.walk(root)
    metadata = {"deepspeed.version": str(model.get("ds_version", "?")), "deepspeed.zero_stage": str(zf.stage),
                "deepspeed.world_size": str(zf.world), "deepspeed.tag": zf.tag}
    return Checkpoint(root=root, format="deepspeed", path=str(zf.path), metadata=metadata,
                      foreign=tree_keys.foreign_objects(root), globals=zf.globals)


@hookimpl
def ckconv_register_formats(register):
    register(DeepSpeedFormat())
