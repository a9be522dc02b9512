"""Every torchvision classification model: its search space builds with the shapes of a real
run, every GeZIG is zero-invariant, and random valid removals give exact sub-networks."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxoto
from fxoto.shapes import SHAPE
from util import assert_groups_leave, real_shapes, segment_ends
from zoo_models import EXPECTED_COUNTS, NO_JOINT, TORCHVISION, build, input_size


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    original: dict
    operations: fxoto.SearchSpace | None = None

    def space(self) -> fxoto.SearchSpace:
        """The operations search space, built once for both tests (a space keeps no state of its own)."""
        if self.operations is None:
            self.operations = fxoto.build_space(self.model, (self.x,))
        return self.operations

    @torch.no_grad()
    def reset(self):
        state = self.model.state_dict()
        for k, v in self.original.items():
            state[k].copy_(v)


@pytest.fixture(scope="module", params=TORCHVISION)
def case(request):
    """Each model is built once (module scope: pytest runs both tests on it in a row)."""
    name = request.param
    model = build(name)
    x = torch.randn(2, 3, input_size(name), input_size(name), generator=torch.Generator().manual_seed(1))
    return Case(name, model, x, {k: v.clone() for k, v in model.state_dict().items()})


def test_search_space_of_torchvision_model(case):
    case.reset()
    space = case.space()
    recorded = {n.name: n.meta[SHAPE] for n in space.graph.nodes}
    assert recorded == real_shapes(space.graph, case.model, (case.x,)), f"{case.name}: recorded shapes differ from a real run's"
    if case.name in NO_JOINT:
        assert space.groups == []
        return
    assert space.groups, f"{case.name}: residual or multi-branch structure but no GeZIG"
    if case.name in EXPECTED_COUNTS:
        assert len(space.groups) == EXPECTED_COUNTS[case.name]
    if case.name.startswith("shufflenet"):  # the shuffle and the chunk are followed: nothing set aside
        assert not space.excluded, space.excluded[0].reason

    # Zero-invariance, numerically: before zeroing every segment end is non-zero;
    # with every group zeroed, every segment end is exactly zero at the moment
    # it is produced (later in-place ops cannot hide a failure).
    before = segment_ends(space, case.x)
    assert all(v.abs().sum() > 0 for v in before.values())
    space.zero_(range(len(space.groups)))
    after = segment_ends(space, case.x)
    not_zero = [str(space.groups[i]) for i, v in after.items() if v.abs().max() > 0]
    assert not not_zero, f"{case.name}: groups not zero-invariant: {not_zero[:3]}"


def test_subnet_of_torchvision_model_is_exact(case):
    case.reset()
    space = case.space()
    if not space.groups:
        assert case.name in NO_JOINT
        return
    assert_random_removals_exact(case, space, case.x, "operations", by_zeros=True)


def assert_random_removals_exact(case: Case, space, x: torch.Tensor, what: str, by_zeros: bool = False) -> None:
    """3 random valid removals: the sub-network equals the zeroed super-network and is smaller
    (``by_zeros``: the rewrite finds the zero groups itself; else it is given their ids)."""
    n_super = sum(p.numel() for p in case.model.parameters())
    for seed in range(3):
        case.reset()
        ids = space.sample_removal(0.5, seed)
        space.zero_(ids)
        with torch.no_grad():
            expected = case.model(x)
            sub = space.construct_subnet(None if by_zeros else ids)
            got = sub(x)
        scale = max(1.0, expected.abs().max().item())
        assert torch.allclose(got, expected, atol=1e-5 * scale, rtol=0), \
            f"{case.name} {what} seed {seed}: {(got - expected).abs().max()}"
        assert sum(p.numel() for p in sub.parameters()) < n_super
        assert_groups_leave(space, ids, sub)


# Channel groups counted by hand: resnet18's four residual streams (64 + 128 + 256 + 512) and its
# eight blocks' inner convolutions (2 x (64 + 128 + 256 + 512)); densenet121's conv0 (64), its 58
# dense layers' bottleneck (128) and growth (32) convolutions and its transitions (128, 256, 512).
CHANNEL_COUNTS = {"resnet18": 2880, "densenet121": 10240}


@pytest.mark.parametrize("structures", ["channels", "both"])
def test_channel_removals_of_torchvision_model_are_exact(case, structures):
    """3 random removals of channel groups (structures="channels") or of both kinds ("both"):
    the sub-network equals the zeroed super-network and is smaller.  A model with no channel
    group says why in its excluded reasons."""
    case.reset()
    x = case.x[:1]  # one image: half the time of the two-image checks above
    space = fxoto.build_space(case.model, (x,), structures=structures)
    channel = sum(g.kind == "channel" for g in space.groups)
    reasons = [e.reason for e in space.excluded if e.reason.startswith("channels: ")]
    assert all(len(r) > len("channels: ") for r in reasons)
    if structures == "channels" and case.name in CHANNEL_COUNTS:
        assert channel == CHANNEL_COUNTS[case.name]
    if not channel:
        assert reasons, f"{case.name}: no channel group and no stem set aside with a reason"
        return  # "both": operation removals alone, test_subnet_of_torchvision_model_is_exact
    assert_random_removals_exact(case, space, x, structures)
