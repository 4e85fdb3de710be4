"""Built-in architecture plugin: every torchvision model (filled in by the architectures module)."""

from .hookspecs import hookimpl


@hookimpl
def ckconv_register_architectures(register):
    from .architectures import TorchvisionSource

    register(TorchvisionSource())
