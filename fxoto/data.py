"""Datasets for the experiments of the OTOv3 paper (section 4) and an embedded default.

The paper trains DemoSupNet on Fashion-MNIST, StackedUnets on SVHN, DARTS on STL-10 and
SuperResNet on CIFAR-10 (Table 1 and 2). Those come through ``torchvision.datasets`` from a local
root, and are downloaded only when asked. The default, ``"digits"``, is scikit-learn's copy of
the UCI hand-written digits (1,797 grey 8x8 images, 10 classes): it ships with scikit-learn, so
it needs neither a network nor a data root.

``make_loader`` builds fxoto's own loaders: shuffled by ``DistributedSampler``'s rule (a
permutation drawn from seed + epoch, the same on every rank), sharded across the processes of a
``torchrun`` job, and with pinned memory when the batches go to a CUDA device. ``to_device`` and
``DeviceLoader`` move batches to the model's device.
"""

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from fxoto.errors import FxotoError

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DeviceLoader",
    "get_dataset",
    "load_digits_split",
    "make_loader",
    "to_device",
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


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A ``DataLoader`` over this process's share of ``dataset``, ``batch_size`` samples a batch.

    With ``shuffle`` or ``world_size > 1`` the order is ``DistributedSampler``'s: every rank
    draws the same permutation from ``seed`` and the epoch (``fxoto.train.fit`` calls
    ``set_epoch``) and takes every ``world_size``-th sample from position ``rank``, so an epoch's
    global batches are the same for any number of processes that share a global batch size.
    Memory is pinned when ``device`` is a CUDA device, so that copies to it can be non-blocking.
    """
    sampler = None
    if shuffle or world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, pin_memory=pin)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) on ``device``.

    Copies from the CPU to a CUDA device are non-blocking: from pinned memory they overlap
    with the work already queued there.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda" and batch.device.type == "cpu")
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class DeviceLoader:
    """The batches of ``loader``, moved to ``device`` as they come."""

    def __init__(self, loader: Iterable, device: torch.device | str):
        self.loader, self.device = loader, torch.device(device)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)
