"""Models and checkpoints for the matching tests, built at test time with seeded random weights.

Each builder is cached for the whole session (the test modules wrap them in session-scoped fixtures). BatchNorm
running statistics are randomised too, so eval-mode outputs depend on every tensor a conversion could lose.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torchvision
from torch import nn

ATOL = 1e-5


# Fixtures for the matching test modules, which import them by name (autouse applies where they are imported).
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small forward passes run faster on one thread than on two shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def spec_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKCONV_CACHE_DIR", str(tmp_path_factory.mktemp("ckconv-cache")))
        yield


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights as seeded by torch's init; BatchNorm affine parameters and running statistics made non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(7)
    return model.eval()


@functools.lru_cache(maxsize=None)
def model(name: str, seed: int = 0, **options) -> nn.Module:
    """A torchvision model with seeded random weights, in eval mode (never downloads)."""
    torch.manual_seed(seed)
    return randomize(torchvision.models.get_model(name, weights=None, **options), seed)


def fresh(name: str, **options) -> nn.Module:
    """A new torchvision model with other random weights (not cached), to load a conversion into."""
    torch.manual_seed(12345)
    return randomize(torchvision.models.get_model(name, weights=None, **options), 12345)


@functools.lru_cache(maxsize=None)
def image(size=64, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def same_outputs(a, b, x=None, atol=ATOL):
    x = image() if x is None else x
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ya.shape == yb.shape
    assert ya.abs().max().item() > 1e-3, "outputs too small to tell models apart"
    diff = (ya - yb).abs().max().item()
    assert diff <= atol, f"outputs differ by {diff}"
    return diff


def differs(a, b, x=None):
    x = image() if x is None else x
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item() > 1e-3


def state(name, **options):
    """The model's state_dict (tensors shared with the cached model: do not modify)."""
    return dict(model(name, **options).state_dict())


def legacy_densenet(sd):
    """Old DenseNet names, the inverse of torchvision's densenet._load_state_dict: norm1 -> norm.1."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$")
    return {pattern.sub(r"\1.\2.\3", k): v for k, v in sd.items()}


def caffe_squeezenet(sd):
    """squeezenet1_0 with caffe-style layer names (conv1, fire2_squeeze1x1, ..., conv10), no BN, no order hints."""
    names = {"features.0": "conv1", "classifier.1": "conv10"}
    fire = 2
    for i in (3, 4, 5, 7, 8, 9, 10, 12):
        names[f"features.{i}.squeeze"] = f"fire{fire}_squeeze1x1"
        names[f"features.{i}.expand1x1"] = f"fire{fire}_expand1x1"
        names[f"features.{i}.expand3x3"] = f"fire{fire}_expand3x3"
        fire += 1
    out = {}
    for k, v in sd.items():
        module, _, leaf = k.rpartition(".")
        out[f"{names[module]}.{leaf}"] = v
    return out


class ConvHead(nn.Module):
    """A network whose classifier is convolutional: Linear layers stored as k x k convs (fully-convolutional)."""

    def __init__(self, features, pool, convs, acts):
        super().__init__()
        self.features, self.pool = features, pool
        self.head = nn.ModuleList(convs)
        self.acts = acts

    def forward(self, x):
        x = self.pool(self.features(x))
        for conv, act in zip(self.head, self.acts):
            x = act(conv(x))
        return torch.flatten(x, 1)


def as_conv(linear: nn.Linear, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features // (kernel * kernel), linear.out_features, kernel, device="meta")
    conv.weight = nn.Parameter(linear.weight.detach().view(conv.weight.shape))
    conv.bias = nn.Parameter(linear.bias.detach())
    return conv
