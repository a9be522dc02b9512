"""SuperResNet: a ResNet super-network in the search space of ZenNAS (OTOv3 paper, section 4).

OTOv3 "switch[es] to a ResNet search space as ZenNAS (Lin et al., 2021), referred to as
SuperResNet. SuperResNet is constructed by stacking several super-residual blocks with varying
depths. Each super-residual block contains multiple Conv candidates with kernel sizes as 3x3, 5x5
and 7x7 separately in parallel" (section 4, Figure 7a), trained on CIFAR-10.

Here each candidate is a ZenNAS residual branch, Conv(k)-BN-ReLU-Conv(k)-BN, and a block sums its
branches with the shortcut (identity, or Conv1x1-BN when the shape changes), then applies ReLU.
Every branch ends in Conv-BN feeding an Add, so each is a GeZIG; the hierarchy forbids erasing
every branch and a projecting shortcut of one block together, since nothing would then feed the
rest of the network.

The default (widths 32, 64, 128; depths 2, 2, 1) has 3.59 M parameters and 788 M
multiply-accumulates on a 1x3x32x32 input (thop), so the paper's 1 M and 2 M sub-networks
(Table 2) keep 28 % and 56 % of it.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SuperResBlock", "SuperResNet", "super_resnet"]


class SuperResBlock(nn.Module):
    """A super-residual block: parallel Conv(k)-BN-ReLU-Conv(k)-BN branches plus a shortcut.

    Args:
        in_channels: channels of the input.
        out_channels: channels of every branch and of the output.
        stride: stride of the first convolution of each branch (and of a projecting shortcut).
        kernel_sizes: one branch per kernel size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_sizes: Sequence[int] = (3, 5, 7),
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, k, stride=stride, padding=k // 2, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.Conv2d(out_channels, out_channels, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            for k in kernel_sizes
        )
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.shortcut is None else self.shortcut(x)
        for branch in self.branches:
            out = out + branch(x)
        return self.relu(out)


class SuperResNet(nn.Module):
    """Stem, stages of super-residual blocks, global average pool and Linear.

    Args:
        num_classes: outputs of the final Linear layer.
        in_channels: channels of the input image.
        widths: output channels of each stage; every stage after the first halves the resolution.
        depths: number of super-residual blocks in each stage.
        kernel_sizes: the parallel convolution candidates of every block.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 2, 1),
        kernel_sizes: Sequence[int] = (3, 5, 7),
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {list(widths)} and depths {list(depths)} differ in length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks = []
        c_in = widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(SuperResBlock(c_in, width, stride, kernel_sizes))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def super_resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    widths: Sequence[int] = (32, 64, 128),
    depths: Sequence[int] = (2, 2, 1),
) -> SuperResNet:
    """SuperResNet for 32x32 CIFAR-10 images (paper, section 4 and Table 2)."""
    return SuperResNet(
        num_classes=num_classes, in_channels=in_channels, widths=widths, depths=depths
    )
