"""Where H2SPG's hybrid step spends its time beyond SGD's: an ablation on resnet50.

Builds two throw-away variants of ``fxoto/optimizer.py`` by editing its source in memory
(each edit must match exactly once, so the script fails loudly when the code moves on) and
times, round by round on the same gradients, one step of:

* ``torch SGD(momentum=0.9)``;
* ``H2SPG``, the real one, in its hybrid phase;
* ``no finiteness check``: the per-parameter inf/NaN check removed;
* ``no check, no inner products``: also the redundant groups' inner products replaced by
  constants, leaving the plain steps and the scaled steps of the redundant members.

The variants are wrong optimizers (they never project, and ignore inf/NaN); they only say
what each part costs.

    PYTHONPATH=. .venv/bin/python tools/ablate_h2spg.py [--threads 2] [--K 10] [--rounds 25]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import fxoto

SOURCE = Path(__file__).resolve().parent.parent / "fxoto" / "optimizer.py"

NO_CHECK = [("            sq = probe.sum()", "            return\n            sq = probe.sum()")]
NO_DOTS = NO_CHECK + [
    ("                self._check_finite(p, grad, d.probe, stepped, sq=dots[1])\n", ""),
    ("dots = [torch.dot(x, x), torch.dot(x, v)]", "dots = [x.new_ones(()), x.new_zeros(())]"),
    ("dots.append(torch.dot(v, v))", "dots.append(x.new_zeros(()))"),
]


def variant(name: str, edits: list[tuple[str, str]]):
    source = SOURCE.read_text()
    for old, new in edits:
        if source.count(old) != 1:
            sys.exit(f"{SOURCE} changed: {old.strip()!r} is found {source.count(old)} times, not once")
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    model, x = torchvision.models.resnet50(), torch.randn(8, 3, 224, 224)
    space = fxoto.build_space(model, (x,))
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    modules = {"H2SPG": fxoto.optimizer, "no finiteness check": variant("no_check", NO_CHECK),
               "no check, no inner products": variant("no_dots", NO_DOTS)}
    opts = {"torch SGD(momentum=0.9)": torch.optim.SGD(list(model.parameters()), 1e-7, momentum=0.9)}
    for label, module in modules.items():
        opt = module.H2SPG(space, args.K, 1e-7, warmup_steps=1, pruning_steps=10**9)
        opt.step()
        opts[label] = opt
    for opt in opts.values():
        opt.step()  # state allocated, first hybrid pass done
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for label, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    sgd = med["torch SGD(momentum=0.9)"]
    print(f"resnet50, batch 8, K={args.K}, {args.threads} threads, median of {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(tabulate([[k, f"{v:.2f}", f"{v / sgd:.2f}x"] for k, v in med.items()],
                   headers=["step", "ms", "vs SGD"], disable_numparse=True))


if __name__ == "__main__":
    main()
