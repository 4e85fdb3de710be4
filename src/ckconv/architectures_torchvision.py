"""Built-in architecture plugin: every torchvision model, and torchvision's own legacy key renames.

The renames are the ones torchvision applies when it loads old checkpoints (``densenet.py::_load_state_dict`` and
the ``_load_from_state_dict`` version upgrades), so ckconv can convert such files once instead of on every load.
"""

from .hookspecs import hookimpl


@hookimpl
def ckconv_register_architectures(register):
    from .architectures import TorchvisionSource

    register(TorchvisionSource())


def _mask_fcn(m):
    return f"{m.group(1)}.{int(m.group(2)) - 1}.0.{m.group(3)}"


def _retinanet_conv(m):
    return f"{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}"


@hookimpl
def ckconv_register_key_rules(register):
    from .rules import KeyRule

    register(KeyRule(
        "torchvision.densenet_legacy",
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
        r"\1\2", arch=("densenet*", "DenseNet"),
        description="old DenseNet layers: norm.1 -> norm1, conv.2 -> conv2 (torchvision densenet._load_state_dict)"))
    register(KeyRule(
        "torchvision.vit_mlp_legacy", r"^(.*\.mlp)\.linear_([12])\.(weight|bias)$",
        lambda m: f"{m.group(1)}.{3 * (int(m.group(2)) - 1)}.{m.group(3)}", arch=("vit_*", "VisionTransformer"),
        description="ViT MLPBlock v1: mlp.linear_1 -> mlp.0, mlp.linear_2 -> mlp.3"))
    register(KeyRule(
        "torchvision.rpn_head_legacy", r"^(.*rpn\.head\.conv)\.(weight|bias)$", r"\1.0.0.\2", arch=("*rcnn*",),
        description="RPNHead v1: rpn.head.conv -> rpn.head.conv.0.0"))
    register(KeyRule(
        "torchvision.mask_head_legacy", r"^(.*mask_head)\.mask_fcn(\d+)\.(weight|bias)$", _mask_fcn,
        arch="maskrcnn*", description="MaskRCNNHeads v1: mask_head.mask_fcnN -> mask_head.(N-1).0"))
    register(KeyRule(
        "torchvision.retinanet_head_legacy",
        r"^(.*head\.(?:classification|regression)_head\.conv)\.([0246])\.(weight|bias)$", _retinanet_conv,
        arch="retinanet*", description="RetinaNet heads v1: conv.2i -> conv.i.0"))
