"""torchvision's classification models, built fast and with random values for exactness checks."""

from __future__ import annotations

import contextlib
import math

import torch
import torchvision
from torch import nn

TORCHVISION = torchvision.models.list_models(module=torchvision.models)

# Models with no joint at all (DESIGN 3): an empty search space is the right answer.
NO_JOINT = {n for n in TORCHVISION if n.startswith(("alexnet", "vgg"))}
# ShuffleNetV2 shuffles channels after its concat (view, transpose, view) and splits them
# with chunk: fxoto follows both as index maps; each branch feeding a concat is a GeZIG.
SHUFFLED = {n for n in TORCHVISION if n.startswith("shufflenet")}

# GeZIG counts from DESIGN section 3 and from an independent prototype's reading of each model.
EXPECTED_COUNTS = {
    "resnet18": 11, "resnet50": 20, "mobilenet_v2": 10, "efficientnet_b0": 9,
    "densenet121": 58, "googlenet": 36, "inception_v3": 44, "regnet_x_400mf": 26,
    "swin_t": 24, "swin_s": 48, "swin_b": 48,
    **{name: 19 for name in SHUFFLED},  # 13 stride-1 branch2s, 3 x (branch1, branch2) of the stride-2 blocks
}


def input_size(name: str) -> int:
    if name.startswith("swin"):
        return 64  # Swin pads to whole windows: a small input runs every block, shifted windows included
    if name.startswith("vit_"):
        return 2 * _patch(name)  # built for a 2 x 2 patch grid (``build``): every layer, a small forward
    if name.startswith("maxvit"):
        return 224  # its attention windows need a 224 x 224 input
    if name.startswith("inception"):
        return 75  # the smallest input Inception-v3 accepts
    return 64


def _patch(name: str) -> int:
    return int(name.rsplit("_", 1)[1])  # vit_b_16: 16


_INIT_FUNCTIONS = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "trunc_normal_",
                   "xavier_uniform_", "xavier_normal_", "constant_", "zeros_", "ones_")


@contextlib.contextmanager
def _no_init():
    """Skip torchvision's initialisers (truncated normals on 600 M values take a minute)."""
    saved = {f: getattr(nn.init, f) for f in _INIT_FUNCTIONS}
    try:
        for f in _INIT_FUNCTIONS:
            setattr(nn.init, f, lambda t, *a, **k: t)
        yield
    finally:
        for f, fn in saved.items():
            setattr(nn.init, f, fn)


@torch.no_grad()
def build(name: str, seed: int = 0) -> nn.Module:
    """The model in eval mode with seeded random values and batch-norm statistics.

    Weights are normal with variance 1/fan_in so deep models stay finite;
    biases, norm variables and statistics are random too, so that a norm or a
    bias that breaks zero-invariance shows.
    """
    # A ViT's image size sets its positional embedding's length, nothing else: the one with a
    # 2 x 2 patch grid has every layer and weight of the 224 x 224 one (vit_h_14: 632 M) and a
    # forward pass fifty times cheaper.
    options = {"image_size": input_size(name)} if name.startswith("vit_") else {}
    with _no_init():
        model = torchvision.models.get_model(name, **options)
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if pname == "weight" else 0.0))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.normal_(0.0, 1.0 / math.sqrt(max(fan_in, 1)), generator=g)
                if p.dim() <= 1:
                    p.mul_(0.5)
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.2)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return model.eval()
