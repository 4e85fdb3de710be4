"""Pickled ``nn.Module`` objects: their state_dict, derived from the inert record without importing the class.

``torch.save(model)`` pickles the module's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``,
``_non_persistent_buffers_set``, hooks and plain attributes. ``Module.state_dict()`` is a fixed walk over those
(see torch/nn/modules/module.py ``state_dict`` and ``_save_to_state_dict``), so the same walk over the record gives
the same OrderedDict: names, order, tensors (detached: plain tensors, not Parameters) and ``_metadata``.

Two things are not in the pickle because they live on the class, and the class is never imported:

* ``_version`` (``_metadata[prefix] = {"version": cls._version}``). :data:`VERSIONS` lists every class in torch
  2.14 and torchvision 0.29 whose ``_version`` is not ``nn.Module``'s 1 (tests/test_pickled_modules.py checks the
  table against the installed torch by walking every ``nn.Module`` subclass). Any other class gets 1, which is
  wrong only for a user's subclass of a versioned class (a BatchNorm subclass has 2): ``load_state_dict`` then
  takes the state_dict as coming from version 1, harmless while its keys are complete.
* Code that changes the state_dict: ``get_extra_state``, an overridden ``_save_to_state_dict`` or ``state_dict``,
  state_dict hooks. :data:`CUSTOM_STATE` lists the torch/torchvision classes that override them; such a module,
  Transformer Engine's modules (``get_extra_state``) and any module with state_dict hooks are refused by name
  (:class:`ModuleStateError`). A user class that overrides them cannot be recognised and is walked like the rest.
"""

from __future__ import annotations

from collections import OrderedDict

from .. import tree
from ..errors import LimitExceeded, UnsupportedContent
from ..model import Foreign, TensorRef

OPTIMIZED_MODULE = "torch._dynamo.eval_frame.OptimizedModule"  # torch.compile's wrapper: __reduce__ (mod, ctx)
SPECTRAL_NORM_HOOK = "torch.nn.utils.spectral_norm.SpectralNormStateDictHook"

_BATCHNORM = "torch.nn.modules.batchnorm."
_INSTANCENORM = "torch.nn.modules.instancenorm."
_AO = "torch.ao.nn."
VERSIONS = {  # class -> _version, where it is not 1 (torch 2.14.1, torchvision 0.29.1)
    **{_BATCHNORM + n: 2 for n in ("_NormBase", "_BatchNorm", "_LazyNormBase", "BatchNorm1d", "BatchNorm2d",
                                   "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
                                   "SyncBatchNorm")},
    **{_INSTANCENORM + n: 2 for n in ("_InstanceNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
                                      "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d")},
    **{_AO + "intrinsic.qat.modules.conv_fused." + n: 2 for n in ("_ConvBnNd", "ConvBn1d", "ConvBn2d", "ConvBn3d",
                                                                 "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d")},
    _AO + "intrinsic.quantized.dynamic.modules.linear_relu.LinearReLU": 4,
    _AO + "intrinsic.quantized.modules.bn_relu.BNReLU2d": 2,
    _AO + "intrinsic.quantized.modules.bn_relu.BNReLU3d": 2,
    **{_AO + "intrinsic.quantized.modules.linear_relu." + n: 3 for n in ("LinearLeakyReLU", "LinearReLU",
                                                                         "LinearTanh")},
    _AO + "quantized.dynamic.modules.linear.Linear": 4,
    **{_AO + "quantized.dynamic.modules.rnn." + n: 2 for n in ("RNNBase", "GRU", "LSTM")},
    **{_AO + "quantized.modules.batchnorm." + n: 2 for n in ("_BatchNorm", "BatchNorm2d", "BatchNorm3d")},
    _AO + "quantized.modules.linear.Linear": 3,
    _AO + "quantized.modules.linear.LinearPackedParams": 3,
    **{_AO + "quantized.modules.normalization." + n: 2 for n in ("InstanceNorm1d", "InstanceNorm2d",
                                                                 "InstanceNorm3d")},
    **{"torch.ao.quantization.observer." + n: 3 for n in (
        "UniformQuantizationObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
        "MovingAveragePerChannelMinMaxObserver", "HistogramObserver")},
    "torchvision.models._utils.IntermediateLayerGetter": 2,
    "torchvision.models.densenet._DenseBlock": 2,
    "torchvision.models.detection.mask_rcnn.MaskRCNNHeads": 2,
    "torchvision.models.detection.retinanet.RetinaNetClassificationHead": 2,
    "torchvision.models.detection.retinanet.RetinaNetRegressionHead": 2,
    "torchvision.models.detection.rpn.RPNHead": 2,
    "torchvision.models.mnasnet.MNASNet": 2,
    "torchvision.models.quantization.mobilenetv3.QuantizableSqueezeExcitation": 2,
    "torchvision.models.vision_transformer.MLPBlock": 2,
    "torchvision.ops.feature_pyramid_network.FeaturePyramidNetwork": 2,
}

_AOQ = _AO + "quantized."
CUSTOM_STATE = frozenset({  # classes whose state_dict comes from their own code (torch 2.14.1, torchvision 0.29.1)
    *(_AOQ + "modules.conv." + n for n in ("_ConvNd", "_ConvTransposeNd", "Conv1d", "Conv2d", "Conv3d",
                                           "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")),
    *(_AO + "intrinsic.quantized.modules.conv_relu." + n for n in ("ConvReLU1d", "ConvReLU2d", "ConvReLU3d")),
    *(_AO + "intrinsic.quantized.modules.conv_add." + n for n in ("ConvAdd2d", "ConvAddReLU2d")),
    _AOQ + "modules.embedding_ops.EmbeddingPackedParams", _AOQ + "modules.functional_modules.QFunctional",
    _AOQ + "modules.linear.Linear", _AOQ + "modules.linear.LinearPackedParams",
    _AOQ + "dynamic.modules.linear.Linear",
    *(_AOQ + "dynamic.modules.conv." + n for n in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                                                   "ConvTranspose3d")),
    *(_AOQ + "dynamic.modules.rnn." + n for n in ("PackedParameter", "RNNCellBase", "RNNCell", "GRUCell", "LSTMCell")),
    *(_AO + "intrinsic.quantized.modules.linear_relu." + n for n in ("LinearLeakyReLU", "LinearReLU", "LinearTanh")),
    _AO + "intrinsic.quantized.dynamic.modules.linear_relu.LinearReLU",
    *(_AOQ + "reference.modules.conv." + n for n in ("_ConvNd", "_ConvTransposeNd", "Conv1d", "Conv2d", "Conv3d",
                                                     "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")),
    _AOQ + "reference.modules.linear.Linear", _AOQ + "reference.modules.sparse.Embedding",
    _AOQ + "reference.modules.sparse.EmbeddingBag", _AOQ + "reference.modules.utils.ReferenceQuantizedModule",
    _AO + "sparse.quantized.dynamic.linear.Linear", _AO + "sparse.quantized.linear.Linear",
    _AO + "sparse.quantized.linear.LinearPackedParams",
    "torch.ao.pruning._experimental.pruner.parametrization.FakeStructuredSparsity",
    "torch.ao.pruning.sparsifier.utils.FakeSparsity",
    *("torch.ao.quantization.fake_quantize." + n for n in ("FakeQuantize", "FixedQParamsFakeQuantize",
                                                           "FusedMovingAvgObsFakeQuantize")),
    "torch.ao.quantization.observer.HistogramObserver",
    "torch.distributed.nn.api.remote_module.RemoteModule", "torch.distributed.nn.api.remote_module._RemoteModule",
    *(_BATCHNORM + n for n in ("_LazyNormBase", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d")),
    *("torch.nn.modules.conv." + n for n in ("LazyConv1d", "LazyConv2d", "LazyConv3d", "LazyConvTranspose1d",
                                             "LazyConvTranspose2d", "LazyConvTranspose3d")),
    *(_INSTANCENORM + n for n in ("LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d")),
    "torch.nn.modules.linear.LazyLinear",
})
EXTRA_STATE_PACKAGES = ("transformer_engine.",)  # TransformerEngineBaseModule.get_extra_state (its fp8_meta)


class ModuleStateError(UnsupportedContent):
    """A pickled module whose state_dict only running its code could produce."""


def class_name(value) -> str:
    return f"{getattr(value, 'module', '?')}.{getattr(value, 'qualname', '?')}"


def _dict_state(record):
    """The ``__dict__`` BUILD applied to a record (a ``(dict, slots)`` pair gives its dict), or None."""
    state = getattr(record, "state", None)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else None


def _module_dict(record):
    """A pickled module's attributes, or None when ``record`` is not one (no class is looked at but its name)."""
    if not isinstance(record, Foreign):  # also false for class references (Foreign subclasses, not instances)
        return None
    state = _dict_state(record)
    if state is not None and all(isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules")):
        return state
    args = getattr(record, "args", ())
    if class_name(record) == OPTIMIZED_MODULE and isinstance(args, tuple) and args and is_module(args[0]):
        return {"_parameters": {}, "_buffers": {}, "_modules": {"_orig_mod": args[0]}}  # see OptimizedModule.__init__
    return None


def is_module(value) -> bool:
    """Whether ``value`` is the inert record of a pickled ``nn.Module``."""
    return _module_dict(value) is not None


def find_modules(root, limit=64) -> list:
    """[(path tuple, class name)] of pickled modules, outermost first (not looking inside them); for ``inspect``."""
    out, stack, seen = [], [((), root)], set()
    steps = 0
    while stack and len(out) < limit and steps < tree.MAX_NODES:
        path, node = stack.pop()
        steps += 1
        if id(node) in seen or len(path) > tree.MAX_DEPTH:
            continue
        seen.add(id(node))
        if is_module(node):
            out.append((path, class_name(node)))
            continue
        if isinstance(node, dict):
            stack.extend((path + (k,), v) for k, v in reversed(list(node.items())))
        elif type(node) in (list, tuple):
            stack.extend((path + (i,), v) for i, v in reversed(list(enumerate(node))))
    return out


def state_dict(record, where="<root>") -> OrderedDict:
    """The OrderedDict ``model.state_dict()`` returns for the pickled module ``record``, ``_metadata`` included.

    Tensors share the record's storages (no bytes are read). ``where`` names the record in messages.
    """
    if not is_module(record):
        raise UnsupportedContent(f"{where}: not a pickled nn.Module")
    out = OrderedDict()
    out._metadata = OrderedDict()
    budget = [tree.MAX_NODES]
    _walk(record, "", out, (), budget, where)
    return out


def _walk(record, prefix, out, active, budget, where):
    """``Module.state_dict`` on a record: this module's metadata and tensors, then each child's, depth first."""
    cls = class_name(record)
    name = prefix[:-1] or "<the module itself>"
    if id(record) in active:
        raise LimitExceeded(f"{where}: pickled module {cls} contains itself at {name}; torch's state_dict would "
                            "recurse forever")
    if len(active) >= tree.MAX_DEPTH:
        raise LimitExceeded(f"{where}: pickled modules nest more than {tree.MAX_DEPTH} levels (at {name})")
    _charge(budget, where)
    state = _module_dict(record)
    _refuse_code(record, cls, state, name, where)
    local = {"version": VERSIONS.get(cls, 1)}
    out._metadata[prefix[:-1]] = local
    skipped = state.get("_non_persistent_buffers_set")
    skipped = skipped if isinstance(skipped, (set, frozenset, list, tuple)) else ()
    for kind, table in (("parameter", state["_parameters"]), ("buffer", state["_buffers"])):
        for key, value in table.items():
            _charge(budget, where)
            if value is None or kind == "buffer" and key in skipped:
                continue
            if not isinstance(key, str) or not isinstance(value, TensorRef):
                raise ModuleStateError(
                    f"{where}: {kind} {prefix}{_key(key)} of pickled module {cls} is "
                    f"{_describe(value)}, not a tensor; ckconv cannot derive this state_dict (save "
                    "model.state_dict() instead)")
            out[prefix + key] = TensorRef(value.storage, value.dtype, value.shape, value.stride, value.offset)
    for hook in _values(state.get("_state_dict_hooks")):
        if class_name(hook) == SPECTRAL_NORM_HOOK:  # adds a version entry to this module's metadata
            fn = _dict_state((_dict_state(hook) or {}).get("fn")) or {}
            if isinstance(fn.get("name"), str):
                local.setdefault("spectral_norm", {})[fn["name"] + ".version"] = 1  # SpectralNorm._version
    for key, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(key, str) or not is_module(child):
            raise ModuleStateError(f"{where}: submodule {prefix}{_key(key)} of pickled module {cls} is "
                                   f"{_describe(child)}, not a module record; ckconv cannot derive this state_dict")
        _walk(child, f"{prefix}{key}.", out, active + (id(record),), budget, where)


def _charge(budget, where):
    budget[0] -= 1
    if budget[0] < 0:
        raise LimitExceeded(f"{where}: pickled module holds more than {tree.MAX_NODES} submodules and tensors "
                            "(shared submodules multiply them); raise CKCONV_MAX_NODES if you trust this file")


def _refuse_code(record, cls, state, name, where):
    why = None
    if cls in CUSTOM_STATE:
        why = "writes its state_dict with its own code (_save_to_state_dict or state_dict)"
    elif cls.startswith(EXTRA_STATE_PACKAGES) and "fp8_meta" in state:
        why = "keeps state through get_extra_state"
    else:
        hooks = [h for h in _values(state.get("_state_dict_hooks")) if class_name(h) != SPECTRAL_NORM_HOOK]
        hooks += _values(state.get("_state_dict_pre_hooks"))
        if hooks:
            why = f"has state_dict hooks ({', '.join(sorted({class_name(h) for h in hooks}))})"
    if why:
        raise ModuleStateError(
            f"{where}: cannot derive the state_dict without running code: submodule {name} ({cls}) {why}; ckconv "
            "never runs code from a file: load the model with torch where you trust it and save model.state_dict()")


def _values(table):
    return list(table.values()) if isinstance(table, dict) else []


def _key(key):
    return key[:200] if isinstance(key, str) else f"<a {type(key).__name__} key>"


def _describe(value):
    if isinstance(value, Foreign) or isinstance(value, type) and issubclass(value, Foreign):
        return f"a {class_name(value)}"
    return f"a {type(value).__name__}"


def with_state_dicts(root, found=None):
    """``root`` with each pickled module (outermost ones) replaced by its state_dict, for showing names as
    ``model.state_dict()`` gives them (``layer4.2.bn2.running_mean``); a module whose state_dict cannot be derived
    stays as it is. The tree is not modified. ``found``: :func:`find_modules`'s answer, when the caller has it."""
    found = find_modules(root) if found is None else found
    if not found:
        return root
    if found[0][0] == ():
        return _derived(root, "<root>")
    out = root
    for path, _ in found:
        out = _replace_at(out, path, lambda node, p=path: _derived(node, tree.format_path(p)))
    return out


def _derived(node, where):
    try:
        return state_dict(node, where=f"pickled module at {where}")
    except (ModuleStateError, LimitExceeded):
        return node


def _replace_at(node, path, make):
    if not path:
        return make(node)
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        new = type(node)() if type(node) in (dict, OrderedDict) else dict()
        for k, v in node.items():
            new[k] = _replace_at(v, rest, make) if k == head else v
        return new
    if type(node) in (list, tuple):
        return type(node)(_replace_at(v, rest, make) if i == head else v for i, v in enumerate(node))
    return node


def describe(root, found=None) -> list:
    """[{path, class, tensors, error}] for each pickled module in ``root`` (outermost ones), for ``inspect``;
    ``found``: :func:`find_modules`'s answer, when the caller has it."""
    out = []
    for path, cls in find_modules(root) if found is None else found:
        where = tree.format_path(path)
        node = root
        for key in path:
            node = node[key]
        try:
            count, error = len(state_dict(node, where=f"pickled module at {where}")), None
        except (ModuleStateError, LimitExceeded) as exc:
            count, error = None, str(exc)
        out.append({"path": where, "class": cls, "tensors": count, "error": error})
    return out
