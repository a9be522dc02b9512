"""The embedded digits split and the errors for torchvision data that is not there."""

import pytest
import torch

from fxoto.data import (
    DATASETS,
    DataNotFoundError,
    get_dataset,
    load_digits_split,
    torchvision_dataset,
)
from fxoto.errors import FxotoError


def test_digits_split_sizes_and_dtypes():
    train, val = load_digits_split(val_fraction=0.2, seed=0)
    assert len(train) + len(val) == 1797
    assert len(val) == round(0.2 * 1797)
    x, y = train.tensors
    assert x.dtype == torch.float32 and x.shape == (len(train), 1, 8, 8)
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_digits_split_is_deterministic_by_seed_and_disjoint():
    a_train, a_val = load_digits_split(seed=3)
    b_train, b_val = load_digits_split(seed=3)
    c_train, _ = load_digits_split(seed=4)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert torch.equal(a_val.tensors[1], b_val.tensors[1])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])
    # No validation image is also a training image (the 1,797 digits hold no duplicates).
    train_rows = {tuple(r) for r in a_train.tensors[0].flatten(1).tolist()}
    assert not any(tuple(r) in train_rows for r in a_val.tensors[0].flatten(1).tolist())


def test_digits_resized_for_demosupnet():
    train, _ = load_digits_split(image_size=28)
    assert train.tensors[0].shape[1:] == (1, 28, 28)
    assert 0.0 <= train.tensors[0].min() and train.tensors[0].max() <= 1.0


def test_get_dataset_digits_is_the_default():
    assert DATASETS[0] == "digits"
    train, val = get_dataset("digits")
    assert len(train) + len(val) == 1797


@pytest.mark.parametrize("name", ["fashion_mnist", "svhn", "stl10", "cifar10"])
def test_missing_torchvision_data_raises_a_clear_error(tmp_path, name):
    with pytest.raises(DataNotFoundError, match=name) as info:
        torchvision_dataset(name, tmp_path / "absent", train=True)
    assert "download=True" in str(info.value) and "--data-root" in str(info.value)
    # An existing but empty root is just as absent.
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        torchvision_dataset(name, tmp_path, train=False)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, FxotoError)


def test_get_dataset_without_root_asks_for_one():
    with pytest.raises(DataNotFoundError, match="--data-root"):
        get_dataset("cifar10")
    with pytest.raises(ValueError, match="digits"):
        get_dataset("mnist")
