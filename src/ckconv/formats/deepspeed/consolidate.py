"""Consolidating a ZeRO checkpoint: DeepSpeed's ``zero_to_fp32`` algorithm, streamed, plus the optimizer state.

The model state_dict is exactly what ``get_fp32_state_dict_from_zero_checkpoint`` returns (DeepSpeed 0.19):

* buffers from the model states' ``module`` (``buffer_names``), floating ones cast to float32;
* frozen parameters from ``frozen_param_fragments``: whole under ZeRO-1/2; under ZeRO-3 each rank's fragment, placed
  end to end and cut to the parameter's size;
* trainable parameters from the fp32 master partitions. ZeRO-1/2: per parameter group the ranks'
  ``single_partition_of_fp32_groups`` end to end, each parameter of ``param_shapes`` following the one before
  (plus its ``param_alignment_paddings``). ZeRO-3: each parameter of ``param_shapes`` is cut into
  ``ceil(numel / world)`` elements per rank; each rank holds its cuts end to end in ``fp32_flat_groups``;
* shared (tied) parameters under both names (``shared_params``).

Each parameter's optimizer state comes from the same ranges of the base optimizer's flat state (``exp_avg``,
``exp_avg_sq``: every tensor as long as the partition), its other values (``step``) from its group's. Nothing is
read here: every tensor is a :class:`~.flat.PieceStorage` over the rank files, streamed when written.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from ... import dtypes
from ...contents.cast import cast_floating
from ...errors import CorruptCheckpoint, UnsupportedContent
from ...model import Storage, TensorRef
from .flat import Flat, Piece, tensor_of
from .folder import ZeroFolder, flat_tensor

# What DeepSpeed itself keeps in a model-states file; everything else there is the client state of save_checkpoint
STRUCTURE_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler")
INFO_KEYS = ("ds_version", "ds_config", "global_steps", "global_samples", "skipped_steps", "dp_world_size",
             "mp_world_size", "checkpoint_parallel_dimensions", "data_sampler", "random_ltd",
             "sparse_tensor_module_names")


def _shapes(value, what) -> OrderedDict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CorruptCheckpoint(f"{what} is not a mapping of parameter names to shapes")
    out = OrderedDict()
    for name, shape in value.items():
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise CorruptCheckpoint(f"{what}: {name!r:.80} has no shape")
        out[name] = tuple(shape)
    return out


class Layout:
    """Where every trainable parameter lives in the flat partitions: ``params`` is [(name, shape, group, start)],
    ``group`` indexing the partitions (param groups for ZeRO-1/2, sub-groups for ZeRO-3)."""

    def __init__(self, zf: ZeroFolder):
        self.zf = zf
        groups = zf.models[0]["param_shapes"]
        if not isinstance(groups, list):
            raise CorruptCheckpoint(f"{zf.path}: param_shapes is not a list of groups")
        self.groups = [_shapes(g, f"{zf.path}: param_shapes[{i}]") for i, g in enumerate(groups)]
        self.key = "fp32_flat_groups" if zf.stage == 3 else "single_partition_of_fp32_groups"
        self.partitions = [self._rank_groups(r, o.get(self.key)) for r, o in enumerate(zf.optims)]
        self.params = self._place_zero3() if zf.stage == 3 else self._place_zero2()

    def _rank_groups(self, rank, value) -> list:
        what = f"{self.zf.path}: rank {rank}'s {self.key}"
        if not isinstance(value, list) or (self.zf.stage < 3 and len(value) != len(self.groups)):
            raise CorruptCheckpoint(f"{what} does not hold one flat tensor per parameter group")
        return [flat_tensor(t, f"{what}[{i}]") for i, t in enumerate(value)]

    def _place_zero2(self) -> list:
        """``_zero2_merge_trainable_params``: the groups' parameters one after another, paddings included."""
        paddings = self.zf.optims[0].get("param_alignment_paddings")
        out = []
        for g, shapes in enumerate(self.groups):
            pads = paddings[g] if isinstance(paddings, list) else None
            if pads is not None and (not isinstance(pads, list) or len(pads) != len(shapes)
                                     or not all(type(p) is int and p >= 0 for p in pads)):
                raise CorruptCheckpoint(f"{self.zf.path}: param_alignment_paddings[{g}] does not match the group's "
                                        f"{len(shapes)} parameters")
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                out.append((name, shape, g, offset))
                offset += math.prod(shape) + (pads[i] if pads is not None else 0)
            avail = sum(p[g].shape[0] for p in self.partitions)
            align = 2 * self.zf.world
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise CorruptCheckpoint(f"{self.zf.path}: parameter group {g} holds {avail} elements but its "
                                        f"parameters take {offset}; the partitions do not belong to these shapes")
        return out

    def _place_zero3(self) -> list:
        """``_zero3_merge_trainable_params``: each parameter cut into ``ceil(numel / world)`` per rank."""
        sizes = [t.shape[0] for t in self.partitions[0]]
        if any([t.shape[0] for t in p] != sizes for p in self.partitions):
            raise CorruptCheckpoint(f"{self.zf.path}: the ranks' fp32_flat_groups differ in size")
        out, offset = [], 0
        for g, shapes in enumerate(self.groups):
            for name, shape in shapes.items():
                out.append((name, shape, g, offset))
                offset += math.ceil(math.prod(shape) / self.zf.world)
        if offset != sum(sizes):
            raise CorruptCheckpoint(f"{self.zf.path}: each rank holds {sum(sizes)} elements but the parameters "
                                    f"take {offset}; the partitions do not belong to these shapes")
        return out

    def flats(self, per_rank) -> object:
        """The partition-shaped tensors ``per_rank[r][g]`` arranged for :meth:`pieces`."""
        if self.zf.stage == 3:
            return [Flat(groups, f"{self.zf.path}: rank {r}") for r, groups in enumerate(per_rank)]
        return [Flat([per_rank[r][g] for r in range(self.zf.world)], f"{self.zf.path}: group {g}")
                for g in range(len(self.groups))]

    def pieces(self, flats, group, start, numel) -> list:
        if self.zf.stage < 3:
            return flats[group].pieces(start, numel)
        cut = math.ceil(numel / self.zf.world)
        out, left = [], numel * dtypes.itemsize(flats[0].dtype)
        for flat in flats:  # every rank's cut, end to end, then the padding of the last cut dropped
            for piece in flat.pieces(start, cut):
                take = min(piece.length, left)
                if take:
                    out.append(Piece(piece.storage, piece.offset, take))
                left -= take
        return out


def model_state_dict(zf: ZeroFolder, layout: Layout) -> OrderedDict:
    """The consolidated fp32 state_dict, in the order of the model's own ``state_dict()``."""
    model = zf.models[0]
    module = model["module"]
    names = model["buffer_names"]
    if not isinstance(module, dict) or not isinstance(names, list):
        raise CorruptCheckpoint(f"{zf.path}: module / buffer_names malformed")
    buffers = {k: v for k, v in module.items() if k in names}
    if not all(isinstance(v, TensorRef) for v in buffers.values()):
        raise CorruptCheckpoint(f"{zf.path}: a buffer that is not a tensor")
    buffers, _, _ = cast_floating(buffers, "fp32")
    state = OrderedDict(buffers)
    state.update(_frozen(zf))
    flats = layout.flats(layout.partitions)
    for name, shape, group, start in layout.params:
        dtype = flats[0].dtype
        state[name] = tensor_of(name, dtype, shape, layout.pieces(flats, group, start, math.prod(shape)))
    for alias, name in _shared(zf).items():
        if name in state:
            state[alias] = state[name]
    order = [k for k in module if k in state] + [k for k in state if k not in module]
    return OrderedDict((k, state[k]) for k in order)


def _shared(zf) -> dict:
    shared = zf.models[0]["shared_params"]
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise CorruptCheckpoint(f"{zf.path}: shared_params is not a mapping of names")
    return shared


def frozen_shapes(zf) -> OrderedDict:
    """The frozen parameters' shapes. ZeRO-1 records none (``zero_to_fp32`` then leaves the frozen parameters out);
    its ``module`` holds them whole, so they are the ``module`` entries that are neither buffers, trained
    parameters nor aliases. Under ZeRO-3 ``module`` holds placeholders: a name without values is refused."""
    model = zf.models[0]
    value = model.get("frozen_param_shapes")
    shapes = OrderedDict() if value is None else _shapes(value, f"{zf.path}: frozen_param_shapes")
    known = set(model["buffer_names"]) | set(_shared(zf)) | set(shapes) | {
        n for g in model["param_shapes"] if isinstance(g, dict) for n in g}
    rest = [k for k in model["module"] if k not in known]
    if rest and (zf.stage == 3 or value is not None):
        shown = ", ".join(map(repr, rest[:3]))[:200]
        raise CorruptCheckpoint(f"{zf.path}: the model has {len(rest)} tensor(s) ({shown}) "
                                "that the checkpoint holds no values for (saved with exclude_frozen_parameters?); "
                                "ckconv does not write placeholders")
    for k in rest:
        ref = model["module"][k]
        if not isinstance(ref, TensorRef):
            raise CorruptCheckpoint(f"{zf.path}: module entry {k!r:.80} is not a tensor")
        shapes[k] = ref.shape
    return shapes


def _frozen(zf) -> OrderedDict:
    """``_zero2_merge_frozen_params`` / ``_zero3_merge_frozen_params``."""
    out = OrderedDict()
    for name, shape in frozen_shapes(zf).items():
        fragments = [m.get("frozen_param_fragments") or {} for m in zf.models]
        if zf.stage < 3 and name not in fragments[0]:  # ZeRO-1: the frozen parameter as the module holds it
            fragments = [zf.models[0]["module"]]
        if not all(isinstance(f, dict) and isinstance(f.get(name), TensorRef) for f in fragments):
            raise CorruptCheckpoint(f"{zf.path}: frozen parameter {name!r:.80} has no fragment in every rank's file")
        if zf.stage < 3:
            if fragments[0][name].shape != shape:
                raise CorruptCheckpoint(f"{zf.path}: frozen parameter {name!r:.80} is not of its recorded shape")
            out[name] = fragments[0][name]
            continue
        flat = Flat([flat_tensor(f[name], f"{zf.path}: frozen fragment {name!r:.80}") for f in fragments], name)
        out[name] = tensor_of(name, flat.dtype, shape, flat.pieces(0, math.prod(shape)))
    return out


def optimizer_state_dict(zf: ZeroFolder, layout: Layout, param_order: list) -> dict:
    """A torch optimizer state_dict: slot ``i`` is ``param_order[i]`` (the model's ``named_parameters()``), named in
    each group's ``param_names``."""
    bases = [_base_state(zf, r, o) for r, o in enumerate(zf.optims)]
    groups = bases[0]["param_groups"]
    owner = {}  # partition index -> param group index
    for gi, g in enumerate(groups):
        for i in g["params"]:
            owner[i] = gi
    slot = {name: i for i, name in enumerate(param_order)}
    members = [[] for _ in groups]
    state = {}
    keys, values = _slot_keys(zf, layout, bases)
    flats = {k: layout.flats(v) for k, v in keys.items()}
    for name, shape, part, start in layout.params:
        if part not in owner or name not in slot:
            raise CorruptCheckpoint(f"{zf.path}: parameter {name!r:.80} has no optimizer group or model slot")
        members[owner[part]].append(slot[name])
        if values[part] is None:
            continue
        entry = {}
        for key, value in values[part].items():
            if key in flats:
                f = flats[key]
                entry[key] = tensor_of(f"{name}.{key}", f[0].dtype, shape,
                                       layout.pieces(f, part, start, math.prod(shape)))
            else:
                entry[key] = _own_copy(value)
        state[slot[name]] = entry
    frozen = [slot[n] for n in frozen_shapes(zf) if n in slot]
    if len(groups) == 1:  # torch.optim.AdamW(model.parameters()) lists the frozen parameters too (without state)
        members[0].extend(frozen)
    # param_names as torch >= 2.6 records them for named optimizers: the slots' names travel with the state
    out_groups = [{**{k: v for k, v in g.items() if k not in ("params", "param_names")},
                   "param_names": [param_order[i] for i in sorted(m)], "params": sorted(m)}
                  for g, m in zip(groups, members)]
    return {"state": {i: state[i] for i in sorted(state)}, "param_groups": out_groups}


def _base_state(zf, rank, optim) -> dict:
    base = optim.get("optimizer_state_dict" if zf.stage == 3 else "base_optimizer_state")
    if isinstance(base, list):
        raise UnsupportedContent(f"{zf.path}: an elastic ZeRO checkpoint (optimizer state saved per group, without "
                                 "its param groups), which ckconv does not read; load it in DeepSpeed and save it "
                                 "again with elastic_checkpoint off")
    if not (isinstance(base, dict) and isinstance(base.get("state"), dict)
            and isinstance(base.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in base["param_groups"])):
        raise CorruptCheckpoint(f"{zf.path}: rank {rank}'s base optimizer state is not a torch optimizer state_dict")
    return base


def _slot_keys(zf, layout, bases):
    """({state key: per rank, per partition, the flat tensors}, {partition: rank 0's state}) for the state keys
    whose tensors are as long as the partition (the moments); the other values are per group (``step``)."""
    count = len(layout.partitions[0])
    values = {}
    if not any(base["state"] for base in bases):  # saved before the first step: no state yet, as in torch
        return {}, {part: None for part in range(count)}
    for part in range(count):
        value = bases[0]["state"].get(part)
        if not isinstance(value, dict):
            raise CorruptCheckpoint(f"{zf.path}: no optimizer state for partition {part}")
        values[part] = value
    keys = {}
    for key, value in values[0].items():
        if not (isinstance(value, TensorRef) and len(value.shape) == 1):
            continue
        per_rank = []
        for r, base in enumerate(bases):
            row = []
            for part in range(count):
                t = flat_tensor(base["state"].get(part, {}).get(key), f"{zf.path}: rank {r}'s {key}[{part}]")
                lean = layout.partitions[r][part].shape[0]
                if t.shape[0] < lean:
                    raise CorruptCheckpoint(f"{zf.path}: rank {r}'s {key}[{part}] is shorter than its partition")
                row.append(TensorRef(t.storage, t.dtype, (lean,), offset=t.offset))  # padding past the end dropped
            per_rank.append(row)
        keys[key] = per_rank
    for r, base in enumerate(bases[1:], 1):
        for part in range(count):
            if _digest(base["state"].get(part), keys) != _digest(values[part], keys):
                raise CorruptCheckpoint(f"{zf.path}: rank {r}'s optimizer step counters differ from rank 0's")
    return keys, values


def _digest(entry, skip):
    if not isinstance(entry, dict):
        return None
    return {k: (bytes(v.storage.read(0, v.storage.nbytes)) if isinstance(v, TensorRef) and not v.shape else v)
            for k, v in entry.items() if k not in skip}


def _own_copy(value):
    """A per-parameter copy of a group's value: a 0-d tensor (``step``) gets a storage of its own, since torch
    increments each parameter's step in place."""
    if isinstance(value, TensorRef):
        if value.shape:
            raise CorruptCheckpoint("an optimizer state tensor that is neither a moment nor a scalar")
        size = dtypes.itemsize(value.dtype)
        data = bytes(value.storage.read(value.offset * size, size))
        return TensorRef(Storage(f"step@{id(data)}", value.dtype, size, buffer=data), value.dtype, ())
    return value
