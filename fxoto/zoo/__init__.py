"""The super-networks of the OTOv3 paper (section 4), as plain ``nn.Module`` classes.

Each is an ordinary network with no architecture variables and no hand-made search space: fxoto
finds the search space from the traced graph. ``MODELS`` maps a short name to a builder with the
paper's sizes, and ``example_input`` gives an input of each model's natural shape.
"""

from collections.abc import Callable

import torch
from torch import nn

from fxoto.zoo.darts import DARTS, darts_8cells, darts_14cells
from fxoto.zoo.demosupnet import DemoSupNet, demosupnet
from fxoto.zoo.stacked_unets import StackedUnets, UNet, stacked_unets
from fxoto.zoo.super_resnet import SuperResBlock, SuperResNet, super_resnet

__all__ = [
    "DARTS",
    "DemoSupNet",
    "StackedUnets",
    "SuperResBlock",
    "SuperResNet",
    "UNet",
    "MODELS",
    "INPUT_SHAPES",
    "darts_8cells",
    "darts_14cells",
    "demosupnet",
    "example_input",
    "stacked_unets",
    "super_resnet",
]

MODELS: dict[str, Callable[[], nn.Module]] = {
    "demosupnet": demosupnet,
    "stacked_unets": stacked_unets,
    "super_resnet": super_resnet,
    "darts8": darts_8cells,
    "darts14": darts_14cells,
}

#: (channels, height, width) of one input image of each model in ``MODELS``.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "demosupnet": (1, 28, 28),  # Fashion-MNIST
    "stacked_unets": (3, 32, 32),  # SVHN
    "super_resnet": (3, 32, 32),  # CIFAR-10
    "darts8": (3, 96, 96),  # STL-10
    "darts14": (3, 224, 224),  # ImageNet
}


def example_input(name: str, batch: int = 1) -> torch.Tensor:
    """A random batch of the natural input shape of the model ``MODELS[name]``."""
    if name not in INPUT_SHAPES:
        raise KeyError(f"no zoo model named {name!r}; choose one of {sorted(INPUT_SHAPES)}")
    return torch.randn(batch, *INPUT_SHAPES[name])
