"""DemoSupNet, the small but complex demo super-network of OTOv3 (paper, Figure 1a).

The paper draws DemoSupNet (Figure 1a) and walks Algorithm 2 over it (section 3.1), but gives no
code and no layer widths. This module is reconstructed from the paper's text and figures:

- ``Conv1-BN1`` (then a ReLU) feeds three consumers: ``Conv2``, ``MaxPool`` and ``AvgPool``
  (removing Conv1-BN1 "would cause Conv2, MaxPool and AvgPool to become invalid").
- The three branches ``Conv2-BN2``, ``MaxPool-Conv3-BN3`` and ``AvgPool-Conv4-BN4`` meet in a
  ``Concat``, which feeds ``Conv6``; the columns of Conv6's flattened filter matrix are grouped by
  incoming segment (Figure 1 caption, Figure 3b).
- ``Conv6-BN6`` (then a ReLU) feeds ``Conv7-BN7`` and ``Conv8-BN8``, summed by an ``Add`` that is
  followed by the ``AvgPool`` and ``Linear`` head.

So the GeZIGs are g2, g3, g4 (the concat branches) and g7, g8 (the add branches). With g8
removed, Conv7-BN7 can no longer be removed, since no input-output path would remain (paper,
Figure 2). K = 3 removing Conv2-BN2, MaxPool-Conv3-BN3 and Conv8-BN8 is valid and leaves the
Concat and the Add with one input each (paper, Figure 3 and section 3.3).

There is no Conv5/BN5: the numbering follows the figure, where index 5 is not a convolution.
Convolutions carry a bias, as the figure's groups hold ``b_i`` beside ``K_i``, ``gamma_i``,
``beta_i``.

Size (paper, Table 1: 0.82 M parameters, 209 M FLOPs on Fashion-MNIST 28x28). The paper's
"FLOPs" are multiply-accumulates (MACs): its Table 3 lists DARTS at 574 M "FLOPs", which is the
multiply-add count DARTS reports for itself. The default widths give 0.820 M parameters and
211.5 M MACs counted by ``thop`` on a 1x1x28x28 input (209.4 M in the convolutions and the
Linear alone; thop also counts BatchNorm and pooling). Read as two FLOPs per MAC, 209 M FLOPs
would be 105 M MACs; the closest of the widths we tried for this graph (16 to 256 channels per
layer, head pooled to 1x1 .. 7x7) then misses 0.82 M parameters or 105 M MACs by 14 %, against
1 % when the paper's figure is read as MACs.
"""

import torch
from torch import Tensor, nn

__all__ = ["DemoSupNet", "demosupnet"]


class DemoSupNet(nn.Module):
    """The demo super-network of OTOv3, Figure 1a, for 28x28 single-channel images.

    Args:
        num_classes: outputs of the final Linear layer.
        in_channels: channels of the input image.
        stem_width: output channels of Conv1.
        branch_width: output channels of each of Conv2, Conv3 and Conv4 (the Concat holds three).
        mid_width: output channels of Conv6 (stride 2, so 28x28 becomes 14x14).
        add_width: output channels of Conv7 and Conv8, summed by the Add.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_width: int = 96,
        branch_width: int = 48,
        mid_width: int = 96,
        add_width: int = 256,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu1 = nn.ReLU()

        self.conv2 = nn.Conv2d(stem_width, branch_width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(branch_width)
        self.maxpool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(stem_width, branch_width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(branch_width)
        self.avgpool = nn.AvgPool2d(3, stride=1, padding=1)
        self.conv4 = nn.Conv2d(stem_width, branch_width, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(branch_width)

        self.conv6 = nn.Conv2d(3 * branch_width, mid_width, 3, stride=2, padding=1)
        self.bn6 = nn.BatchNorm2d(mid_width)
        self.relu6 = nn.ReLU()

        self.conv7 = nn.Conv2d(mid_width, add_width, 3, padding=1)
        self.bn7 = nn.BatchNorm2d(add_width)
        self.conv8 = nn.Conv2d(mid_width, add_width, 3, padding=1)
        self.bn8 = nn.BatchNorm2d(add_width)

        self.relu = nn.ReLU()
        self.avgpool2 = nn.AvgPool2d(2)  # 14x14 -> 7x7
        self.linear = nn.Linear(add_width * 7 * 7, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.relu1(self.bn1(self.conv1(x)))
        a = self.bn2(self.conv2(t))
        b = self.bn3(self.conv3(self.maxpool(t)))
        c = self.bn4(self.conv4(self.avgpool(t)))
        m = torch.cat([a, b, c], dim=1)
        u = self.relu6(self.bn6(self.conv6(m)))
        s = self.bn7(self.conv7(u)) + self.bn8(self.conv8(u))
        return self.linear(torch.flatten(self.avgpool2(self.relu(s)), 1))


def demosupnet(num_classes: int = 10, in_channels: int = 1) -> DemoSupNet:
    """DemoSupNet as sized for Fashion-MNIST (paper, Table 1): 0.82 M parameters, 211 M MACs."""
    return DemoSupNet(num_classes=num_classes, in_channels=in_channels)
