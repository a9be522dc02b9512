"""H2SPG's lambda rule and redundancy score, ablated by training on the embedded digits.

For each zoo model and seed, the same epochs, batches and learning rate:

* ``SGD``: the super-network trained with ``torch.optim.SGD(momentum=0.9)``, the baseline;
* ``H2SPG`` with each ``lambda_rule`` (``"deadline"``, fxoto's; ``"paper"``, DHSPG's rule
  alone) and each redundancy score (``rms``, fxoto's ``redundancy_score``; ``reference``,
  the OTO code's ``reference_score``), K groups, phases from ``Search.optimizer``'s
  defaults (warm-up 10 % of the run, hybrid budget the next 40 %).

Per run it prints the validation accuracy (the sub-network's, without fine-tuning, for
H2SPG), the mean training loss over the 5 steps before the first redundant group reached
zero and over the 5 steps after the last one did, how many groups the final projection
forced, the steps at which groups reached zero, and the parameters and MACs kept.  Then a
summary per model and configuration: means over the seeds.

    PYTHONPATH=. .venv/bin/python tools/ablate_h2spg.py [--models demosupnet ...] [--seeds 3] [--epochs 3] [--narrow 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn
from torch.utils.data import DataLoader

import fxoto
from fxoto.data import load_digits_split
from fxoto.metrics import count_flops, count_parameters
from fxoto.optimizer import redundancy_score, reference_score
from fxoto.pipeline import Fitted
from fxoto.zoo import DemoSupNet, StackedUnets, SuperResNet, example_input

K = {"demosupnet": 3, "stacked_unets": 0.5, "super_resnet": 0.5}
WIDTHS = {  # the zoo's widths; --narrow divides them (same architecture and GeZIGs, 1/narrow^2 the MACs)
    "demosupnet": lambda n: DemoSupNet(stem_width=96 // n, branch_width=48 // n, mid_width=96 // n, add_width=256 // n),
    "stacked_unets": lambda n: StackedUnets(widths=(32 // n, 52 // n, 128 // n)),
    "super_resnet": lambda n: SuperResNet(widths=(32 // n, 64 // n, 128 // n)),
}
CONFIGS = [("SGD", None, None)] + [("H2SPG", rule, score) for rule in ("deadline", "paper")
                                   for score in ("rms", "reference")]
SCORES = {"rms": redundancy_score, "reference": reference_score}
WINDOW = 5  # steps averaged on each side of the zeroing


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * right / total


def train_one(name: str, seed: int, config, train, val, epochs: int, batch_size: int, lr: float,
              narrow: int) -> dict:
    kind, rule, score = config
    torch.manual_seed(seed)
    model = WIDTHS[name](narrow)
    shape = tuple(example_input(name).shape[1:])
    loader = DataLoader(Fitted(train, shape), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(Fitted(val, shape), batch_size=256)
    total = epochs * len(loader)
    if kind == "SGD":
        opt, space = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), None
    else:
        s = fxoto.search(model, K[name], example_input(name))
        opt, space = s.optimizer(lr=lr, total_steps=total, lambda_rule=rule, score_fn=SCORES[score]), s.space
    losses = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    row = {"model": name, "seed": seed, "config": kind if kind == "SGD" else f"{rule}, {score}",
           "seconds": time.perf_counter() - t0}
    example = example_input(name)
    if space is None:
        row.update(accuracy=accuracy(model, val_loader), params=1.0, macs=1.0)
        return row
    sub = space.construct_subnet()
    at = sorted(opt.zeroed_at.values())
    row.update(
        accuracy=accuracy(sub, val_loader),
        super_accuracy=accuracy(model, val_loader),
        loss_before=statistics.mean(losses[max(0, at[0] - WINDOW):at[0]] or losses[:1]),
        loss_after=statistics.mean(losses[at[-1] + 1:at[-1] + 1 + WINDOW] or losses[-1:]),
        forced=len(opt.forced),
        zeroed_at=f"{at[0]}-{at[-1]}" if at[0] != at[-1] else str(at[0]),
        budget=f"{opt.warmup_steps}-{opt.warmup_steps + opt.pruning_steps - 1}",
        params=count_parameters(sub) / count_parameters(model),
        macs=count_flops(sub, example) / count_flops(model, example),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(K))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--narrow", type=int, default=1, help="divide every model's widths by this")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    train, val = load_digits_split()
    rows = []
    for name in args.models:
        for seed in range(args.seeds):
            for config in CONFIGS:
                row = train_one(name, seed, config, train, val, args.epochs, args.batch_size, args.lr, args.narrow)
                rows.append(row)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    headers = ["model", "seed", "config", "accuracy", "super_accuracy", "loss_before", "loss_after", "forced",
               "zeroed_at", "budget", "params", "macs", "seconds"]
    print("\nper run (accuracy: the sub-network's without fine-tuning; params and MACs: fraction kept)")
    print(tabulate([[r.get(h, "") for h in headers] for r in rows], headers=headers, floatfmt=".3f",
                   tablefmt="github"))
    summary = []
    for name in args.models:
        for kind, rule, score in CONFIGS:
            label = kind if kind == "SGD" else f"{rule}, {score}"
            runs = [r for r in rows if r["model"] == name and r["config"] == label]
            mean = {k: statistics.mean(r[k] for r in runs) for k in ("accuracy", "params", "macs")}
            extra = {k: statistics.mean(r[k] for r in runs) for k in ("loss_before", "loss_after", "forced")} \
                if kind != "SGD" else {}
            summary.append([name, label, f"{mean['accuracy']:.2f}",
                            f"{min(r['accuracy'] for r in runs):.2f}-{max(r['accuracy'] for r in runs):.2f}",
                            f"{extra['loss_before']:.3f}" if extra else "", f"{extra['loss_after']:.3f}" if extra else "",
                            f"{extra['forced']:.1f}" if extra else "", f"{mean['params']:.3f}", f"{mean['macs']:.3f}"])
    print(f"\nmeans over {args.seeds} seeds, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"widths / {args.narrow}")
    print(tabulate(summary, headers=["model", "config", "accuracy (%)", "range", "loss before", "loss after",
                                     "forced", "params kept", "MACs kept"], tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
