"""Model families ckconv can match checkpoints against."""

from __future__ import annotations


class ArchitectureSource:
    """A namespace of buildable models (``torchvision:vgg16``).

    * ``name`` -- the namespace;
    * ``list()`` -- model names in it;
    * ``build(model, **options)`` -- an ``nn.Module`` (ckconv builds it under ``torch.device('meta')`` when it only
      needs names and shapes).
    """

    name = ""

    def list(self):
        raise NotImplementedError

    def build(self, model, **options):
        raise NotImplementedError


class TorchvisionSource(ArchitectureSource):
    name = "torchvision"
    description = "every model in torchvision.models.list_models()"

    def list(self):
        import torchvision

        return sorted(torchvision.models.list_models())

    def build(self, model, **options):
        import torchvision

        options.setdefault("weights", None)
        if "weights_backbone" in _params(torchvision.models.get_model_builder(model)):
            options.setdefault("weights_backbone", None)
        return torchvision.models.get_model(model, **options)


def _params(fn):
    import inspect

    return inspect.signature(fn).parameters
