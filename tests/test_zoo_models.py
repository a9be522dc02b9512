"""The zoo's super-networks trace with torch.fx and keep their outputs and paper sizes."""

import pytest
import torch
from torch import fx, nn

from fxoto.zoo import (
    INPUT_SHAPES,
    MODELS,
    StackedUnets,
    darts_8cells,
    darts_14cells,
    demosupnet,
    example_input,
    stacked_unets,
    super_resnet,
)

# Small instances where the registered model is big; inputs of the model's natural shape or,
# for the ImageNet DARTS, the smallest that its three halvings and two reductions allow.
SMALL = {
    "demosupnet": (demosupnet, (1, 28, 28)),
    "stacked_unets": (stacked_unets, (3, 32, 32)),
    "super_resnet": (lambda: super_resnet(widths=(8, 16, 32), depths=(1, 1, 1)), (3, 32, 32)),
    "darts8": (lambda: darts_8cells(C=4), (3, 96, 96)),
    "darts14": (lambda: darts_14cells(num_classes=10, C=4), (3, 32, 32)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # DARTS runs thousands of tiny convolutions: intra-op threads only add synchronisation, which
    # on a busy two-core machine slows these tests by an order of magnitude.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BN non-trivial statistics and affine values, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("name", sorted(SMALL))
@torch.no_grad()
def test_traced_output_equals_eager(name):
    build, shape = SMALL[name]
    torch.manual_seed(0)
    model = build().eval()
    randomize_batchnorm(model)
    traced = fx.symbolic_trace(model)
    x = torch.randn(2, *shape)
    expected = model(x)
    assert expected.shape == (2, 10)
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)


def test_registry_names_and_input_shapes():
    assert set(MODELS) == {"demosupnet", "stacked_unets", "super_resnet", "darts8", "darts14"}
    assert set(INPUT_SHAPES) == set(MODELS)
    assert example_input("darts14", batch=3).shape == (3, 3, 224, 224)
    with pytest.raises(KeyError, match="demosupnet"):
        example_input("resnet")


@pytest.mark.parametrize("name", ["demosupnet", "stacked_unets", "super_resnet"])
@torch.no_grad()
def test_registered_model_accepts_its_example_input(name):
    model = MODELS[name]().eval()
    assert model(example_input(name, batch=2)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "paper_millions"),
    [("demosupnet", 0.82), ("stacked_unets", 0.80), ("darts8", 4.05)],
)
def test_parameter_count_near_paper_table_1(name, paper_millions):
    assert n_params(MODELS[name]()) == pytest.approx(paper_millions * 1e6, rel=0.10)


def test_demosupnet_has_the_figure_1a_modules():
    model = demosupnet()
    names = dict(model.named_children())
    for i in (1, 2, 3, 4, 6, 7, 8):
        assert isinstance(names[f"conv{i}"], nn.Conv2d)
        assert isinstance(names[f"bn{i}"], nn.BatchNorm2d)
    assert "conv5" not in names and "bn5" not in names
    graph = fx.symbolic_trace(model).graph
    users = {n.name: {u.name for u in n.users} for n in graph.nodes}
    assert users["relu1"] == {"conv2", "maxpool", "avgpool"}
    assert users["relu6"] == {"conv7", "conv8"}
    cat = next(n for n in graph.nodes if n.target is torch.cat)
    assert [a.name for a in cat.args[0]] == ["bn2", "bn3", "bn4"]


@torch.no_grad()
def test_zero_last_conv_bn_of_second_unet_disables_it():
    """Paper, Figure 5c: the second U-Net's output Conv-BN is zero, so only the first counts."""
    torch.manual_seed(0)
    model: StackedUnets = stacked_unets().eval()
    randomize_batchnorm(model)
    _, conv, bn = model.unet2.decoders[0]
    conv.weight.zero_()
    bn.weight.zero_()
    bn.bias.zero_()
    x = torch.randn(2, 3, 32, 32)
    first_tower = model.unet1(model.stem(x))
    first_tower_only = model.fc(torch.flatten(model.avgpool(model.relu(first_tower)), 1))
    torch.testing.assert_close(model(x), first_tower_only, rtol=0, atol=0)
    assert model.unet2(model.stem(x)).abs().max() == 0
