"""Operations and channels in one search space (``structures="both"``), measured on the embedded digits.

    PYTHONPATH=. .venv/bin/python tools/reproduce_structures.py --epochs 3

For each network, the same epochs, batches, learning rate and seed:

* ``SGD``: the whole network trained with ``torch.optim.SGD(momentum=0.9)``, the baseline;
* ``H2SPG``: ``fxoto.search(model, K, x, structures="both")`` with K per kind of group,
  ``Search.optimizer``'s phases (warm-up 10 % of the run, hybrid budget the next 40 %), then
  ``construct_subnet()`` with no fine-tuning.

Networks: ``demosupnet`` (the paper's DemoSupNet: operation groups and the channel groups of
the layers outside them) and ``vgg`` (conv-bn-relu blocks, pooling, a linear head: no joints,
so its ``"both"`` space holds channel groups only; ``structures="operations"`` refuses it).

Per run: groups zeroed per kind, parameters and MACs (thop) with their share of the baseline's,
test accuracy (the sub-network's for H2SPG) and the largest absolute difference between the
sub-network's and the trained super-network's outputs over the whole test set.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.data import DataLoader

import fxoto
from fxoto.data import load_digits_split
from fxoto.errors import NoSearchSpaceError
from fxoto.metrics import count_flops, count_parameters
from fxoto.space import kind_counts
from fxoto.train import evaluate, fit
from fxoto.zoo import DemoSupNet

EXAMPLE = torch.zeros(1, 1, 28, 28)


class VGGDigits(nn.Sequential):
    """A VGG-style chain for 1x28x28 images: two stages of two conv-bn-relu blocks and a
    max-pool each, then flatten and a two-layer linear head."""

    def __init__(self, widths: tuple[int, int] = (32, 64), hidden: int = 128, num_classes: int = 10) -> None:
        layers: list[nn.Module] = []
        c = 1
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            layers.append(nn.MaxPool2d(2))
        side = 28 // 2 ** len(widths)
        layers += [nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)


# name: (builder over a width divisor, K per kind)
NETWORKS = {
    "demosupnet": (lambda n: DemoSupNet(stem_width=96 // n, branch_width=48 // n, mid_width=96 // n,
                                        add_width=256 // n), {"operations": 2, "channels": 0.5}),
    "vgg": (lambda n: VGGDigits(widths=(32 // n, 64 // n), hidden=128 // n), {"channels": 0.5}),
}


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, loader) -> float:
    """The largest |a(x) - b(x)| over every test image, both in eval mode."""
    a.eval()
    b.eval()
    return max(float((a(x) - b(x)).abs().max()) for x, _ in loader)


def operations_alone(name: str, narrow: int) -> str:
    """What ``structures="operations"`` makes of the network: its group count, or the refusal."""
    try:
        space = fxoto.search(NETWORKS[name][0](narrow), 1, (EXAMPLE,)).space
    except NoSearchSpaceError:
        return f"{name}: structures='operations' refused (NoSearchSpaceError: no joints)"
    return f"{name}: structures='operations' finds {len(space.groups)} operation groups"


def train_one(name: str, optimizer: str, train, test, *, epochs: int, batch_size: int, lr: float, seed: int,
              narrow: int) -> dict:
    """Train one network with SGD or H2SPG and measure it (for H2SPG, its sub-network).

    ``zeroed``: per kind of group, (groups that are exactly zero, groups of that kind);
    ``asked``: K per kind as counts."""
    build, K = NETWORKS[name]
    torch.manual_seed(seed)
    model = build(narrow)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test, batch_size=256)
    row = {"network": name, "optimizer": optimizer}
    t0 = time.perf_counter()
    if optimizer == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        fit(model, opt, loader, nn.CrossEntropyLoss(), epochs, progress=False)
        model.eval()
        row.update(structures="", K="", zeroed={}, net=model, diff=None)
    else:
        search = fxoto.search(model, K, (EXAMPLE,), structures="both")
        search.optimizer(lr=lr, total_steps=epochs * len(loader))
        search.fit(loader, nn.CrossEntropyLoss(), epochs, progress=False)
        model.eval()
        space = search.space
        zero = set(space.zero_groups())
        zeroed = {k: (sum(g.id in zero for g in space.groups if g.kind == k), sum(g.kind == k for g in space.groups))
                  for k in ("operation", "channel") if any(g.kind == k for g in space.groups)}
        sub = space.construct_subnet()
        row.update(structures="both", K=K, asked=kind_counts(K, space), zeroed=zeroed, net=sub,
                   diff=max_abs_diff(sub, model, test_loader))
    row["seconds"] = time.perf_counter() - t0
    net = row.pop("net")
    row.update(parameters=count_parameters(net), macs=count_flops(net, EXAMPLE),
               accuracy=100 * evaluate(net, test_loader, nn.CrossEntropyLoss())[1])
    return row


def table(rows: list[dict]) -> str:
    """Rows with parameters and MACs as a share of their network's SGD baseline."""
    base = {r["network"]: r for r in rows if r["optimizer"] == "SGD"}
    out = []
    for r in rows:
        b = base.get(r["network"], r)
        zeroed = ", ".join(f"{k} {z} of {n}" for k, (z, n) in r["zeroed"].items())
        out.append([r["network"], r["optimizer"], r["structures"], r["K"], zeroed,
                    f"{r['parameters']:,} ({100 * r['parameters'] / b['parameters']:.1f} %)",
                    f"{r['macs'] / 1e6:.2f} M ({100 * r['macs'] / b['macs']:.1f} %)",
                    f"{r['accuracy']:.2f}", "" if r["diff"] is None else f"{r['diff']:.2e}"])
    headers = ["network", "optimizer", "structures", "K", "groups zeroed", "parameters", "MACs",
               "test accuracy (%)", "max |sub - super|"]
    return tabulate(out, headers=headers, tablefmt="github", disable_numparse=True)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--narrow", type=int, default=1, help="divide every network's widths by this")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_digits_split(image_size=28)
    rows = []
    for name in args.networks:
        print(operations_alone(name, args.narrow), flush=True)
        for optimizer in ("SGD", "H2SPG"):
            rows.append(train_one(name, optimizer, train, test, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed, narrow=args.narrow))
            print(f"  {optimizer}: {rows[-1]['seconds']:.0f} s", flush=True)
    print(f"\n{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, widths / {args.narrow}, "
          f"{len(train)} training and {len(test)} test images (digits at 28x28)")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
