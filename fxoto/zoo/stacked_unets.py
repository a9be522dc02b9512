"""StackedUnets: two U-Nets with different down-samplers, side by side (OTOv3 paper, section 4).

The paper builds StackedUnets "by stacking two standard Unets (Ronneberger et al., 2015) with
different down-samplers together" (section 4, Figure 5a) and trains it on SVHN. The code is not
published; this module follows the text:

- a stem (Conv-BN-ReLU) feeds both U-Nets;
- the first U-Net down-samples with max-pooling, the second with stride-2 convolutions;
- skip connections are additive: each decoder level adds the encoder feature of that level to
  the up-sampled (Upsample-Conv-BN) deeper feature, so the deeper path is a branch of an Add;
- each U-Net ends in ReLU-Conv-BN, and the two outputs are summed before the classifier head.

Two structural properties the paper reports follow from this layout:

- the output ReLU-Conv-BN of each tower is a GeZIG whose only consumer is the final Add; when the
  second tower's is zero, every other vertex of that tower reaches the output only through it,
  so the whole tower is disabled (paper, Figure 5c and footnote 2);
- the deepest path of a U-Net (down-sampler, the deepest encoder block, Upsample-Conv-BN) ends in
  an Add, so it is a GeZIG that can be removed alone (paper, Figure 5c).

Size (paper, Table 1: 0.80 M parameters, 184 M FLOPs on 32x32 SVHN). The default widths
(32, 52, 128 channels at 32, 16 and 8 pixels) give 0.78 M parameters and 184 M
multiply-accumulates (thop, 1x3x32x32 input); the paper's "FLOPs" are multiply-accumulates (see
``fxoto.zoo.demosupnet``).
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["UNet", "StackedUnets", "stacked_unets"]


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


def _double_conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    """Conv-BN-ReLU twice, the U-Net encoder block."""
    return [
        *_conv_bn(in_channels, out_channels),
        nn.ReLU(),
        *_conv_bn(out_channels, out_channels),
        nn.ReLU(),
    ]


class UNet(nn.Module):
    """A U-Net with additive skip connections that keeps the input's spatial size.

    Level ``i`` of the encoder works at 1/2**i of the input resolution with ``widths[i]``
    channels. Level ``i > 0`` starts with a down-sampler: ``MaxPool2d(2)`` when ``downsampler``
    is ``"maxpool"``, a stride-2 Conv-BN-ReLU when it is ``"conv"``. The decoder adds the encoder
    feature of level ``i`` to ``Upsample-Conv-BN`` of level ``i + 1``, then applies ReLU-Conv-BN.
    The output has ``widths[0]`` channels.

    Args:
        widths: channels per level, shallowest first; ``len(widths)`` levels.
        downsampler: ``"maxpool"`` or ``"conv"``.
    """

    def __init__(self, widths: Sequence[int], downsampler: str) -> None:
        super().__init__()
        if downsampler not in ("maxpool", "conv"):
            raise ValueError(f"downsampler must be 'maxpool' or 'conv', not {downsampler!r}")
        if len(widths) < 2:
            raise ValueError(f"a U-Net needs at least two levels, got widths={list(widths)}")
        self.encoders = nn.ModuleList([nn.Sequential(*_double_conv(widths[0], widths[0]))])
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            if downsampler == "maxpool":
                down: list[nn.Module] = [nn.MaxPool2d(2)]
            else:
                down = [*_conv_bn(c_in, c_in, stride=2), nn.ReLU()]
            self.encoders.append(nn.Sequential(*down, *_double_conv(c_in, c_out)))
        # ups[i] brings level i + 1 to level i; decoders[i] follows the Add at level i.
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), *_conv_bn(c_deep, c))
            for c, c_deep in zip(widths[:-1], widths[1:])
        )
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.ReLU(), *_conv_bn(c, c)) for c in widths[:-1]
        )

    def forward(self, x: Tensor) -> Tensor:
        features = []
        for encoder in self.encoders:
            x = encoder(x)
            features.append(x)
        for i in range(len(self.decoders) - 1, -1, -1):
            x = self.decoders[i](features[i] + self.ups[i](x))
        return x


class StackedUnets(nn.Module):
    """Two U-Nets on one stem, summed, then pooled and classified (OTOv3 paper, section 4).

    Args:
        num_classes: outputs of the final Linear layer.
        in_channels: channels of the input image.
        widths: channels per U-Net level, shallowest first; the stem outputs ``widths[0]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 52, 128),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0]), nn.ReLU())
        self.unet1 = UNet(widths, downsampler="maxpool")
        self.unet2 = UNet(widths, downsampler="conv")
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[0], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.unet1(x) + self.unet2(x)
        return self.fc(torch.flatten(self.avgpool(self.relu(x)), 1))


def stacked_unets(num_classes: int = 10, in_channels: int = 3) -> StackedUnets:
    """StackedUnets as sized for SVHN in the paper (Table 1): 0.78 M parameters, 184 M MACs."""
    return StackedUnets(num_classes=num_classes, in_channels=in_channels)
