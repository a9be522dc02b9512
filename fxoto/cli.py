"""The ``fxoto`` command: ``demo``, ``inspect`` and ``search``.

Every failure a user can cause (unknown model, missing data, K too large, a
model fx cannot trace) ends in one clear line on stderr and exit status 2.

``demo`` and ``search`` train on ``--device`` (auto: CUDA when available) with
``--amp`` mixed precision. Started by ``torchrun --nproc-per-node N -m fxoto search ...``
they train with DistributedDataParallel: one process group from torchrun's environment,
one GPU per process (``cuda:LOCAL_RANK``) or gloo on the CPU, one report from rank 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch import nn

import fxoto
from fxoto import distributed
from fxoto.errors import FxotoError
from fxoto.search import STRUCTURES


def load_model(spec: str, num_classes: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """A model and an example input from a zoo name, a torchvision name, or ``module.path:factory``."""
    from fxoto import zoo

    if spec in zoo.MODELS:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return zoo.MODELS[spec](**kwargs), zoo.example_input(spec)
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FxotoError(f"cannot import '{module_name}' for model '{spec}': {exc}") from exc
        if not hasattr(module, factory):
            raise FxotoError(f"module '{module_name}' has no '{factory}' (model '{spec}')")
        made = getattr(module, factory)()
        if isinstance(made, tuple):
            return made
        return made, torch.randn(1, 3, 224, 224)
    import torchvision

    if spec in torchvision.models.list_models(module=torchvision.models):
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        size = 299 if spec.startswith("inception") else 224
        return torchvision.models.get_model(spec, **kwargs), torch.randn(1, 3, size, size)
    raise FxotoError(
        f"unknown model '{spec}': use a zoo name ({', '.join(zoo.MODELS)}), a torchvision "
        f"classification model name, or 'module.path:factory'"
    )


def _inspect(args) -> int:
    from fxoto import viz

    model, x = load_model(args.model)
    model.eval()
    space = fxoto.build_space(model, (x,), structures=args.structures)
    print(viz.summary(space))
    out = Path(args.out)
    written = viz.render(viz.to_dot(space), out / f"{args.model.replace(':', '_').replace('.', '_')}_graph")
    print(f"dependency graph: {written}")
    return 0


def _search(args) -> int:
    from fxoto.pipeline import run_search
    from fxoto.train import resolve_device

    device = resolve_device(args.device)
    with distributed.process_group(device):
        model, example = load_model(args.model)
        result = run_search(
            model=model, example=example, data=args.data, data_root=args.data_root,
            download=args.download, K=_parse_k(args.K), epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, variant=args.variant, out=Path(args.out), resume=args.resume, seed=args.seed,
            device=device, amp=args.amp, structures=args.structures,
        )
    if result.report_data is not None:
        print(result.report)
        print(f"outputs in {args.out}")
    return 0


def _demo(args) -> int:
    from fxoto.pipeline import run_demo
    from fxoto.train import resolve_device

    device = resolve_device(args.device)
    with distributed.process_group(device):
        result = run_demo(out=Path(args.out), epochs=args.epochs, quick=args.quick, seed=args.seed, device=device,
                          amp=args.amp)
    if result.report_data is not None:
        print(result.report)
        print(f"outputs in {args.out}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun, auto and cuda "
                             "mean cuda:LOCAL_RANK (default: auto)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler (default: none)")


def _add_structures_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--structures", default="operations", choices=STRUCTURES,
                        help=f"{what}: whole operations (GeZIGs), output channels, or both (default: operations)")


def _parse_k(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise FxotoError(f"K must be an int count or a fraction like 0.5, not '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxoto", description="Automatic sub-network search inside PyTorch super-networks (OTOv3).")
    parser.add_argument("--version", action="version", version=f"fxoto {fxoto.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="search, train and shrink the paper's DemoSupNet on embedded digits")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: 5, or 1 with --quick)")
    demo.add_argument("--quick", action="store_true", help="a small, fast run (used by the tests)")
    demo.add_argument("--seed", type=int, default=0)
    _add_training_options(demo)
    demo.set_defaults(func=_demo)

    inspect = sub.add_parser("inspect", help="print a model's search space and draw its dependency graph")
    inspect.add_argument("model", help="zoo name, torchvision model name, or module.path:factory")
    inspect.add_argument("--out", default="out/inspect", help="folder for the graph picture")
    _add_structures_option(inspect, "groups to show")
    inspect.set_defaults(func=_inspect)

    search = sub.add_parser("search", help="the full run: search space, H2SPG training, sub-network, report")
    search.add_argument("model", help="zoo name, torchvision model name, or module.path:factory")
    search.add_argument("--data", default="digits", help="digits (embedded), fashion_mnist, svhn, stl10, cifar10")
    search.add_argument("--data-root", default=None, help="folder holding the torchvision dataset")
    search.add_argument("--download", action="store_true", help="download the dataset into --data-root")
    search.add_argument("--K", required=True, help="groups to remove: a count, or a fraction like 0.5")
    _add_structures_option(search, "groups to search over")
    search.add_argument("--epochs", type=int, default=5)
    search.add_argument("--batch-size", type=int, default=64,
                        help="global batch size, split evenly among the processes under torchrun (default: 64)")
    search.add_argument("--lr", type=float, default=None, help="learning rate (default by variant)")
    search.add_argument("--variant", default="sgd", choices=["sgd", "adam", "adamw"])
    search.add_argument("--out", default="out/search", help="output folder")
    search.add_argument("--resume", default=None, help="checkpoint to continue from")
    search.add_argument("--seed", type=int, default=0)
    _add_training_options(search)
    search.set_defaults(func=_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FxotoError, ValueError, TypeError) as exc:
        print(f"fxoto {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxoto {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
