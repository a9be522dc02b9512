"""The sub-network rewrite on the paper's DemoSupNet, and what users do with the result."""

import importlib.util
import operator
import sys

import pytest
import torch

import fxoto
from fxoto.zoo import DemoSupNet
from strategies import Branch, NetSpec, RandomSupNet, Step, randomize
from util import randomize_

G2, G3, G4, G7, G8 = range(5)


def demo(**widths):
    widths = widths or dict(stem_width=6, branch_width=4, mid_width=5, add_width=7)
    return randomize_(DemoSupNet(**widths)).eval()


@pytest.fixture
def erased_demo():
    model = demo()
    x = torch.randn(4, 1, 28, 28)
    space = fxoto.build_space(model, (x,))
    space.zero_([G2, G3, G8])
    with torch.no_grad():
        expected = model(x)
    return model, space, space.construct_subnet(), x, expected


def test_demosupnet_subnet_is_figure_3c(erased_demo):
    model, space, sub, x, expected = erased_demo
    with torch.no_grad():
        assert torch.allclose(sub(x), expected, atol=1e-6)
    names = {n.name for n in sub.graph.nodes}
    # Conv2-BN2, MaxPool-Conv3-BN3 and Conv8-BN8 are gone ...
    assert not names & {"conv2", "bn2", "maxpool", "conv3", "bn3", "conv8", "bn8"}
    assert {"conv1", "bn1", "avgpool", "conv4", "bn4", "conv6", "bn6", "conv7", "bn7", "linear"} <= names
    # ... the columns of Conv6 that read them too ...
    assert sub.conv6.weight.shape[1] == 4 and sub.conv6.in_channels == 4
    assert torch.equal(sub.conv6.weight, model.conv6.weight[:, 8:12])
    # ... and the Concat and the Add, left with one input each, are unnecessary.
    assert not [n for n in sub.graph.nodes if n.target in (torch.cat, operator.add)]
    assert not hasattr(sub, "conv2") and not hasattr(sub, "bn8")


def test_super_network_is_untouched(erased_demo):
    model, space, sub, x, expected = erased_demo
    assert model.conv6.weight.shape[1] == 12
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    theirs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not theirs & {t.data_ptr() for t in [*sub.parameters(), *sub.buffers()]}


def test_invalid_zero_pattern_is_refused_naming_the_joint():
    model = demo()
    space = fxoto.build_space(model, (torch.randn(1, 1, 28, 28),))
    space.zero_([G7, G8])
    with pytest.raises(fxoto.InvalidRemovalError, match="node 'add'"):
        space.construct_subnet()


def test_subnet_survives_save_and_load(erased_demo, tmp_path):
    _, _, sub, x, expected = erased_demo
    torch.save(sub, tmp_path / "sub.pt")
    loaded = torch.load(tmp_path / "sub.pt", weights_only=False)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)


def test_subnet_survives_to_folder_and_fresh_import(erased_demo, tmp_path):
    _, _, sub, x, expected = erased_demo
    sub.to_folder(tmp_path / "demo_sub", "DemoSub")
    spec = importlib.util.spec_from_file_location("demo_sub", tmp_path / "demo_sub" / "module.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_sub"] = module
    try:
        spec.loader.exec_module(module)
        fresh = module.DemoSub().eval()
    finally:
        del sys.modules["demo_sub"]
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-6)


def test_subnet_scripts_and_exports(erased_demo):
    _, _, sub, x, expected = erased_demo
    scripted = torch.jit.script(sub)
    with torch.no_grad():
        assert torch.allclose(scripted(x), expected, atol=1e-6)
    exported = torch.export.export(sub, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), expected, atol=1e-6)


def test_subnet_trains_and_changes_dtype(erased_demo):
    _, _, sub, x, expected = erased_demo
    wide = sub.to(torch.float64)
    with torch.no_grad():
        assert torch.allclose(wide(x.double()), expected.double(), atol=1e-6)
    sub = wide.float().train()
    loss = sub(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sub.parameters())
    before = sub.conv7.weight.detach().clone()
    torch.optim.SGD(sub.parameters(), lr=0.1).step()
    assert not torch.equal(before, sub.conv7.weight)


def test_all_inputs_of_a_dead_add_erased():
    """Hypothesis counterexample: an add whose every input is erased and whose only
    user is erased too must vanish, not crash the rewrite."""
    spec = NetSpec(
        in_channels=1, size=2, head_flatten=False, classes=1,
        steps=(
            Step("add", tuple(Branch(0, 3, 1, False, "gelu", False) for _ in range(3))),
            Step("add", (Branch(1, 3, 1, False, "gelu", False),) + tuple(Branch(0, 3, 1, False, "gelu", False) for _ in range(3))),
        ),
    )
    model = randomize(RandomSupNet(spec), seed=0)
    x = torch.randn(1, 1, 2, 2)
    space = fxoto.build_space(model, (x,))
    first_add = [g.id for g in space.groups if all("branches_0" in n for n in g.nodes)]
    reads_it = [g.id for g in space.groups if g.nodes[0].startswith("add")]
    ids = first_add + reads_it
    assert space.is_valid_removal(ids)
    space.zero_(ids)
    with torch.no_grad():
        assert torch.allclose(space.construct_subnet()(x), model(x), atol=1e-6)


class SharedTrunk(torch.nn.Module):
    """``relu_(a + b)`` is safe on the sum's fresh tensor; once ``b`` is erased it would
    mutate ``a``, which the second branch still reads."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(2, 3, 1)
        self.b = torch.nn.Conv2d(3, 3, 1)
        self.c = torch.nn.Conv2d(3, 3, 1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        a = self.stem(x)
        s = self.relu(a + self.b(a))
        t = s + self.c(a)
        return self.head(t.mean((2, 3)))


def test_in_place_op_after_a_vanished_add_does_not_mutate_shared_input():
    model = randomize_(SharedTrunk()).eval()
    x = torch.randn(2, 2, 4, 4)
    space = fxoto.build_space(model, (x,))
    b = next(g.id for g in space.groups if g.nodes == ("b",))
    space.zero_([b])
    with torch.no_grad():
        expected = model(x)
        sub = space.construct_subnet()
        assert torch.allclose(sub(x), expected, atol=1e-6)
    # The one in-place op whose input became shared is now out-of-place; no other changed.
    assert not sub.get_submodule("relu_out_of_place").inplace
