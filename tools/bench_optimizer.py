"""H2SPG's step time, host reads and state size against torch's own optimizers.

Gradients are computed once per model; then only ``opt.step()`` is timed, repeatedly, on
those same gradients (a tiny learning rate keeps the parameters and phases as they are;
subnormal floats are flushed on the CPU).  The optimizers take turns round by round, so
that load from other processes falls on all of them alike; the table gives medians and
each one's ratio to its torch baseline, measured in the same run.  H2SPG is timed in each
phase: warm-up (scores gathered every step), hybrid with no redundant group zero yet (the
costly case: every redundant group takes the group-lasso step) and pruned (redundant
groups pinned, their parameters skipped), with K half the GeZIGs.  "host reads" counts
reads of tensor values back to the host in one step (``fxoto.metrics.HostReads``: each waits
for the GPU).
"state" is the optimizer's state in bytes: per-parameter tensors plus H2SPG's per-group
vectors.

On the CPU (default): resnet50 at batch 8 and DemoSupNet; baselines SGD(momentum=0.9) and
Adam, single-tensor as torch picks them there.  With ``--device cuda``: resnet50 and DARTS-8
at batch 64; baselines SGD with ``foreach=True`` and with ``fused=True``, AdamW fused; and a
whole bf16 training step (forward, backward, step) of H2SPG's hybrid phase against SGD's.

    PYTHONPATH=. .venv/bin/python tools/bench_optimizer.py [--device cpu|cuda] [--threads 2] [--clock cpu]
        [--phases hybrid] [--variants sgd] [--structures operations|channels|both] [--models vgg11_bn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from tabulate import tabulate

import fxoto
from fxoto.metrics import HostReads
from fxoto.optimizer import H2SPG
from fxoto.zoo import INPUT_SHAPES, DemoSupNet
from fxoto.zoo.darts import darts_8cells

# name: (constructor, input shape; None: 3 x --size x --size)
MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), None),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (3, 32, 32)),
    "DemoSupNet": (DemoSupNet, (1, 28, 28)),
    "DARTS-8": (darts_8cells, INPUT_SHAPES["darts8"]),
}
LR = 1e-7  # tiny, so that repeated steps on one gradient keep the parameters (and phases) as they are


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    if isinstance(opt, H2SPG):
        h = opt.state_dict()["h2spg"]
        total += sum(v.numel() * v.element_size() for v in h.values() if torch.is_tensor(v))
        total += opt._lambda.numel() * opt._lambda.element_size()
    return total


def h2spg(space: fxoto.SearchSpace, variant: str, phase: str) -> H2SPG:
    """An H2SPG in ``phase``, with K half the GeZIGs."""
    K = max(1, len(space.groups) // 2)
    warmup = 10**9 if phase == "warmup" else 1
    opt = H2SPG(space, K, LR, variant=variant, warmup_steps=warmup, pruning_steps=0 if phase == "pruned" else 10**9)
    opt.step()
    assert opt.phase == phase
    return opt


def timed(step: Callable[[], None], n: int, clock, sync: Callable[[], None]) -> float:
    sync()
    t0 = clock()
    for _ in range(n):
        step()
    sync()
    return (clock() - t0) / n


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, baselines: dict[str, Callable], variants: list[str],
          phases: list[str], rounds: int, steps: int, clock, sync, structures: str) -> list[list]:
    space = fxoto.build_space(model, (x[:1],), structures=structures)
    model.train()
    labels = torch.randint(0, 10, (x.shape[0],), device=x.device)
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]

    def restore():  # pruned runs zero their redundant groups in the shared parameters
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    opts: dict[str, tuple[torch.optim.Optimizer, str | None]] = {k: (make(params), None) for k, make in baselines.items()}
    for phase in phases:
        for variant in variants:
            base = next(k for k in baselines if ("SGD" in k) == (variant == "sgd"))
            opts[f"H2SPG {variant}, {phase}"] = (h2spg(space, variant, phase), base)
            restore()
    for opt, _ in opts.values():  # state allocated before timing
        opt.step()
    restore()
    reads = {}
    for key, (opt, _) in opts.items():
        with HostReads() as counter:
            opt.step()
        reads[key] = counter.count
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for key, (opt, _) in opts.items():
            times[key].append(timed(opt.step, steps, clock, sync))
        restore()
    for key, (opt, _) in opts.items():
        if isinstance(opt, H2SPG) and "hybrid" in key:
            assert opt.phase == "hybrid" and opt.metrics()["zero_groups"] == 0, "a group went to zero while timing"

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    n_params = sum(p.numel() for p in params)
    rows = []
    for key, (opt, base) in opts.items():
        ratios = [f"{med[key] / med[b]:.2f}x" for b in baselines]
        rows.append([f"{name} ({n_params / 1e6:.1f} M params, {len(space.groups)} {structures} groups)" if not rows else "",
                     key, f"{med[key]:.3f}", *ratios, reads[key], f"{state_bytes(opt) / 2**20:.1f}"])
    return rows


def training_step(name: str, model: torch.nn.Module, x: torch.Tensor, rounds: int, steps: int, clock, sync,
                  structures: str) -> list:
    """A whole bf16 training step (forward, backward, step): H2SPG-sgd's hybrid phase against SGD's."""
    space = fxoto.build_space(model, (x[:1],), structures=structures)
    labels = torch.randint(0, 10, (x.shape[0],), device=x.device)
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, LR, momentum=0.9, foreach=True)
    h2 = h2spg(space, "sgd", "hybrid")

    def step(opt):
        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
        return run

    for opt in (sgd, h2):
        step(opt)()
    times = {"sgd": [], "h2spg": []}
    for _ in range(rounds):
        times["sgd"].append(timed(step(sgd), steps, clock, sync))
        times["h2spg"].append(timed(step(h2), steps, clock, sync))
    a, b = (statistics.median(times[k]) * 1e3 for k in ("sgd", "h2spg"))
    return [name, f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=224, help="resnet50 input side (3 x size x size)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on the CPU, 64 on CUDA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per optimizer per round")
    ap.add_argument("--phases", nargs="*", default=["warmup", "hybrid", "pruned"],
                    help="H2SPG's phases to time (fewer optimizers alive: less memory traffic between them)")
    ap.add_argument("--variants", nargs="*", default=None, help="H2SPG variants (default: sgd and adam / adamw)")
    ap.add_argument("--structures", choices=["operations", "channels", "both"], default="operations",
                    help="the groups H2SPG works on (fxoto.search's structures=)")
    ap.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS),
                    help="default: resnet50 and DemoSupNet on the CPU, resnet50 and DARTS-8 on CUDA")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock, or the process's CPU time (steadier on a loaded CPU; not with CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    clock = time.perf_counter if args.clock == "wall" or cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.set_num_threads(args.threads)
    if not cuda:
        # Stepping many times on one gradient drives Adam's second moments of near-zero gradients
        # into subnormal floats, whose arithmetic is slow on x86: an artefact of the method.
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    batch = args.batch or (64 if cuda else 8)

    if cuda:
        baselines = {
            "SGD foreach": lambda ps: torch.optim.SGD(ps, LR, momentum=0.9, foreach=True),
            "SGD fused": lambda ps: torch.optim.SGD(ps, LR, momentum=0.9, fused=True),
            "AdamW fused": lambda ps: torch.optim.AdamW(ps, LR, fused=True),
        }
        variants = ["sgd", "adamw"]
        names = ["resnet50", "DARTS-8"]
    else:
        baselines = {
            "SGD(momentum=0.9)": lambda ps: torch.optim.SGD(ps, LR, momentum=0.9),
            "Adam": lambda ps: torch.optim.Adam(ps, LR),
        }
        variants = ["sgd", "adam"]
        names = ["resnet50", "DemoSupNet"]
    models = [(name, MODELS[name][0](), MODELS[name][1] or (3, args.size, args.size)) for name in args.models or names]
    rows = []
    for name, model, shape in models:
        model = model.to(device)
        x = torch.randn(batch, *shape, device=device)
        rounds = args.rounds if name == "resnet50" else args.rounds * 3
        rows += bench(name, model, x, baselines, args.variants or variants, args.phases, rounds, args.steps, clock,
                      sync, args.structures)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"{torch.cuda.get_device_name(device) if cuda else f'{args.threads} threads'}; batch {batch}; "
          f"{'wall' if cuda else args.clock} clock, median over rounds of {args.steps} steps")
    print(tabulate(rows, headers=["model", "optimizer", "step ms", *(f"vs {b}" for b in baselines),
                                  "host reads", "state MiB"], disable_numparse=True))
    if cuda:
        whole = [training_step(name, model.to(device), torch.randn(batch, *shape, device=device), args.rounds,
                               args.steps, clock, sync, args.structures) for name, model, shape in models]
        print("\nwhole bf16 training step (forward, backward, step), H2SPG-sgd hybrid against SGD foreach")
        print(tabulate(whole, headers=["model", "SGD ms", "H2SPG ms", "ratio"], disable_numparse=True))


if __name__ == "__main__":
    main()
