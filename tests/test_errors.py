"""Errors are for people: a bad example input or an unknown group id says what, where and what to do."""

import pytest
import torch
from torch import nn

import fxoto
from fxoto.zoo import darts_8cells
from util import randomize_
from fxoto.zoo import DemoSupNet


def small_demo():
    return randomize_(DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7)).eval()


def test_wrong_spatial_size_names_the_node_module_and_shapes():
    """DARTS-8 is built for 96x96: at 32x32 a reduction cell's concat meets 6x6 and 5x5 maps."""
    model = darts_8cells().eval()
    with pytest.raises(fxoto.ExampleInputError) as caught:
        fxoto.build_space(model, (torch.randn(1, 3, 32, 32),))
    message = str(caught.value)
    assert "[1, 3, 32, 32]" in message  # the shapes given
    assert "node 'cat_" in message and "torch.cat" in message and "in module 'cells." in message  # where
    assert "[1, 24, 6, 6], [1, 24, 5, 5]" in message  # the shapes that node saw
    assert "first layer, 'stem0.0' (Conv2d), expects [N, 3, H, W]" in message
    assert isinstance(caught.value, RuntimeError)  # as the raw error was


def test_wrong_channel_count_says_what_the_first_layer_expects():
    with pytest.raises(fxoto.ExampleInputError, match=r"node 'conv1' \(module 'conv1': Conv2d\), which saw inputs "
                       r"of shapes \[2, 3, 28, 28\].*expects \[N, 1, H, W\]"):
        fxoto.search(small_demo(), 2, torch.randn(2, 3, 28, 28))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_wrong_feature_count_names_the_linear_layer():
    with pytest.raises(fxoto.ExampleInputError, match=r"first layer, 'a' \(Linear\), expects \[\.\.\., 8\]"):
        fxoto.build_space(Tokens(), (torch.randn(2, 5),))


def test_a_model_that_runs_raises_nothing():
    space = fxoto.build_space(Tokens(), (torch.randn(2, 8),))
    assert len(space.groups) == 2


@pytest.mark.parametrize("ids", [[999], [-1], [0, 5], [1.0]])
def test_unknown_group_id_lists_the_valid_range(ids):
    space = fxoto.build_space(small_demo(), (torch.randn(1, 1, 28, 28),))
    before = [p.detach().clone() for p in space.model.parameters()]
    for call in (space.zero_, space.is_valid_removal, space.construct_subnet):
        with pytest.raises(fxoto.UnknownGroupError, match=r"ids run 0\.\.4"):
            call(ids)
    with pytest.raises(IndexError):  # what a list lookup raised before
        space.zero_(ids)
    assert all(torch.equal(p, q) for p, q in zip(space.model.parameters(), before))  # nothing zeroed on the way
