"""Device correctness: the rewrite makes its index tensors beside the tensors they index, returns the
sub-network on the super-network's device, and a model on several devices or on ``meta`` is refused."""

import pytest
import torch
from torch import nn

import fxoto
from fxoto.zoo import DemoSupNet
from test_shared_layers import SharedMix
from util import randomize_


def small_demo():
    return randomize_(DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7)).eval()


def test_model_on_meta_is_refused_at_build_time():
    with torch.device("meta"):
        model = DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7)
    with pytest.raises(fxoto.DeviceError, match=r"meta device \(first: 'conv1.weight'\).*to_empty"):
        fxoto.build_space(model, (torch.randn(1, 1, 28, 28),))


def test_model_partly_on_meta_is_refused_by_search():
    model = small_demo()
    model.linear.to("meta")  # the rest stays on the CPU
    with pytest.raises(fxoto.DeviceError, match="'linear.weight'"):
        fxoto.search(model, 2, torch.randn(1, 1, 28, 28))


def test_model_spread_over_two_devices_is_refused():
    """A model whose parameters live on two devices: here a buffer on meta stands in for a second
    accelerator, so the check runs on a CPU-only machine."""
    model = small_demo()
    model.bn8.register_buffer("running_mean", torch.empty(7, device="meta"))
    with pytest.raises(fxoto.DeviceError, match="bn8.running_mean"):
        fxoto.build_space(model, (torch.randn(1, 1, 28, 28),))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("make, shape", [(small_demo, (2, 1, 28, 28)), (lambda: randomize_(SharedMix()).eval(), (2, 3, 6, 6))])
def test_subnet_on_cuda_is_exact_and_stays_on_cuda(make, shape):
    model = make().cuda()
    x = torch.randn(*shape, device="cuda")
    space = fxoto.build_space(model, (x,))
    ids = space.sample_removal(0.5, seed=0)
    space.zero_(ids)
    with torch.no_grad():
        expected = model(x)
        sub = space.construct_subnet()
        got = sub(x)
    assert all(t.device.type == "cuda" for t in [*sub.parameters(), *sub.buffers()])
    assert torch.allclose(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=0)


@needs_cuda
def test_densenet_like_concat_subnet_on_cuda():
    """cat -> BN -> ReLU -> conv: slice indices for the batch norm and the conv on CUDA."""
    import torchvision

    model = torchvision.models.densenet121(num_classes=10).eval().cuda()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    space = fxoto.build_space(model, (x,))
    ids = space.sample_removal(0.5, seed=1)
    space.zero_(ids)
    with torch.no_grad():
        expected = model(x)
        got = space.construct_subnet()(x)
    assert torch.allclose(got, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=0)
