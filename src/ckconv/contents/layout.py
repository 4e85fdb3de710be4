"""Training bundles: which part is the model, which the optimizer, and which parameter each optimizer slot is.

Layouts (torch, Lightning, mmengine, fvcore, timm, free-form) are recognised by their keys; slot names come from
:mod:`ckconv.contents.optimizer_slots` (``param_names``, or a fit of each param group by state shapes that is proven
unique). With ``--arch`` a bundle is written in the torch layout, ``{'model': sd, 'optimizer': osd, ...}``
(:func:`standard_layout`), whatever layout it was read in. Everything here works on checkpoint trees: no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UsageError
from ..tree import is_flat_state_dict
from .optimizer_slots import resolve
from .unwrap import EMA_KEYS, model_state_dict, unwrap

LAYOUTS = [  # (name, keys that identify it)
    ("lightning", {"state_dict", "pytorch-lightning_version"}),
    ("lightning", {"state_dict", "optimizer_states"}),
    ("mmengine", {"meta", "state_dict"}),
    ("timm", {"state_dict", "arch"}),
    ("fvcore", {"model", "iteration"}),
]


SCHEDULERS = frozenset({"scheduler", "schedulers", "lr_scheduler", "lr_schedulers", "param_schedulers"})
SCALARS = frozenset({int, float, str, bool})


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
    problem: str | None = None  # why the slots have no names (an ambiguous fit, state that does not fit)

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


def resolve_names(osd, model_sd: dict | None, frozen=()):
    """-> (slot index -> name, how, subset); names stay empty unless proven (see :func:`ckconv.contents.optimizer_slots.resolve`)."""
    res = resolve(osd, model_sd, frozen)
    return res.names, res.how, res.subset


def layout_of(root) -> str:
    if not isinstance(root, dict):
        return "unknown"
    for name, marker in LAYOUTS:
        if all(key in root for key in marker):
            return name
    if is_flat_state_dict(root):
        return "state_dict"
    return "torch" if "model" in root and "optimizer" in root else "custom"


def frozen_names(root) -> list:
    """The ``frozen`` list a bundle records (``save_bundle``, ``convert --freeze``), or []."""
    frozen = root.get("frozen") if isinstance(root, dict) else None
    return list(frozen) if isinstance(frozen, list) and all(isinstance(n, str) for n in frozen) else []


def describe(root) -> BundleInfo:
    """Name the sections of a checkpoint and describe each optimizer found in it."""
    if not isinstance(root, dict):
        return BundleInfo("unknown", None, [], [], None, {})
    layout = layout_of(root)
    try:
        model_sd, model_key = model_state_dict(root)
    except Exception:  # noqa: BLE001 - a bundle without a model is still a bundle
        model_sd, model_key = None, None
    optimizers = []
    flat = layout == "state_dict"  # every value a tensor: no optimizer, no scalar
    for path, node in [] if flat else find_optimizers(root):
        res = resolve(node, model_sd, frozen_names(root))
        optimizers.append(OptimizerInfo(
            path, optimizer_kind(node),
            [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in node["param_groups"]],
            sum(len(g["params"]) for g in node["param_groups"]), len(node["state"]), res.names, res.how,
            res.subset, res.problem))
    schedulers = [] if SCHEDULERS.isdisjoint(root) else [k for k in root if isinstance(k, str) and k in SCHEDULERS]
    ema = next((k for k in ("state_dict_ema", "model_ema", "ema") if k in root), None)
    scalars = {} if flat else {k: v for k, v in root.items() if type(v) in SCALARS and isinstance(k, str)}
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


def find_optimizers(root):
    """[(dotted path, optimizer state_dict)] at the top of a bundle and in its top-level lists."""
    found = []
    for key, value in root.items():
        if not isinstance(value, (dict, list)):  # a tensor of a state_dict: no call
            continue
        if is_optimizer_state(value):
            found.append((str(key), value))
        elif isinstance(value, list):
            found += [(f"{key}.{i}", v) for i, v in enumerate(value) if is_optimizer_state(v)]
    return found


def optimizer_paths(root) -> list:
    """Key paths (tuples) of the optimizer state_dicts at the top of a bundle or in its top-level lists."""
    if not isinstance(root, dict):
        return []
    return [tuple(int(p) if p.isdigit() and isinstance(root.get(path.split(".")[0]), list) else p
                  for p in path.split(".")) for path, _ in find_optimizers(root)]


def drop_optimizers(root):
    """-> (root without its optimizer state_dicts, how many were dropped)."""
    if not isinstance(root, dict):
        return root, 0
    out = type(root)() if type(root) is not dict else {}
    dropped = 0
    for key, value in root.items():
        if is_optimizer_state(value):
            dropped += 1
            continue
        if isinstance(value, list) and value and any(is_optimizer_state(v) for v in value):
            kept = [v for v in value if not is_optimizer_state(v)]
            dropped += len(value) - len(kept)
            if not kept:
                continue
            value = kept
        out[key] = value
    if getattr(root, "__dict__", None):
        out.__dict__.update(root.__dict__)
    return out, dropped


def standard_layout(root, model_key, layout):
    """-> (``{'model': sd, 'optimizer': osd, ...}``, note) from a bundle in any layout.

    The model section (at ``model_key``) becomes ``model``; a single optimizer, wherever it sat, ``optimizer``;
    optimizers from one list (Lightning's ``optimizer_states``) ``optimizers`` when there are several. Lightning's
    ``lr_schedulers`` become ``scheduler`` (or ``schedulers``). Everything else keeps its name and order.
    """
    items = [(k, v) for k, v in root.items() if k != model_key]
    singles = [k for k, v in items if is_optimizer_state(v)]
    lists = [k for k, v in items if isinstance(v, list) and v and all(is_optimizer_state(x) for x in v)]
    out, taken, moved = {"model": root[model_key]}, {model_key}, [f"{model_key} -> model"]
    if len(singles) + len(lists) == 1:
        key = (singles or lists)[0]
        value = root[key]
        name = "optimizers" if isinstance(value, list) and len(value) > 1 else "optimizer"
        out[name] = value[0] if isinstance(value, list) and name == "optimizer" else value
        taken.add(key)
        moved.append(f"{key}{'[0]' if isinstance(value, list) and name == 'optimizer' else ''} -> {name}")
    if layout == "lightning":
        for key, single, several in (("optimizer_states", "optimizer", "optimizers"),
                                     ("lr_schedulers", "scheduler", "schedulers")):
            value = root.get(key)
            if key in taken or not isinstance(value, list):
                continue
            taken.add(key)
            if value:
                name = single if len(value) == 1 else several
                out[name] = value[0] if len(value) == 1 else value
                moved.append(f"{key}{'[0]' if len(value) == 1 else ''} -> {name}")
    for key, value in items:
        if key in taken:
            continue
        if key in out:
            raise UsageError(f"this {layout} bundle has its own {key!r} entry beside the {model_key!r} section; "
                             "writing the torch layout would overwrite it: pass --keep-layout")
        out[key] = value
    if moved == ["model -> model"] or (moved == ["model -> model", "optimizer -> optimizer"]):
        return out, None
    return out, (f"read the {layout} layout; wrote the torch layout {{'model', 'optimizer', ...}}: "
                 f"{', '.join(moved)}, the rest under their names (--keep-layout keeps the {layout} layout)")


def model_paths(root) -> list:
    """Key paths of the model state_dict (the one ``match`` would take) and of EMA copies beside it."""
    try:
        _, _, path = unwrap(root)
    except UsageError:
        return []
    paths = [tuple(path)]
    if isinstance(root, dict) and path:
        paths += [(k,) for k in EMA_KEYS if isinstance(root.get(k), dict) and (k,) != tuple(path)]
    return paths
