"""Training bundles from and into live objects: ``save_bundle(path, model=..., optimizer=...)`` and ``load_bundle``.

What a bundle holds (layouts, optimizer slot names, the freeze) is read by :mod:`ckconv.contents.layout`.
"""

from __future__ import annotations

from . import tree
from .contents.layout import frozen_names
from .contents.unwrap import OPTIMIZER_KEYS, unwrap
from .errors import UsageError
from .io import read, save


def save_bundle(path, *, model=None, optimizer=None, scheduler=None, force=False, **extra):
    """Write ``{'model': sd, 'optimizer': osd, 'scheduler': ..., 'frozen': [...], **extra}`` atomically.

    ``frozen`` lists the parameters with ``requires_grad=False`` (left out when none are) so ``load_bundle`` can
    restore the freeze.
    """
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
    """Restore model weights, the recorded freeze, optimizer and scheduler state; returns the loaded bundle.

    ``requires_grad`` is set only when the bundle records a freeze (a ``frozen`` list); otherwise the model keeps
    the freeze the caller applied. ``optimizer`` / ``scheduler`` may be lists, for a bundle's ``optimizers`` /
    ``schedulers`` lists.
    """
    ckpt = read(path)
    if model is None:
        bundle = tree.materialize(ckpt.root)
    else:  # the model is where every command finds it (contents.unwrap), materialised with the bundle in one pass
        flat, _, _ = unwrap(ckpt.root)
        both = tree.materialize({"bundle": ckpt.root, "model": flat})
        bundle = both["bundle"]
        model.load_state_dict(both["model"], strict=strict)
        if "frozen" in bundle:  # a recorded freeze is restored; without one requires_grad is left as it is
            frozen = set(frozen_names(bundle))
            for name, p in model.named_parameters():
                p.requires_grad_(name not in frozen)
    for live, several, single_keys in ((optimizer, "optimizers", OPTIMIZER_KEYS), (scheduler, "schedulers", ("scheduler",))):
        if live is None:
            continue
        if isinstance(live, (list, tuple)):  # several optimizers (schedulers): the bundle's list, in order
            saved = bundle.get(several)
            if not isinstance(saved, list) or len(saved) != len(live):
                raise UsageError(f"{path}: {len(live)} {several} given, but the bundle holds "
                                 f"{len(saved) if isinstance(saved, list) else 'no list of'} {several}")
            for obj, state in zip(live, saved):
                obj.load_state_dict(state)
            continue
        state = next((bundle[k] for k in single_keys if isinstance(bundle.get(k), dict)), None)
        if state is not None:
            live.load_state_dict(state)
    return bundle
