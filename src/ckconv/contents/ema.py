"""``--ema``: the model state_dict with every tensor an EMA tracks replaced by its EMA value.

The same names as without ``--ema``, and no EMA entry left over. The layouts, as their writers save them:

* **LitEma** (Stable Diffusion, many Lightning projects): inside the model state_dict, buffers
  ``<prefix>.<parameter name with the dots removed>`` plus ``<prefix>.decay`` and ``<prefix>.num_updates``;
  the shadows track the parameters of one submodule (``model.``), found by the names they fit.
* **timm** (``CheckpointSaver``): a ``state_dict_ema`` section with the model's own names.
* **AveragedModel** (``torch.optim.swa_utils``): a section whose names carry ``module.`` plus ``n_averaged``.
* **mmengine** (``EMAHook``): ``ema_state_dict`` (``module.`` names, ``steps``). The hook swaps the two before
  saving, so ``state_dict`` already holds the EMA values and ``ema_state_dict`` the raw ones; ``--ema`` keeps
  ``state_dict`` and leaves the raw copy out.

A checkpoint without an EMA is refused, and so is an EMA that does not fit the model (a name it lacks, another
shape): the output is the EMA model or nothing.
"""

from __future__ import annotations

from collections import Counter

from ..errors import UsageError
from ..model import TensorRef
from ..tree import is_flat_state_dict
from .unwrap import EMA_KEYS, replace, unwrap

LITEMA_BOOKKEEPING = ("decay", "num_updates")
AVERAGED_BOOKKEEPING = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel
MMENGINE_BOOKKEEPING = ("steps",)  # mmengine.model.BaseAveragedModel
SECTION_KEYS = EMA_KEYS + ("ema_state_dict", "swa_model", "averaged_model")
SHOWN = 5


def refuse_section(section):
    if section is not None:
        raise UsageError("--ema finds the model and its EMA itself; drop --section (or drop --ema and name the EMA "
                         "section with --section)")


def litema_prefixes(sd: dict) -> list:
    """Prefixes ``p`` of LitEma modules inside a flat state_dict: ``p.decay`` and ``p.num_updates`` are tensors and
    every other ``p.*`` name is one dotless component (a shadow)."""
    out = []
    for name in sd:
        if not name.endswith(".num_updates"):
            continue
        prefix = name[: -len(".num_updates")]
        if not isinstance(sd.get(prefix + ".decay"), TensorRef):
            continue
        children = [n[len(prefix) + 1:] for n in sd if n.startswith(prefix + ".")]
        if all("." not in c for c in children) and len(children) > len(LITEMA_BOOKKEEPING):
            out.append(prefix)
    return out


def shadow_names(sd: dict) -> set:
    """Every LitEma entry of a state_dict (shadows and bookkeeping): buffers, never parameters an optimizer holds."""
    return {n for p in litema_prefixes(sd) for n in sd if n.startswith(p + ".")}


def apply(root):
    """-> (new root, note): ``root`` with the EMA values in the model state_dict and the EMA entries left out."""
    flat, where, path = unwrap(root)
    if where.split(".")[-1] in SECTION_KEYS or "n_averaged" in flat:  # the EMA is all there is
        return _only_section(root, flat, path)
    prefixes = litema_prefixes(flat)
    if prefixes:
        if len(prefixes) > 1:
            raise UsageError(f"--ema: the state_dict at {where} holds {len(prefixes)} LitEma modules "
                             f"({', '.join(prefixes[:SHOWN])}); convert without --ema or pick one with --section")
        new, note = _litema(flat, prefixes[0], where)
        return replace(root, path, new), note
    section = _ema_section(root, path)
    if section is None:
        raise UsageError(f"--ema: this checkpoint holds no EMA weights (no LitEma buffers in the state_dict at {where}"
                         f", no {', '.join(SECTION_KEYS[:4])}, ... section); convert without --ema")
    key, ema = section
    return _from_section(root, flat, path, key, ema)


def _litema(sd, prefix, where):
    shadows = {n[len(prefix) + 1:]: n for n in sd if n.startswith(prefix + ".")
               and n[len(prefix) + 1:] not in LITEMA_BOOKKEEPING}
    owner = _litema_owner(sd, prefix, shadows)
    fitted = {}
    for name in sd:
        if name.startswith(owner) and not name.startswith(prefix + "."):
            shadow = shadows.get(name[len(owner):].replace(".", ""))
            if shadow is not None:
                if shadow in fitted.values():
                    raise UsageError(f"--ema: LitEma shadow {shadow} fits two tensors of the model; the names are "
                                     "ambiguous without their dots")
                fitted[name] = shadow
    _check_fit([(n, sd[n], sd[s]) for n, s in fitted.items()], set(shadows.values()) - set(fitted.values()), where)
    new = type(sd)() if type(sd) is not dict else {}
    for name, value in sd.items():
        if not name.startswith(prefix + "."):
            new[name] = sd[fitted[name]] if name in fitted else value
    return new, (f"--ema: {len(fitted)} tensors under {owner or '<root>'} replaced by their LitEma values "
                 f"(from {prefix}); left out {len(shadows) + len(LITEMA_BOOKKEEPING)} EMA entries")


def _litema_owner(sd, prefix, shadows):
    """The prefix (``model.``) of the submodule the shadows track: the one most model names fit under."""
    votes = Counter()
    for name in sd:
        if name.startswith(prefix + "."):
            continue
        parts = name.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]).replace(".", "") in shadows:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
    if not votes:
        raise UsageError(f"--ema: the LitEma at {prefix} tracks no tensor of this state_dict; convert without --ema")
    return votes.most_common(1)[0][0]


def _ema_section(root, model_path):
    if not isinstance(root, dict):
        return None
    for key in SECTION_KEYS:
        value = root.get(key)
        if isinstance(value, dict) and (key,) != tuple(model_path) and is_flat_state_dict(_strip(value)[0]):
            return key, value
    for key, value in root.items():  # an AveragedModel under a name of the user's choosing
        if (key,) != tuple(model_path) and isinstance(value, dict) and "n_averaged" in value:
            return key, value
    return None


def _strip(ema: dict):
    """-> ({model name: tensor}, layout name): bookkeeping left out, ``module.`` removed when every name has it."""
    keys = [k for k in ema if isinstance(k, str)]
    kind = "timm"
    if "n_averaged" in ema:
        kind = "AveragedModel"
    elif "steps" in ema and all(k.startswith("module.") for k in keys if k != "steps"):
        kind = "mmengine"
    drop = {"AveragedModel": AVERAGED_BOOKKEEPING, "mmengine": MMENGINE_BOOKKEEPING}.get(kind, ())
    names = [k for k in keys if k not in drop]
    cut = len("module.") if names and all(k.startswith("module.") for k in names) else 0
    return {k[cut:]: ema[k] for k in names}, kind


def _from_section(root, flat, path, key, ema):
    values, kind = _strip(ema)
    _check_fit([(n, flat[n], v) for n, v in values.items() if n in flat], set(values) - set(flat),
               ".".join(map(str, path)) or "<root>")
    if kind == "mmengine":  # EMAHook saved the EMA values in state_dict already (docstring)
        new = flat
        how = "state_dict already holds them (mmengine's EMAHook swaps before saving)"
    else:
        new = type(flat)() if type(flat) is not dict else {}
        for name, value in flat.items():
            new[name] = values.get(name, value)
        how = f"{len(values)} tensors replaced by their {kind} EMA values"
    out = replace(root, path, new)
    out = {k: v for k, v in out.items() if k != key} if type(out) is dict else _without(out, key)
    return out, f"--ema: {how}; left out the EMA section {key}"


def _only_section(root, flat, path):
    """The EMA is the only state_dict there is: its values under the model's names, bookkeeping left out."""
    values, kind = _strip(flat)
    return replace(root, path, values), f"--ema: the {kind} EMA at {'.'.join(map(str, path)) or '<root>'} is the only model"


def _without(mapping, key):
    copy = type(mapping)()
    for k, v in mapping.items():
        if k != key:
            copy[k] = v
    if getattr(mapping, "__dict__", None):
        copy.__dict__.update(mapping.__dict__)
    return copy


def _check_fit(pairs, unplaced: set, where):
    """Every EMA tensor takes the place of one model tensor of the same shape and dtype, or the EMA is refused.

    ``pairs``: [(model name, model value, EMA value)]; ``unplaced``: EMA names that fit no model name."""
    if unplaced:
        shown = ", ".join(sorted(unplaced)[:SHOWN])
        raise UsageError(f"--ema: {len(unplaced)} EMA tensors fit no tensor of the model at {where} ({shown}"
                         f"{', ...' if len(unplaced) > SHOWN else ''}); the EMA belongs to another model")
    for name, a, b in pairs:
        if not (isinstance(a, TensorRef) and isinstance(b, TensorRef)) or tuple(a.shape) != tuple(b.shape) \
                or a.dtype != b.dtype:
            raise UsageError(f"--ema: the EMA value of {name} is {_shape(b)}, the model's is {_shape(a)}; "
                             "the EMA belongs to another model")


def _shape(value):
    return f"{value.dtype}{list(value.shape)}" if isinstance(value, TensorRef) else type(value).__name__
