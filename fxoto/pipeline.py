"""The whole run behind ``fxoto demo`` and ``fxoto search``: data, search, H2SPG, sub-network, report.

Outputs in ``out``: ``subnet/`` (``GraphModule.to_folder``), ``subnet.pt``
(``torch.save``), ``report.md`` and ``report.json``, ``graph_before`` and
``graph_after`` pictures of the dependency graph, and ``checkpoints/``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fxoto
from fxoto import viz
from fxoto.data import get_dataset
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
    report_data: Report
    out: Path

    @property
    def report(self) -> str:
        return self.report_data.table


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
) -> RunResult:
    """Search space, H2SPG training, sub-network, report, saved outputs."""
    torch.manual_seed(seed)
    shape = tuple(example.shape[1:])
    train, val = Fitted(train, shape), Fitted(val, shape)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val, batch_size=256)
    out.mkdir(parents=True, exist_ok=True)

    search = fxoto.search(model, K, (example,))
    viz.render(viz.to_dot(search.space), out / "graph_before")
    total = epochs * len(train_loader)
    kwargs = {"variant": variant} if lr is None else {"variant": variant, "lr": lr}
    search.optimizer(total_steps=total, **kwargs)
    search.fit(train_loader, nn.CrossEntropyLoss(), epochs, val_loader=val_loader,
               checkpoint_dir=out / "checkpoints", resume=resume, progress=progress)

    model.eval()
    subnet = search.subnet()
    report = search_report(search, example, val_loader)
    viz.render(viz.to_dot(search.space, erased=report.erased), out / "graph_after")
    with warnings.catch_warnings():
        # to_folder pickles modules whose repr it cannot rebuild (ReLU ...): expected, not news.
        warnings.filterwarnings("ignore", message="Was not able to save the following children modules")
        subnet.to_folder(out / "subnet", "SubNet")
    torch.save(subnet, out / "subnet.pt")
    (out / "report.md").write_text(report.markdown())
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2))
    return RunResult(search, subnet, report, out)


def run_demo(out: Path, epochs: int | None = None, quick: bool = False, seed: int = 0) -> RunResult:
    """DemoSupNet (paper, Figure 1a) on scikit-learn's digits: K = 3, as in the paper's Figure 3."""
    from fxoto.zoo import DemoSupNet, example_input

    train, val = get_dataset("digits")
    if quick:
        model = DemoSupNet(stem_width=12, branch_width=8, mid_width=12, add_width=16)
        train = torch.utils.data.Subset(train, range(256))
    else:
        model = DemoSupNet()
    epochs = epochs or (1 if quick else 5)
    return run(model, example_input("demosupnet"), train, val, K=3, epochs=epochs, batch_size=64,
               lr=None, variant="sgd", out=out, seed=seed, progress=not quick)


def run_search(*, model: nn.Module, example: torch.Tensor, data: str, data_root, download: bool, K, epochs: int,
               batch_size: int, lr, variant: str, out: Path, resume, seed: int) -> RunResult:
    train, val = get_dataset(data, data_root, download)
    return run(model, example, train, val, K=K, epochs=epochs, batch_size=batch_size, lr=lr,
               variant=variant, out=out, resume=resume, seed=seed)
