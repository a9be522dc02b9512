"""Every torchvision classification model: its search space builds and every GeZIG is zero-invariant."""

import pytest
import torch

import fxoto
from util import segment_ends
from zoo_models import EXPECTED_COUNTS, NO_JOINT, SHUFFLED, TORCHVISION, build, input_size


@pytest.mark.parametrize("name", TORCHVISION)
def test_search_space_of_torchvision_model(name):
    model = build(name)
    x = torch.randn(1, 3, input_size(name), input_size(name), generator=torch.Generator().manual_seed(1))
    space = fxoto.build_space(model, (x,))
    if name in NO_JOINT or name in SHUFFLED:
        assert space.groups == []
        return
    assert space.groups, f"{name}: residual or multi-branch structure but no GeZIG"
    if name in EXPECTED_COUNTS:
        assert len(space.groups) == EXPECTED_COUNTS[name]

    # Zero-invariance, numerically: before zeroing every segment end is non-zero;
    # with every group zeroed, every segment end is exactly zero at the moment
    # it is produced (later in-place ops cannot hide a failure).
    before = segment_ends(space, x)
    assert all(v.abs().sum() > 0 for v in before.values())
    space.zero_(range(len(space.groups)))
    after = segment_ends(space, x)
    not_zero = [str(space.groups[i]) for i, v in after.items() if v.abs().max() > 0]
    assert not not_zero, f"{name}: groups not zero-invariant: {not_zero[:3]}"


def random_valid_removal(space, seed):
    """Groups in a seeded random order, each kept while the removal stays valid, up to half."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(space.groups), generator=g).tolist()
    chosen = []
    for i in order:
        if len(chosen) >= max(1, len(order) // 2):
            break
        if space.is_valid_removal(chosen + [i]):
            chosen.append(i)
    return chosen


@pytest.mark.parametrize("name", [n for n in TORCHVISION if n not in NO_JOINT | SHUFFLED])
def test_subnet_of_torchvision_model_is_exact(name):
    model = build(name)
    x = torch.randn(2, 3, input_size(name), input_size(name), generator=torch.Generator().manual_seed(2))
    space = fxoto.build_space(model, (x,))
    state = model.state_dict()
    original = {k: v.clone() for k, v in state.items()}
    n_super = sum(p.numel() for p in model.parameters())
    for seed in range(3):
        for k, v in original.items():
            state[k].copy_(v)
        ids = random_valid_removal(space, seed)
        space.zero_(ids)
        with torch.no_grad():
            expected = model(x)
            sub = space.construct_subnet()
            got = sub(x)
        scale = max(1.0, expected.abs().max().item())
        assert torch.allclose(got, expected, atol=1e-5 * scale, rtol=0), f"{name} seed {seed}: {(got - expected).abs().max()}"
        assert sum(p.numel() for p in sub.parameters()) < n_super
