"""The paper's super-networks through fxoto: expected structure and exact sub-networks."""

import pytest
import torch

import fxoto
from fxoto.zoo import DemoSupNet, StackedUnets, darts_8cells, super_resnet
from util import assert_groups_leave, randomize_

SMALL = {
    "demosupnet": (lambda: DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7), (1, 28, 28)),
    "stacked_unets": (lambda: StackedUnets(widths=(4, 6, 8)), (3, 16, 16)),
    "super_resnet": (lambda: super_resnet(widths=(4, 6, 8), depths=(1, 1, 1)), (3, 16, 16)),
    "darts8": (lambda: darts_8cells(C=4), (3, 24, 24)),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_zoo_model_random_removals_are_exact(name):
    make, shape = SMALL[name]
    model = randomize_(make()).eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    space = fxoto.build_space(model, (x,))
    assert len(space.groups) >= 5
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(2):
        model.load_state_dict(original)
        ids = space.sample_removal(0.5, seed)
        space.zero_(ids)
        with torch.no_grad():
            expected = model(x)
            sub = space.construct_subnet()
            got = sub(x)
        assert torch.allclose(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=0)
        assert_groups_leave(space, ids, sub)


def test_erasing_the_second_towers_exit_erases_the_whole_tower():
    """Paper, Figure 5c: the right-hand U-Net is disabled by one zero GeZIG."""
    model = randomize_(StackedUnets(widths=(4, 6, 8))).eval()
    x = torch.randn(2, 3, 16, 16)
    space = fxoto.build_space(model, (x,))
    exit_group = [g for g in space.groups if g.nodes[-1].startswith("unet2_decoders_0")]
    assert len(exit_group) == 1
    space.zero_([exit_group[0].id])
    with torch.no_grad():
        expected = model(x)
    sub = space.construct_subnet([exit_group[0].id])
    with torch.no_grad():
        assert torch.allclose(sub(x), expected, atol=1e-5)
    assert not [n for n in sub.graph.nodes if n.name.startswith("unet2")]
    assert not hasattr(sub, "unet2")
    assert [n for n in sub.graph.nodes if n.name.startswith("unet1")]


def test_super_resnet_blocks_offer_each_kernel_size():
    space = fxoto.build_space(super_resnet(widths=(4, 6, 8), depths=(1, 1, 1)).eval(), (torch.randn(1, 3, 16, 16),))
    kernels = set()
    for g in space.groups:
        for m in g.members:
            p = dict(space.gm.named_parameters())[m.param]
            if p.dim() == 4:
                kernels.add(p.shape[-1])
    assert {3, 5, 7} <= kernels
