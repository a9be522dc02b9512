"""H2SPG's step time and state size against torch.optim.SGD(momentum=0.9) and Adam (DESIGN 8).

Gradients are computed once per model; then only ``opt.step()`` is timed, repeatedly, on
those same gradients (with subnormal floats flushed to zero, see ``main``).  The optimizers
take turns round by round, so that load from other processes falls on all of them alike;
the table gives medians.  ``--clock cpu`` times with the process's CPU time instead of the
wall clock: on a shared machine, time spent waiting for a core then does not count (memory
bandwidth taken by others still does).  H2SPG is timed in its hybrid phase with no redundant
group zero yet (the costly case: every redundant group takes the group-lasso step), and in
the pruned phase (redundant groups pinned at zero, their parameters skipped).  "state"
counts the bytes of the optimizer's state: per-parameter tensors plus H2SPG's per-group
scores and the three floats it keeps per redundant group (``_scale``).

    PYTHONPATH=. .venv/bin/python tools/bench_optimizer.py [--size 224] [--threads 2] [--clock cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision
from tabulate import tabulate

import fxoto
from fxoto.optimizer import H2SPG
from fxoto.zoo import DemoSupNet

LR = 1e-7  # tiny, so that repeated steps on one gradient keep the parameters (and phases) as they are


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    if isinstance(opt, H2SPG):  # per-group scores, and three floats per redundant group not yet zero
        h = opt.state_dict()["h2spg"]
        total += h["scores"].numel() * h["scores"].element_size() + 8 * sum(len(s) for s in h["stats"].values())
    return total


def hybrid(space: fxoto.SearchSpace, K: int, variant: str, pruned: bool) -> H2SPG:
    """An H2SPG past its one warm-up step: in the hybrid phase, or (pruned) past it."""
    opt = H2SPG(space, K, LR, variant=variant, warmup_steps=1, pruning_steps=0 if pruned else 10**9)
    opt.step()
    assert opt.phase == ("pruned" if pruned else "hybrid")
    return opt


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, Ks: list[int], rounds: int, steps: int,
          clock=time.perf_counter) -> list[list]:
    space = fxoto.build_space(model, (x,))
    model.train()
    labels = torch.randint(0, model(x[:1]).shape[1], (x.shape[0],), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    saved = [p.detach().clone() for p in params]

    def restore():  # pruned runs zero their redundant groups in the shared parameters
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    opts: dict[tuple[str, int | None], torch.optim.Optimizer] = {
        ("torch SGD(momentum=0.9)", None): torch.optim.SGD(params, LR, momentum=0.9),
        ("torch Adam", None): torch.optim.Adam(params, LR),
    }
    for pruned in (False, True):
        for K in Ks:
            for variant in ("sgd", "adam"):
                opts[(f"H2SPG {variant}, {'pruned' if pruned else 'hybrid'}", K)] = hybrid(space, K, variant, pruned)
                restore()  # each selects on the same parameters
    for opt in opts.values():  # state allocated before timing
        opt.step()
    restore()

    times: dict[tuple[str, int | None], list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for key, opt in opts.items():
            for _ in range(steps):
                t0 = clock()
                opt.step()
                times[key].append(clock() - t0)
        restore()
    for (label, _), opt in opts.items():
        if isinstance(opt, H2SPG) and "hybrid" in label:
            assert opt.phase == "hybrid" and opt.metrics()["zero_groups"] == 0, "a group went to zero while timing"

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    sgd, adam = med[("torch SGD(momentum=0.9)", None)], med[("torch Adam", None)]
    sgd_state = state_bytes(opts[("torch SGD(momentum=0.9)", None)])
    adam_state = state_bytes(opts[("torch Adam", None)])
    rows = []
    for (label, K), ms in med.items():
        opt = opts[(label, K)]
        if K is None:
            what = f"{name} ({n_params / 1e6:.2f} M params, {len(space.groups)} GeZIGs)"
        else:
            red = sum(space.groups[g].numel for g in opt.redundant)
            what = f"  K={K}: {red / n_params:.0%} of the params redundant"
        base_state = adam_state if "dam" in label else sgd_state
        rows.append([what, label, f"{ms:.2f}", f"{ms / sgd:.2f}x", f"{ms / adam:.2f}x",
                     f"{state_bytes(opt) / 2**20:.1f}", f"{state_bytes(opt) - base_state:+d}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="resnet50 input side (3 x size x size)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per optimizer per round")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock, or the process's CPU time (steadier on a loaded machine)")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    # Stepping many times on one gradient drives Adam's second moments of near-zero gradients
    # into subnormal floats, whose arithmetic is slow on x86: an artefact of the method.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    rows = bench("resnet50", torchvision.models.resnet50(), torch.randn(args.batch, 3, args.size, args.size), [5, 10],
                 args.rounds, args.steps, clock)
    rows += bench("DemoSupNet", DemoSupNet(), torch.randn(args.batch, 1, 28, 28), [3], args.rounds * 3, args.steps * 3,
                  clock)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{args.threads} threads, batch {args.batch}, resnet50 at 3x{args.size}x{args.size}; "
          f"{args.clock} clock, median over {args.rounds} rounds of {args.steps} steps (DemoSupNet: 3x as many)")
    print(tabulate(rows, headers=["model", "optimizer", "step ms", "vs SGD", "vs Adam", "state MiB",
                                  "extra state bytes vs SGD/Adam"], disable_numparse=True))


if __name__ == "__main__":
    main()
