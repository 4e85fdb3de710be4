"""Built-in architecture plugin: every torchvision model, and torchvision's own legacy key renames.

The renames are the ones torchvision applies when it loads old checkpoints (``densenet.py::_load_state_dict`` and
the ``_load_from_state_dict`` version upgrades), so ckconv can convert such files once instead of on every load.
"""

import contextlib
import warnings

from .architectures import ArchitectureSource
from .errors import UsageError
from .hookspecs import hookimpl
from .rules import KeyRule
from .storage import spec_cache


class TorchvisionSource(ArchitectureSource):
    name = "torchvision"
    description = "every model in torchvision.models.list_models()"
    auto_exclude = ("quantized_*",)  # the same float modules as their plain twins
    distribution = "torchvision"

    @property
    def version(self):
        # torchvision's models are torch modules too: a new torch may change their buffers or dtypes
        return (f"{spec_cache.distribution_version('torchvision')}"
                f"+torch{spec_cache.distribution_version('torch')}")

    def cache_version(self):
        return self.version

    def list(self):
        import torchvision

        return sorted(torchvision.models.list_models())

    def build(self, model, **options):
        import torchvision

        if model not in torchvision.models.list_models():
            raise UsageError(f"torchvision has no model {model!r}; see `ckconv match --arch auto` or "
                             "torchvision.models.list_models()")
        options.setdefault("weights", None)
        params = _params(torchvision.models.get_model_builder(model))
        if "weights_backbone" in params:
            options.setdefault("weights_backbone", None)
        with _no_downloads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet/inception init warnings are noise here
            return torchvision.models.get_model(model, **options)


def _params(fn):
    import inspect

    return inspect.signature(fn).parameters


@contextlib.contextmanager
def _no_downloads():
    """Refuse any weight download while building: ckconv builds architectures, never fetches them."""
    import torch.hub

    def refuse(url, *args, **kwargs):
        raise UsageError(f"building the architecture tried to download {url}; ckconv never downloads weights "
                         "(pass weights options as None)")

    targets = [torch.hub]
    try:
        from torchvision.models import _api

        targets.append(_api)
    except ImportError:
        pass
    saved = [(t, t.load_state_dict_from_url) for t in targets if hasattr(t, "load_state_dict_from_url")]
    for t, _ in saved:
        t.load_state_dict_from_url = refuse
    try:
        yield
    finally:
        for t, fn in saved:
            t.load_state_dict_from_url = fn


@hookimpl
def ckconv_register_architectures(register):
    register(TorchvisionSource())


def _mask_fcn(m):
    return f"{m.group(1)}.{int(m.group(2)) - 1}.0.{m.group(3)}"


def _retinanet_conv(m):
    return f"{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}"


@hookimpl
def ckconv_register_key_rules(register):
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
