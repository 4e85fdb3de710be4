"""Which model parameter each optimizer slot is, and optimizer state that follows a remapped model.

torch optimizers key their state by slot index. Each param group's ``params`` is an ordered subsequence of the
model's parameters: weight-decay groups (timm's ``create_optimizer_v2``), a backbone and a head at different
learning rates, frozen layers left out. ckconv names the slots from ``param_names`` where torch stored them
(optimizers built from ``named_parameters()``, torch >= 2.6); otherwise it fits every group into the model's
parameters by the shapes of its state (``exp_avg`` has its parameter's shape) and uses the fit only when it is
the only one. Needs names and shapes only: no tensor data is read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..errors import UsageError
from ..model import Storage, TensorRef, gather
from .ema import shadow_names

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# per-parameter state of torch's optimizers: always the parameter's shape
PARAM_SHAPED = ("exp_avg", "momentum_buffer", "square_avg", "sum", "exp_avg_sq", "max_exp_avg_sq", "acc_delta",
                "ax", "prev", "step_size", "exp_inf", "grad_avg")
INTEGER_STATE = ("step",)  # counters, kept in their dtype by every cast
SEARCH_BUDGET = 200_000  # candidate positions tried before giving up on proving a fit unique


@dataclass
class Resolution:
    names: dict  # slot index -> model parameter name (empty unless resolved)
    how: str  # "param_names", "parameter order (shapes agree)", "shapes (unique)", "shapes (ambiguous ...)", ...
    subset: bool = False  # the optimizer covers only some of the model's parameters
    problem: str | None = None  # why the slots have no proven names: ambiguous fit, or state that does not fit
    ambiguous: bool = False  # the problem is only that several fits exist (each slot fits some parameter)


def model_parameters(model_sd: dict) -> list:
    """[(name, shape)] of the entries that are parameters: state_dict order minus the known buffers (EMA shadows
    are buffers too: an optimizer never holds them)."""
    out = []
    shadows = shadow_names(model_sd)
    for name, ref in model_sd.items():
        if not isinstance(ref, TensorRef) or name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES or name in shadows:
            continue
        if not ref.dtype.startswith(("float", "bfloat", "complex")):
            continue
        out.append((name, tuple(ref.shape)))
    return out


def state_shape(state):
    """The shape of a slot's per-parameter state (its parameter's shape), or None for a slot without state."""
    if not isinstance(state, dict):
        return None
    for key in PARAM_SHAPED:
        value = state.get(key)
        if isinstance(value, TensorRef):
            return tuple(value.shape)
    return None


def describe_group(group, index) -> str:
    hyper = ", ".join(f"{k}={group[k]!r}" for k in ("lr", "weight_decay") if k in group)
    return f"param group {index} ({len(group['params'])} parameters{', ' + hyper if hyper else ''})"


def resolve(osd, model_sd: dict | None, frozen=()) -> Resolution:
    """Name every slot of ``osd`` after a parameter of ``model_sd`` ({name: TensorRef}), or say why not.

    ``frozen``: parameter names the bundle records as frozen; tried first as left out of the optimizer.
    """
    groups = osd["param_groups"]
    params = model_parameters(model_sd) if model_sd else None
    total = sum(len(g["params"]) for g in groups)
    by_names = _from_param_names(osd, params)
    if by_names is not None:
        names, problem = by_names
        subset = bool(params) and len(set(names.values())) < len(params)
        return Resolution(names if problem is None else {}, "param_names", subset, problem)
    if params is None:
        return Resolution({}, "unresolved", False, "no model state_dict to name its slots after")
    if total == 0:
        return Resolution({}, "no parameters", False)
    subset = total < len(params)
    frozen = set(frozen or ())
    if frozen and frozen <= {n for n, _ in params}:
        first = _by_shapes(osd, [p for p in params if p[0] not in frozen], subset)
        if first.problem is None:
            first.how += " with the recorded freeze"
            return first
    return _by_shapes(osd, params, subset)


def _from_param_names(osd, params):
    """-> (names, problem) from ``param_names`` when every group has them and each names one model parameter."""
    pairs = []
    for g in osd["param_groups"]:
        pn = g.get("param_names")
        if not isinstance(pn, list) or len(pn) != len(g["params"]) or not all(isinstance(n, str) for n in pn):
            return None
        pairs += zip(g["params"], pn)
    if not pairs:
        return None
    if params is None:
        return {slot: name for slot, name in pairs}, None
    shapes = dict(params)
    by_suffix: dict = {}
    for name in shapes:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(name)
    names = {}
    for slot, pn in pairs:
        name = pn if pn in shapes else None
        if name is None:  # the model was wrapped (``module.``, Lightning's ``model.``) or unwrapped since
            hits = set(by_suffix.get(pn, ()))
            parts = pn.split(".")
            hits |= {s for i in range(1, len(parts)) for s in [".".join(parts[i:])] if s in shapes}
            if len(hits) != 1:
                return None
            name = hits.pop()
        names[slot] = name
    if len(set(names.values())) != len(names):
        return None
    for slot, name in names.items():
        shape = state_shape(osd["state"].get(slot))
        if shape is not None and shape != shapes[name]:
            return names, (f"slot {slot} is {name!r} by its param_names, but its state has shape {list(shape)} "
                           f"and the parameter {list(shapes[name])}: the optimizer was saved with another model")
    return names, None


def _by_shapes(osd, params, subset) -> Resolution:
    groups = osd["param_groups"]
    slots = [[state_shape(osd["state"].get(i)) for i in g["params"]] for g in groups]
    shapes = [s for _, s in params]
    fit = _fit(slots, shapes)
    if fit["solution"] is not None:
        solution = fit["solution"]
        names = {i: params[p][0] for g, placed in zip(groups, solution) for i, p in zip(g["params"], placed)}
        order = len(groups) == 1 and solution[0] == list(range(len(params)))
        return Resolution(names, "parameter order (shapes agree)" if order else "shapes (unique)", subset)
    g, k = fit["group"], fit["slot"]
    where = describe_group(groups[g], g)
    shape = slots[g][k]
    what = f"its slot {groups[g]['params'][k]} ({'no state' if shape is None else f'state shape {list(shape)}'})"
    if fit["kind"] == "no fit":
        return Resolution({}, "unresolved", subset,
                          f"{where} does not fit the model's parameters in order: no parameter is left for {what}; "
                          "the optimizer was saved with another model or a different parameter order")
    names = [params[p][0] for p in fit["candidates"]]
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    reason = ("fits the model's parameters in more than one way" if fit["kind"] == "ambiguous"
              else "has too many possible fits to prove one")
    return Resolution({}, "shapes (ambiguous: several parameter subsets fit)", subset,
                      f"{where} {reason}: {what} could be {listed}", ambiguous=True)


def _greedy(slots, shapes, free, reverse):
    """Earliest (or latest) in-order placement of ``slots`` onto free positions -> (positions, None) or
    (None, the slot that found no place)."""
    n = len(shapes)
    out = [0] * len(slots)
    step = -1 if reverse else 1
    j = n - 1 if reverse else 0
    for k in (range(len(slots) - 1, -1, -1) if reverse else range(len(slots))):
        shape = slots[k]
        while 0 <= j < n and not (free[j] and (shape is None or shapes[j] == shape)):
            j += step
        if not 0 <= j < n:
            return None, k
        out[k] = j
        j += step
    return out, None


def _fit(slots, shapes):
    """Place each group's slots, in order, on distinct positions of ``shapes`` whose shape they hold.

    -> {"solution": [[position per slot] per group]} when exactly one placement exists, otherwise
    {"solution": None, "kind": "no fit" | "ambiguous" | "too many", "group", "slot", "candidates"}.
    Groups whose earliest and latest placements coincide are fixed first (their positions then leave the others);
    what remains is searched, stopping at a second solution or after SEARCH_BUDGET steps.
    """
    free = [True] * len(shapes)
    fixed, lo, hi = {}, {}, {}
    changed = True
    while changed:
        changed = False
        for g, group in enumerate(slots):
            if g in fixed:
                continue
            first, bad = _greedy(group, shapes, free, False)
            if first is None:
                return {"solution": None, "kind": "no fit", "group": g, "slot": bad, "candidates": []}
            lo[g], hi[g] = first, _greedy(group, shapes, free, True)[0]
            if lo[g] == hi[g]:
                fixed[g] = lo[g]
                for p in lo[g]:
                    free[p] = False
                changed = True
    rest = [g for g in range(len(slots)) if g not in fixed]
    seq = [(g, k) for g in rest for k in range(len(slots[g]))]
    found, exhausted = _search(seq, slots, shapes, free, lo, hi)
    if len(found) == 1 and not exhausted:
        placed = dict(fixed)
        for (g, k), p in zip(seq, found[0]):
            placed.setdefault(g, [0] * len(slots[g]))[k] = p
        return {"solution": [placed[g] for g in range(len(slots))]}
    if not found and not exhausted:
        g = rest[0]
        return {"solution": None, "kind": "no fit", "group": g, "slot": 0, "candidates": []}
    if len(found) == 2:
        i = next(i for i, (a, b) in enumerate(zip(*found)) if a != b)
        kind = "ambiguous"
    else:
        i = next(i for i, (g, k) in enumerate(seq) if lo[g][k] != hi[g][k])
        kind = "too many"
    g, k = seq[i]
    shape = slots[g][k]
    candidates = [p for p in range(lo[g][k], hi[g][k] + 1) if free[p] and (shape is None or shapes[p] == shape)]
    return {"solution": None, "kind": kind, "group": g, "slot": k, "candidates": candidates}


def _search(seq, slots, shapes, free, lo, hi):
    """Depth-first placements of ``seq`` [(group, slot)] -> (up to two solutions, whether the budget ran out)."""
    m = len(seq)
    if m == 0:
        return [[]], False
    pos, nxt = [-1] * m, [0] * m

    def start(i):
        g, k = seq[i]
        prev = pos[i - 1] if k else -1
        return max(prev + 1, lo[g][k])

    found, steps, exhausted = [], 0, False
    i, nxt[0] = 0, start(0)
    while i >= 0:
        g, k = seq[i]
        shape = slots[g][k]
        if pos[i] >= 0:
            free[pos[i]] = True
            pos[i] = -1
        p = nxt[i]
        while p <= hi[g][k] and not (free[p] and (shape is None or shapes[p] == shape)):
            p += 1
        steps += p - nxt[i] + 1
        if steps > SEARCH_BUDGET:
            exhausted = True
            break
        if p > hi[g][k]:
            i -= 1
            continue
        pos[i], free[p], nxt[i] = p, False, p + 1
        if i + 1 == m:
            found.append(list(pos))
            if len(found) == 2:
                break
            continue
        i += 1
        nxt[i] = start(i)
    for p in pos:
        if p >= 0:
            free[p] = True
    return found, exhausted


# --- optimizer state for a remapped model ------------------------------------------------------------------

def remap_optimizer(osd, slot_names: dict, mapping: dict, target_params: list, target_shapes: dict | None = None,
                    source_shapes: dict | None = None, restart: dict | None = None):
    """Re-key an optimizer state_dict for a remapped model.

    ``slot_names``: source slot index -> source parameter name (from :func:`resolve`);
    ``mapping``: source parameter name -> target parameter name (renames; absent = dropped);
    ``target_params``: target parameter names in ``model.parameters()`` order;
    ``target_shapes`` / ``source_shapes``: parameter name -> shape, to reshape per-parameter state along with a
    reshaped weight (and to refuse state that would not fit);
    ``restart``: source name -> target name for parameters replaced by one of another shape (a new head): the
    target takes the source's place in its group, without state.

    Returns ``(new_osd, report)``. Each group keeps its hyper-parameters and holds its parameters in the target's
    ``parameters()`` order, numbered as torch numbers them (group by group), so building the optimizer on the
    target model the way it was built on the source and calling ``load_state_dict`` gives every parameter the
    state its source parameter had. Target parameters that no source parameter feeds (a new head) join the last
    group without state; target parameters fed by a source parameter the optimizer did not cover (frozen) stay
    out of it. Raises :class:`UsageError` when some state would not fit its new parameter.
    """
    order = {name: i for i, name in enumerate(target_params)}
    restart = restart or {}
    fed_by_source = set(mapping.values()) | set(restart.values())
    state = osd["state"]
    groups, placed, dropped = [], set(), []
    for group in osd["param_groups"]:
        members = []
        for slot in group["params"]:
            source = slot_names.get(slot)
            target = mapping.get(source)
            if target is None and restart.get(source) in order and restart[source] not in placed:
                members.append((order[restart[source]], None))
                placed.add(restart[source])
                continue
            if target is None or target not in order:
                dropped.append(source if source is not None else slot)
                continue
            members.append((order[target], slot))
            placed.add(target)
        groups.append((group, sorted(members)))
    fresh = [name for name in target_params if name not in fed_by_source and name not in placed]
    if groups:
        groups[-1][1].extend((order[n], None) for n in fresh)
        groups[-1][1].sort(key=lambda m: m[0])
    new_state, new_groups, index = {}, [], 0
    for group, members in groups:
        g = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        ids = []
        for position, slot in members:
            if slot is not None and slot in state:
                source, target = slot_names.get(slot), target_params[position]
                new_state[index] = fit_state(state[slot], source, target, (source_shapes or {}).get(source),
                                             (target_shapes or {}).get(target))
            ids.append(index)
            index += 1
        g["params"] = ids
        if "param_names" in group:
            g["param_names"] = [target_params[p] for p, _ in members]
        new_groups.append(g)
    new_osd = type(osd)() if isinstance(osd, OrderedDict) else {}
    for key, value in osd.items():  # keep any other entry an optimizer stores beside state and param_groups
        new_osd[key] = value
    new_osd["state"] = new_state
    new_osd["param_groups"] = new_groups
    restarted = [t for t in restart.values() if t in placed]
    return new_osd, {"moved": len(new_state), "dropped": dropped, "new_without_state": fresh,
                     "restarted": restarted}


def fit_state(slot_state, source, target, source_shape, target_shape):
    """A slot's state for its new parameter: per-parameter tensors reshaped with it; refuses what cannot fit."""
    if not isinstance(slot_state, dict) or source_shape is None:
        return slot_state
    source_shape = tuple(source_shape) if source_shape is not None else None
    target_shape = tuple(target_shape) if target_shape is not None else source_shape
    out = type(slot_state)() if type(slot_state) is not dict else {}
    for key, value in slot_state.items():
        if isinstance(value, TensorRef) and key not in INTEGER_STATE and value.shape != ():
            shape = tuple(value.shape)
            if shape == source_shape and target_shape != shape:
                value = _reshaped(value, target_shape)
            elif key in PARAM_SHAPED and source_shape is not None and shape != source_shape:
                raise UsageError(f"optimizer state {key!r} of {source!r} has shape {list(shape)}, but the parameter "
                                 f"has {list(source_shape)}: it would not fit {target!r}; write the model without "
                                 "it (--optimizer drop)")
            elif shape != source_shape and target_shape != source_shape:
                raise UsageError(f"optimizer state {key!r} of {source!r} has shape {list(shape)}, which ckconv "
                                 f"cannot reshape along with the parameter ({list(source_shape)} -> "
                                 f"{list(target_shape)}); write the model without it (--optimizer drop)")
        out[key] = value
    return out


def _reshaped(ref: TensorRef, shape):
    if ref.is_contiguous:
        return TensorRef(ref.storage, ref.dtype, tuple(shape), None, ref.offset, ref.requires_grad, ref.parameter)
    data = gather(ref)
    return TensorRef(Storage(f"{ref.storage.key}-reshaped", ref.dtype, len(data), buffer=data), ref.dtype,
                     tuple(shape), None, 0, ref.requires_grad, ref.parameter)
