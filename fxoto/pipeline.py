"""The whole run behind ``fxoto demo`` and ``fxoto search``: data, search, H2SPG, sub-network, report.

Outputs in ``out``: ``subnet/`` (``GraphModule.to_folder``), ``subnet.pt``
(``torch.save``), ``report.md`` and ``report.json``, ``graph_before`` and
``graph_after`` pictures of the dependency graph, and ``checkpoints/``.

Under ``torchrun`` every rank builds the model, its search space and its share of the data,
trains in DDP and constructs the sub-network; rank 0 alone writes the outputs and the report.
``batch_size`` is the global batch, split evenly among the ranks, so the number of steps, H2SPG's
phases and the global batches do not depend on how many processes share the work.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import fxoto
from fxoto import distributed, viz
from fxoto.data import DeviceLoader, get_dataset, make_loader
from fxoto.report import Report, search_report


class Fitted(Dataset):
    """A dataset's images resized and channel-matched to what a model expects."""

    def __init__(self, base: Dataset, shape: tuple[int, int, int]):
        self.base, self.shape = base, shape

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        c, h, w = self.shape
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False).squeeze(0)
        if x.shape[0] != c:
            x = x.mean(0, keepdim=True).expand(c, h, w).contiguous()
        return x, y


@dataclass(frozen=True)
class RunResult:
    search: fxoto.Search
    subnet: torch.fx.GraphModule
    report_data: Report | None  # None on the ranks other than 0, which write nothing
    out: Path
    world_size: int = 1  # processes that trained the last epoch
    device: str = "cpu"
    amp: str | None = None

    @property
    def report(self) -> str:
        return self.report_data.table + "\n" + self.trained_on

    @property
    def trained_on(self) -> str:
        how = "1 process" if self.world_size == 1 else f"{self.world_size} processes (DistributedDataParallel)"
        return f"trained on {how}, device {self.device}, " + (f"{self.amp} mixed precision" if self.amp else "float32")


def run(
    model: nn.Module,
    example: torch.Tensor,
    train: Dataset,
    val: Dataset,
    *,
    K: int | float,
    epochs: int,
    batch_size: int,
    lr: float | None,
    variant: str,
    out: Path,
    resume: str | None = None,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    amp: str | None = None,
    structures: str = "operations",
) -> RunResult:
    """Search space, H2SPG training, sub-network, report, saved outputs.

    ``device``: where to train (default: the CPU); ``amp``: ``"bf16"``, ``"fp16"`` or None;
    ``structures``: the groups to search over, as in ``fxoto.search``.
    """
    torch.manual_seed(seed)  # the same initial values on every rank
    device = torch.device("cpu") if device is None else torch.device(device)
    amp = None if amp == "none" else amp
    world, rank = distributed.world_size(), distributed.rank()
    if batch_size % world:
        raise ValueError(f"the batch size {batch_size} is the global batch: it must divide evenly among the "
                         f"{world} processes")
    shape = tuple(example.shape[1:])
    train, val = Fitted(train, shape), Fitted(val, shape)
    train_loader = make_loader(train, batch_size // world, shuffle=True, seed=seed, device=device, rank=rank,
                               world_size=world)
    val_loader = make_loader(val, 256, device=device)

    search = fxoto.search(model, K, (example,), structures=structures)  # on the plain module, before DDP
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        viz.render(viz.to_dot(search.space), out / "graph_before")
    model.to(device)
    total = epochs * len(train_loader)
    kwargs = {"variant": variant} if lr is None else {"variant": variant, "lr": lr}
    search.optimizer(total_steps=total, **kwargs)
    history = search.fit(train_loader, nn.CrossEntropyLoss(), epochs, val_loader=val_loader, device=device, amp=amp,
                         checkpoint_dir=out / "checkpoints", resume=resume, progress=progress)

    model.eval()
    subnet = search.subnet()
    done = {"world_size": history.epochs[-1].world_size if history.epochs else world, "device": str(device), "amp": amp}
    if rank != 0:
        return RunResult(search, subnet, None, out, **done)
    report = search_report(search, example.to(device), DeviceLoader(val_loader, device))
    viz.render(viz.to_dot(search.space, erased=report.erased), out / "graph_after")
    with warnings.catch_warnings():
        # to_folder pickles modules whose repr it cannot rebuild (ReLU ...): expected, not news.
        warnings.filterwarnings("ignore", message="Was not able to save the following children modules")
        subnet.to_folder(out / "subnet", "SubNet")
    torch.save(subnet, out / "subnet.pt")
    result = RunResult(search, subnet, report, out, **done)
    (out / "report.md").write_text(report.markdown() + f"\n{result.trained_on}\n")
    (out / "report.json").write_text(json.dumps({**report.as_dict(), **done}, indent=2))
    return result


def run_demo(out: Path, epochs: int | None = None, quick: bool = False, seed: int = 0, device=None,
             amp: str | None = None) -> RunResult:
    """DemoSupNet (paper, Figure 1a) on scikit-learn's digits: K = 3, as in the paper's Figure 3."""
    from fxoto.zoo import DemoSupNet, example_input

    train, val = get_dataset("digits")
    if quick:
        model = DemoSupNet(stem_width=12, branch_width=8, mid_width=12, add_width=16)
        train = torch.utils.data.Subset(train, range(256))
    else:
        model = DemoSupNet()
    epochs = epochs or (1 if quick else 5)
    # Adam at its default lr (1e-3): with SGD at 0.05 (or 0.02) DemoSupNet's first epoch averaged a loss of
    # 5-13 (its 12,544-input classifier); Adam's first epoch averages 1.1 and the run ends at 98.6 %.
    return run(model, example_input("demosupnet"), train, val, K=3, epochs=epochs, batch_size=64,
               lr=None, variant="adam", out=out, seed=seed, progress=not quick, device=device, amp=amp)


def run_search(*, model: nn.Module, example: torch.Tensor, data: str, data_root, download: bool, K, epochs: int,
               batch_size: int, lr, variant: str, out: Path, resume, seed: int, device=None,
               amp: str | None = None, structures: str = "operations") -> RunResult:
    train, val = get_dataset(data, data_root, download)
    return run(model, example, train, val, K=K, epochs=epochs, batch_size=batch_size, lr=lr,
               variant=variant, out=out, resume=resume, seed=seed, device=device, amp=amp, structures=structures)
