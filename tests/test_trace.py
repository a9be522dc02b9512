"""fxoto's ``Tracer`` records fx's own graph: the same nodes, names, arguments, users and meta.

``Tracer`` replaces parts of ``torch.fx.Tracer`` with cheaper ones (one walk over the module
tree, nodes made without fx's SymInt scan); each model here is traced by both, on two copies
built alike, and the graphs are compared field by field.
"""

import math

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxoto
from fxoto.shapes import CONSTANT
from fxoto.trace import Tracer, graph_module
from fxoto.zoo import MODELS
from zoo_models import build


def recorded(tracer: fx.Tracer, graph: fx.Graph) -> tuple[list, list]:
    # fx puts a tensor made in forward on the model; fxoto keeps it in its get_attr node's meta
    nodes = [(n.name, n.op, n.target if callable(n.target) else str(n.target), repr(n.args), repr(n.kwargs),
              [u.name for u in n.users], n.type, {k: v for k, v in n.meta.items() if k != CONSTANT})
             for n in graph.nodes]
    return nodes, list(tracer.tensor_attrs.values())


def assert_traced_as_fx_does(make, concrete_args=None) -> None:
    fx_tracer, ours = fx.Tracer(), Tracer()
    expected = recorded(fx_tracer, fx_tracer.trace(make(), concrete_args))
    assert recorded(ours, ours.trace(make(), concrete_args)) == expected


class Scaled(nn.Module):
    """Tensors held as plain attributes (constants), a buffer, and ``math`` on a proxy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = torch.full((1, 4, 1, 1), 2.0)
        self.register_buffer("shift", torch.ones(1, 4, 1, 1))
        self.unused = torch.zeros(3)

    def forward(self, x):
        y = self.conv(x) * self.scale + self.shift
        return y / math.sqrt(y.size(1)) + torch.ones(4, 1, 1)  # the last one a constant made in forward


class Shared(nn.Module):
    """One module (holding a constant) under two parents, a ``None`` child, keyword arguments,
    Python control flow (traced with ``concrete_args``)."""

    def __init__(self):
        super().__init__()
        inner = Scaled()
        self.a = nn.Sequential(inner, nn.ReLU())
        self.b = nn.ModuleDict({"again": inner})
        self.register_module("absent", None)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x, flag: bool = True):
        y = self.a(x) + self.b["again"](x)
        y = torch.flatten(self.pool(input=y), start_dim=1)
        return y if flag else -y


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf", "googlenet",
                                  "swin_t", "maxvit_t"])
def test_torchvision_models_trace_as_fx_does(name):
    assert_traced_as_fx_does(lambda: build(name))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_models_trace_as_fx_does(name):
    def make():
        torch.manual_seed(0)
        return MODELS[name]()

    assert_traced_as_fx_does(make)


def test_constants_shared_modules_and_concrete_args_trace_as_fx_does():
    assert_traced_as_fx_does(Scaled)
    assert_traced_as_fx_does(Shared, concrete_args={"flag": True})
    assert_traced_as_fx_does(Shared, concrete_args={"flag": False})


def test_a_tensor_made_in_forward_stays_off_the_model():
    # fx stores it on the root module, the user's model (maxvit_t gained attributes at every trace)
    model = Scaled()
    before = dict(vars(model))
    graph = Tracer().trace(model)
    (node,) = [n for n in graph.nodes if CONSTANT in n.meta]
    assert node.op == "get_attr" and node.target == "_tensor_constant0" and vars(model) == before
    gm = graph_module(model, graph)
    assert vars(model) == before and getattr(gm, "_tensor_constant0") is node.meta[CONSTANT]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    assert fxoto.build_space(model, (x,)).gm(x).equal(model(x)) and vars(model) == before


def test_a_function_traces_as_fx_does():
    assert_traced_as_fx_does(lambda: (lambda x: torch.relu(x) + 1))
