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
