"""Training bundles: which part is the model, which the optimizer, and which parameter each optimizer slot is.

torch optimizers key their state by parameter index. ckconv recovers names for those indices from
``param_names`` (optimizers built from ``named_parameters()``) or, failing that, by aligning the optimizer's
indices with the model's parameters in order, verified by state shapes (``exp_avg`` has its parameter's shape).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import UsageError
from .model import TensorRef
from .tree import is_flat_state_dict

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

LAYOUTS = [  # (name, keys that identify it)
    ("lightning", {"state_dict", "pytorch-lightning_version"}),
    ("lightning", {"state_dict", "optimizer_states"}),
    ("mmengine", {"meta", "state_dict"}),
    ("timm", {"state_dict", "arch"}),
    ("fvcore", {"model", "iteration"}),
]


@dataclass
class OptimizerInfo:
    path: str  # where the optimizer state_dict sits, e.g. "optimizer" or "optimizer_states.0"
    kind: str  # Adam, AdamW, SGD, ... (inferred from hyper-parameters and state)
    hyperparameters: list  # one dict per param group, without "params"
    params: int  # parameter slots across groups
    with_state: int  # slots that have state
    names: dict = field(default_factory=dict)  # index -> parameter name (when resolved)
    how: str = ""  # "param_names", "shapes (unique)", "shapes (ambiguous)", "unresolved"
    subset: bool = False  # the optimizer covers only some of the model's parameters

    def to_dict(self):
        d = asdict(self)
        d["names"] = {str(k): v for k, v in self.names.items()}
        return d


@dataclass
class BundleInfo:
    layout: str
    model: str | None
    optimizers: list
    schedulers: list
    ema: str | None
    scalars: dict

    def to_dict(self):
        d = asdict(self)
        d["optimizers"] = [o.to_dict() for o in self.optimizers]
        return d


def is_optimizer_state(node) -> bool:
    return (isinstance(node, dict) and isinstance(node.get("state"), dict)
            and isinstance(node.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in node["param_groups"]))


def optimizer_kind(osd) -> str:
    groups = osd["param_groups"]
    keys = set().union(*(g.keys() for g in groups)) if groups else set()
    state_keys = set().union(*(s.keys() for s in osd["state"].values() if isinstance(s, dict))) if osd["state"] else set()
    if "betas" in keys or {"exp_avg", "exp_avg_sq"} <= state_keys:
        if any(g.get("decoupled_weight_decay") for g in groups):
            return "AdamW"
        return "Adam" if "decoupled_weight_decay" in keys else "Adam/AdamW"
    if "nesterov" in keys or "momentum_buffer" in state_keys:
        return "SGD"
    if "centered" in keys:
        return "RMSprop"
    if "lr_decay" in keys:
        return "Adagrad"
    if "rho" in keys:
        return "Adadelta"
    return "unknown"


def model_parameters(model_sd: dict) -> list:
    """[(name, shape)] of the entries that are parameters: state_dict order minus the known buffers."""
    out = []
    for name, ref in model_sd.items():
        if not isinstance(ref, TensorRef) or name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES:
            continue
        if not (ref.dtype.startswith(("float", "bfloat", "complex"))):
            continue
        out.append((name, tuple(ref.shape)))
    return out


def _state_shape(state):
    if not isinstance(state, dict):
        return None
    for key in ("exp_avg", "momentum_buffer", "square_avg", "sum", "exp_avg_sq", "acc_delta", "ax", "prev"):
        value = state.get(key)
        if isinstance(value, TensorRef):
            return tuple(value.shape)
    return None


def _align(slots, params, reverse=False):
    """Monotone alignment of optimizer slots [(index, shape or None)] onto params [(name, shape)]."""
    order_s = list(reversed(slots)) if reverse else slots
    order_p = list(reversed(params)) if reverse else params
    out, j = {}, 0
    for idx, shape in order_s:
        while j < len(order_p) and shape is not None and order_p[j][1] != shape:
            j += 1
        if j >= len(order_p):
            return None
        out[idx] = order_p[j][0]
        j += 1
    return out


def resolve_names(osd, model_sd: dict | None):
    """-> (index -> name, how, subset)."""
    slots = [(i, _state_shape(osd["state"].get(i))) for g in osd["param_groups"] for i in g["params"]]
    names = {}
    for g in osd["param_groups"]:
        pn = g.get("param_names")
        if isinstance(pn, list) and len(pn) == len(g["params"]):
            names.update(zip(g["params"], pn))
    if len(names) == len(slots) and slots:
        params = {n for n, _ in model_parameters(model_sd)} if model_sd else set()
        return names, "param_names", bool(params) and len(set(names.values()) & params) < len(params)
    if not model_sd:
        return {}, "unresolved", False
    params = model_parameters(model_sd)
    if len(slots) == len(params) and all(s is None or s == p[1] for (_, s), p in zip(slots, params)):
        return {i: p[0] for (i, _), p in zip(slots, params)}, "parameter order (shapes agree)", False
    first, last = _align(slots, params), _align(slots, params, reverse=True)
    if first is None:
        return {}, "unresolved", False
    how = "shapes (unique)" if first == last else "shapes (ambiguous: several parameter subsets fit)"
    return first, how, True


def describe(root) -> BundleInfo:
    """Name the sections of a checkpoint and describe each optimizer found in it."""
    from .sections import model_state_dict

    if not isinstance(root, dict):
        return BundleInfo("unknown", None, [], [], None, {})
    keys = set(root)
    layout = "state_dict" if is_flat_state_dict(root) else "custom"
    for name, marker in LAYOUTS:
        if marker <= keys:
            layout = name
            break
    else:
        if layout == "custom" and {"model", "optimizer"} <= keys:
            layout = "torch"
    try:
        model_sd, model_key = model_state_dict(root)
    except Exception:  # noqa: BLE001 - a bundle without a model is still a bundle
        model_sd, model_key = None, None
    optimizers = []
    for path, node in _find_optimizers(root):
        names, how, subset = resolve_names(node, model_sd)
        optimizers.append(OptimizerInfo(
            path, optimizer_kind(node),
            [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in node["param_groups"]],
            sum(len(g["params"]) for g in node["param_groups"]), len(node["state"]), names, how, subset))
    schedulers = [k for k in root if k in ("scheduler", "lr_scheduler", "lr_schedulers", "param_schedulers")]
    ema = next((k for k in ("state_dict_ema", "model_ema", "ema") if k in root), None)
    scalars = {k: v for k, v in root.items() if isinstance(k, str) and type(v) in (int, float, str, bool)}
    return BundleInfo(layout, model_key, optimizers, schedulers, ema, scalars)


def optimizer_namer(root):
    """A ``structure.encode`` namer: optimizer state tensors named by their parameter, not their slot index."""
    if not isinstance(root, dict):
        return None
    table = {}
    for info in describe(root).optimizers:
        prefix = tuple(int(p) if p.isdigit() else p for p in info.path.split("."))
        for idx, name in info.names.items():
            table[prefix + ("state", idx)] = f"{info.path}.state.{name}"
    if not table:
        return None

    def namer(path):
        for cut in (len(path) - 1, len(path) - 2):
            if cut > 0 and path[:cut] in table:
                return ".".join([table[path[:cut]], *map(str, path[cut:])])
        return None

    return namer


def _find_optimizers(root):
    found = []
    for key, value in root.items():
        if is_optimizer_state(value):
            found.append((str(key), value))
        elif isinstance(value, list):
            found += [(f"{key}.{i}", v) for i, v in enumerate(value) if is_optimizer_state(v)]
    return found


# --- writing and restoring bundles from live objects ------------------------------------------------------

def save_bundle(path, *, model=None, optimizer=None, scheduler=None, force=False, **extra):
    """Write ``{'model': sd, 'optimizer': osd, 'scheduler': ..., 'frozen': [...], **extra}`` atomically.

    ``frozen`` lists the parameters with ``requires_grad=False`` (left out when none are) so ``load_bundle`` can
    restore the freeze.
    """
    from .api import save

    bundle = {}
    if model is not None:
        bundle["model"] = model.state_dict()
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            bundle["frozen"] = frozen
    if optimizer is not None:
        bundle["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        bundle["scheduler"] = scheduler.state_dict()
    bundle.update(extra)
    return save(bundle, path, force=force)


def load_bundle(path, model=None, optimizer=None, scheduler=None, strict=True):
    """Restore model weights, the recorded freeze, optimizer and scheduler state; returns the loaded bundle."""
    from .api import load
    from .sections import MODEL_KEYS, OPTIMIZER_KEYS

    bundle = load(path)
    if model is not None:
        sd = next((bundle[k] for k in MODEL_KEYS if isinstance(bundle.get(k), dict)), None)
        if sd is None:
            raise UsageError(f"{path}: no model state_dict found (looked under {', '.join(MODEL_KEYS)})")
        model.load_state_dict(sd, strict=strict)
        frozen = set(bundle.get("frozen", ()))
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
    if optimizer is not None:
        osd = next((bundle[k] for k in OPTIMIZER_KEYS if isinstance(bundle.get(k), dict)), None)
        if osd is not None:
            optimizer.load_state_dict(osd)
    if scheduler is not None and isinstance(bundle.get("scheduler"), dict):
        scheduler.load_state_dict(bundle["scheduler"])
    return bundle



def record_freeze(root, selectors, *, arch=None, arch_options=None):
    """-> (new root, frozen names, note): ``root`` with the parameters under ``selectors`` listed as ``frozen``.

    With ``arch`` the selectors resolve against that architecture's module tree (``features[:10]``); without one
    only dotted names work (``features.0``). A bare state_dict becomes ``{'model': sd, 'frozen': [...]}``.
    """
    from .sections import model_state_dict
    from .selectors import _names, freeze, under
    from .unwrap import replace

    selectors = [selectors] if isinstance(selectors, str) else list(selectors)
    sd, where = model_state_dict(root)
    if arch:
        from . import architectures

        model = architectures.build(arch, arch_options or None)  # on the meta device: no memory, no weights
        selected = set(freeze(model, selectors))
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


def remap_optimizer(osd, slot_names: dict, mapping: dict, target_params: list, target_shapes: dict | None = None):
    """Re-key an optimizer state_dict for a remapped model.

    ``slot_names``: source slot index -> source parameter name (from :func:`resolve_names`);
    ``mapping``: source parameter name -> target parameter name (renames; absent = dropped);
    ``target_params``: target parameter names in ``model.parameters()`` order;
    ``target_shapes``: target name -> shape, to reshape per-parameter state along with a reshaped weight.

    Returns ``(new_osd, report)``. Slot indices follow the target's ``parameters()`` order, so
    ``opt = Adam(model.parameters()); opt.load_state_dict(new_osd)`` works; target parameters that no source
    parameter feeds (a new head) join the last group without state; target parameters fed by a source parameter
    the optimizer did not cover (frozen) stay out of it.
    """
    from collections import OrderedDict

    order = {name: i for i, name in enumerate(target_params)}
    fed_by_source = set(mapping.values())
    state = osd["state"]
    new_state, groups, placed = {}, [], set()
    dropped = []
    for group in osd["param_groups"]:
        members = []
        for slot in group["params"]:
            target = mapping.get(slot_names.get(slot))
            if target is None or target not in order:
                dropped.append(slot_names.get(slot, slot))
                continue
            members.append(order[target])
            placed.add(target)
            if slot in state:
                new_state[order[target]] = _reshape_state(state[slot], (target_shapes or {}).get(target))
        g = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append((g, sorted(members), "param_names" in group))
    fresh = [name for name in target_params if name not in fed_by_source and name not in placed]
    if groups:
        groups[-1][1].extend(order[n] for n in fresh)
        groups[-1][1].sort()
    new_groups = []
    for g, members, had_names in groups:
        if had_names:
            g["param_names"] = [target_params[i] for i in members]
        g["params"] = members
        new_groups.append(g)
    new_osd = type(osd)() if isinstance(osd, OrderedDict) else {}
    new_osd["state"] = {k: new_state[k] for k in sorted(new_state)}
    new_osd["param_groups"] = new_groups
    return new_osd, {"moved": len(new_state), "dropped": dropped, "new_without_state": fresh}


def _reshape_state(slot_state, shape):
    if shape is None or not isinstance(slot_state, dict):
        return slot_state
    out = type(slot_state)()
    for key, value in slot_state.items():
        if isinstance(value, TensorRef) and value.numel == _numel(shape) and value.shape != tuple(shape) \
                and value.is_contiguous and value.shape != ():
            value = TensorRef(value.storage, value.dtype, shape, None, value.offset, value.requires_grad,
                              value.parameter)
        out[key] = value
    return out


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
