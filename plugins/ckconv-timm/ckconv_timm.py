"""ckconv plugin: timm models as architectures (``timm:vgg16``, ``timm:resnet50``) and timm <-> torchvision key rules.

Every model in ``timm.list_models()`` builds under the ``timm`` namespace, always with ``pretrained=False``: ckconv
never downloads or loads weights while building. Where timm and torchvision lay out the same network differently,
this plugin ships key rules (``ckconv_register_key_rules``):

* VGG: timm keeps the classifier as ``pre_logits.fc1`` (a 7x7 conv), ``pre_logits.fc2`` (a 1x1 conv) and ``head.fc``
  (Linear); torchvision as ``classifier.0``, ``classifier.3`` and ``classifier.6`` (all Linear). The conv weights
  hold the same numbers as the Linear weights, in the same order: only the shape differs.
* ResNet, ResNeXt, wide ResNet: identical names and shapes in both libraries, so no rule is needed.

:func:`convert_state_dict` applies the rules and the reshapes, producing a state_dict that the target model's
``load_state_dict(strict=True)`` accepts; the tests prove equal outputs both ways.
"""

from __future__ import annotations

from ckconv import hookimpl
from ckconv.architectures import ArchitectureSource
from ckconv.errors import UsageError

VGG_TIMM_TO_TORCHVISION = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3", "head.fc": "classifier.6"}
VGG_TORCHVISION_TO_TIMM = {v: k for k, v in VGG_TIMM_TO_TORCHVISION.items()}
NO_WEIGHT_OPTIONS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


class TimmSource(ArchitectureSource):
    name = "timm"
    description = "every model in timm.list_models(), built with pretrained=False"
    auto_exclude = ("*",)  # `--arch auto` would build 1,300+ models; name timm models explicitly (timm:resnet50)
    distribution = "timm"  # cached specs and names are keyed by timm's installed version, read without importing it

    @property
    def version(self):
        import timm

        return timm.__version__

    def list(self):
        import timm

        return sorted(timm.list_models())

    def build(self, model, **options):
        import timm

        given = [k for k in NO_WEIGHT_OPTIONS if options.get(k)]
        if given:
            raise UsageError(f"timm:{model}: option {given[0]} would load or download weights; ckconv builds "
                             "architectures only (pretrained=False)")
        options = {k: v for k, v in options.items() if k not in NO_WEIGHT_OPTIONS}
        if not timm.is_model(model):
            raise UsageError(f"timm has no model {model!r}; see timm.list_models() or `ckconv match --arch timm:NAME`")
        return timm.create_model(model, pretrained=False, **options)


def key_rules():
    """This plugin's :class:`ckconv.rules.KeyRule` objects (also what ``ckconv_register_key_rules`` registers)."""
    from ckconv.rules import KeyRule

    return [
        KeyRule("timm.vgg_to_torchvision", r"^(pre_logits\.fc[12]|head\.fc)\.(weight|bias)$",
                lambda m: f"{VGG_TIMM_TO_TORCHVISION[m.group(1)]}.{m.group(2)}", arch="torchvision:vgg*",
                description="timm VGG head -> torchvision: pre_logits.fc1 (7x7 conv) -> classifier.0, "
                            "pre_logits.fc2 (1x1 conv) -> classifier.3, head.fc -> classifier.6; conv weights "
                            "reshape to Linear (out, in)"),
        KeyRule("timm.vgg_from_torchvision", r"^(classifier\.[036])\.(weight|bias)$",
                lambda m: f"{VGG_TORCHVISION_TO_TIMM[m.group(1)]}.{m.group(2)}", arch="timm:vgg*",
                description="torchvision VGG classifier -> timm: classifier.0 -> pre_logits.fc1 (7x7 conv), "
                            "classifier.3 -> pre_logits.fc2 (1x1 conv), classifier.6 -> head.fc; Linear weights "
                            "reshape to conv (out, in, k, k)"),
    ]


def build(arch: str, *, device="meta", **options):
    """Build ``timm:NAME`` or ``torchvision:NAME`` without weights (on the meta device unless told otherwise)."""
    import torch

    namespace, sep, model = arch.partition(":")
    if not sep or namespace not in ("timm", "torchvision"):
        raise UsageError(f"name the architecture with its namespace, timm:NAME or torchvision:NAME, not {arch!r}")
    with torch.device(device):
        if namespace == "timm":
            return TimmSource().build(model, **options)
        import torchvision

        return torchvision.models.get_model(model, **{"weights": None, **options})


def convert_state_dict(state_dict, arch: str, **options) -> dict:
    """Rename and reshape a timm or torchvision ``state_dict`` for ``arch`` (``torchvision:vgg16``, ``timm:vgg16``).

    Keys are renamed by this plugin's rules that apply to ``arch``; a renamed tensor whose shape differs from the
    target's is reshaped when the element counts agree (a 7x7 conv <-> Linear) and refused otherwise. ``options``
    build the target (``num_classes=10``). Tensors are reshaped as views: nothing is copied.
    """
    target = build(arch, **options).state_dict()
    rules = [r for r in key_rules() if r.applies_to(arch)]
    out = {}
    for key, tensor in state_dict.items():
        new = key
        for rule in rules:
            new = rule.apply(new)
        if new in out:
            raise UsageError(f"{key!r} and another key both become {new!r} for {arch}")
        if new != key and new in target and tuple(tensor.shape) != tuple(target[new].shape):
            if tensor.numel() != target[new].numel():
                raise UsageError(f"{key!r} {tuple(tensor.shape)} cannot become {new!r} "
                                 f"{tuple(target[new].shape)} in {arch}: the element counts differ")
            tensor = tensor.reshape(target[new].shape)
        out[new] = tensor
    return out


@hookimpl
def ckconv_register_architectures(register):
    register(TimmSource())


@hookimpl
def ckconv_register_key_rules(register):
    for rule in key_rules():
        register(rule)
