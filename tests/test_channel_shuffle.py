"""Channel shuffles (view, transpose, view) and splits after a concat, written by hand.

fxoto follows the concatenated channels through the shuffle's permutation and the
split's slicing down to the stems that read them; the sub-network rewrites the
shuffle as ``index_select`` with the kept permutation and the split with the kept
counts, and equals the super-network.
"""

import itertools

import pytest
import torch
from torch import nn

import fxoto
from util import randomize_


def shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def branch(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, bias=False), nn.BatchNorm2d(cout),
                         nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ShuffleNet(nn.Module):
    """A downsampling block (two branches on x), two ShuffleNetV2 blocks (chunk, one branch,
    concat, shuffle), then a depthwise convolution with a bias, a batch norm and a 1x1 head."""

    def __init__(self, groups=2, width=6, split=None):
        super().__init__()
        self.groups, self.split = groups, split
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down1 = branch(width, width, 2)
        self.down2 = branch(width, width, 2)
        half = width if split is None else 2 * width - split
        self.rest = half
        self.b1 = branch(half, half)
        self.b2 = branch(half, half)
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.bn = nn.BatchNorm2d(2 * width)
        self.head = nn.Conv2d(2 * width, 5, 1)

    def block(self, x, b):
        if self.split is None:
            x1, x2 = x.chunk(2, dim=1)
        else:
            x1, x2 = torch.split(x, [self.split, self.rest], dim=1)
        return shuffle(torch.cat((x1, b(x2)), dim=1), self.groups)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = shuffle(torch.cat([self.down1(x), self.down2(x)], 1), self.groups)
        x = self.block(x, self.b1)
        x = self.block(x, self.b2)
        return self.head(self.bn(self.dw(x)))


@pytest.mark.parametrize("kwargs", [dict(groups=2), dict(groups=3), dict(groups=2, split=4)], ids=str)
def test_shuffle_blocks_are_gezigs_with_exact_subnetworks(kwargs):
    model = randomize_(ShuffleNet(**kwargs)).eval()
    x = torch.randn(2, 3, 8, 8)
    space = fxoto.build_space(model, (x,))
    assert len(space.groups) == 4, [e.reason for e in space.excluded]
    assert not space.excluded
    # The depthwise convolution's and the batch norm's channels join the groups, scattered by the shuffles.
    sliced = {m.param for g in space.groups for m in g.members if m.dim is not None}
    assert {"dw.weight", "dw.bias", "bn.weight", "bn.bias"} <= sliced
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tried = 0
    for r in range(1, 5):
        for ids in itertools.combinations(range(4), r):
            if not space.is_valid_removal(ids):
                continue
            model.load_state_dict(original)
            space.zero_(ids)
            with torch.no_grad():
                expected = model(x)
                sub = space.construct_subnet()
                got = sub(x)
            assert torch.allclose(got, expected, atol=1e-5), (ids, (got - expected).abs().max())
            assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
            tried += 1
    assert tried >= 6


class SizeReadElsewhere(nn.Module):
    """The concat's size is read for something other than the shuffle: not followed, set aside."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(shuffle(y, 2)) * y.size(1)


def test_a_size_read_for_anything_else_is_set_aside_with_a_reason():
    model = SizeReadElsewhere().eval()
    space = fxoto.build_space(model, (torch.randn(1, 3, 4, 4),))
    assert space.groups == []
    assert len(space.excluded) == 2
    assert all("shape" in e.reason for e in space.excluded)
