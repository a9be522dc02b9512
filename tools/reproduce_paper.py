"""Rows of the paper's Table 1, measured by fxoto beside the paper's own figures.

    python tools/reproduce_paper.py --data-root DIR --epochs 30          # the paper's datasets
    python tools/reproduce_paper.py --embedded --epochs 6 --rows demosupnet   # what runs offline

Each row: build the super-network from ``fxoto.zoo``, search with H2SPG for K
groups, train, construct the sub-network, and measure parameters, MACs and
validation accuracy of both.  ``--embedded`` replaces every dataset with
scikit-learn's digits (resized to the model's input), so that the run needs no
download; its accuracies are not comparable to the paper's, its shape is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxoto.data import get_dataset
from fxoto.pipeline import Fitted, run
from fxoto.train import evaluate, fit
from fxoto.zoo import MODELS, example_input

# model, dataset, K, paper: (MACs M, params M, top-1) for baseline and OTOv3
ROWS = {
    "demosupnet": ("fashion_mnist", 3, (209, 0.82, 84.9), (107, 0.45, 84.7)),
    "stacked_unets": ("svhn", 0.5, (184, 0.80, 95.3), (115, 0.37, 96.1)),
    "darts8": ("stl10", 0.8, (614, 4.05, 74.6), (127, 0.64, 75.1)),
}


def baseline_accuracy(name, train, val, epochs, batch_size, lr, seed=0):
    """The super-network trained with plain SGD (same schedule and momentum as H2SPG's plain steps)."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    shape = tuple(example_input(name).shape[1:])
    loader = DataLoader(Fitted(train, shape), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    fit(model, opt, loader, nn.CrossEntropyLoss(), epochs, progress=False)
    return 100 * evaluate(model, DataLoader(Fitted(val, shape), batch_size=256), nn.CrossEntropyLoss())[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--embedded", action="store_true", help="use the embedded digits for every row")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--out", default="out/paper")
    args = parser.parse_args()
    table = []
    for name in args.rows:
        dataset, K, base, paper = ROWS[name]
        data = "digits" if args.embedded else dataset
        train, val = get_dataset(data, args.data_root)
        base_acc = baseline_accuracy(name, train, val, args.epochs, args.batch_size, args.lr)
        torch.manual_seed(0)
        result = run(MODELS[name](), example_input(name), train, val, K=K, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, variant="sgd", out=Path(args.out) / name)
        sup, sub = result.report_data.rows
        for label, row, ref, acc in (("baseline (SGD)", sup, base, base_acc),
                                     ("OTOv3 / fxoto", sub, paper, sub["accuracy (%)"])):
            table.append([name, data, label, f"{row['MACs'] / 1e6:.0f}", ref[0], f"{row['parameters'] / 1e6:.2f}",
                          ref[1], f"{acc:.2f}", ref[2]])
        print(tabulate(table[-2:], tablefmt="plain"), flush=True)
    headers = ["model", "data", "network", "MACs (M)", "paper", "params (M)", "paper", "top-1 (%)", "paper"]
    print()
    print(tabulate(table, headers=headers, disable_numparse=True))


if __name__ == "__main__":
    main()
