"""Datasets for the experiments of the OTOv3 paper (section 4) and an embedded default.

The paper trains DemoSupNet on Fashion-MNIST, StackedUnets on SVHN, DARTS on STL-10 and
SuperResNet on CIFAR-10 (Table 1 and 2). Those come through ``torchvision.datasets`` from a local
root, and are downloaded only when asked. The default, ``"digits"``, is scikit-learn's copy of
the UCI hand-written digits (1,797 grey 8x8 images, 10 classes): it ships with scikit-learn, so
it needs neither a network nor a data root.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from fxoto.errors import FxotoError

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "get_dataset",
    "load_digits_split",
    "torchvision_dataset",
]

#: Names ``get_dataset`` accepts; ``"digits"`` is embedded, the others come from torchvision.
DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "svhn", "stl10", "cifar10")


class DataNotFoundError(FxotoError, FileNotFoundError):
    """A dataset is not under the given root and downloading was not asked for."""


def load_digits_split(
    val_fraction: float = 0.2,
    seed: int = 0,
    image_size: int | None = None,
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits as a (train, validation) pair of ``TensorDataset``.

    Images are float32 of shape (N, 1, 8, 8) scaled to [0, 1] (the raw pixels are 0..16), or
    (N, 1, image_size, image_size) resized bilinearly when ``image_size`` is given (28 suits
    DemoSupNet). Labels are int64. The split is a random permutation drawn from ``seed``, so the
    same arguments always give the same split.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if image_size is not None:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * len(labels))
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def torchvision_dataset(
    name: str,
    root: str | Path,
    train: bool,
    download: bool = False,
    transform: Callable | None = None,
) -> Dataset:
    """One split of ``"fashion_mnist"``, ``"svhn"``, ``"stl10"`` or ``"cifar10"`` from torchvision.

    ``train`` picks the training split, otherwise the test split (STL-10: its labelled splits).
    ``transform`` defaults to ``ToTensor()``. Without ``download=True`` nothing is fetched, and
    a dataset missing from ``root`` raises ``DataNotFoundError``.
    """
    from torchvision import datasets, transforms

    if transform is None:
        transform = transforms.ToTensor()
    split = "train" if train else "test"
    constructors: dict[str, Callable[[], Dataset]] = {
        "fashion_mnist": lambda: datasets.FashionMNIST(
            root, train=train, transform=transform, download=download
        ),
        "svhn": lambda: datasets.SVHN(root, split=split, transform=transform, download=download),
        "stl10": lambda: datasets.STL10(root, split=split, transform=transform, download=download),
        "cifar10": lambda: datasets.CIFAR10(
            root, train=train, transform=transform, download=download
        ),
    }
    if name not in constructors:
        raise ValueError(
            f"unknown torchvision dataset {name!r}; choose one of {sorted(constructors)}"
        )
    if not download and not Path(root).is_dir():
        raise DataNotFoundError(_not_found(name, root))
    try:
        return constructors[name]()
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        if download:
            raise
        raise DataNotFoundError(_not_found(name, root)) from error


def get_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
) -> tuple[Dataset, Dataset]:
    """The (train, validation) pair of a dataset in ``DATASETS``.

    ``"digits"`` needs no root. For the torchvision datasets the validation set is the test split.
    """
    if name == "digits":
        return load_digits_split()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if root is None:
        raise DataNotFoundError(_not_found(name, None))
    return (
        torchvision_dataset(name, root, train=True, download=download),
        torchvision_dataset(name, root, train=False, download=download),
    )


def _not_found(name: str, root: str | Path | None) -> str:
    where = "no data root was given" if root is None else f"not found under {str(root)!r}"
    return (
        f"dataset {name!r}: {where}; pass download=True (or --download) to fetch it, "
        f"or point --data-root at a folder that holds it"
    )
