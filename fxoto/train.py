"""Training a super-network with H2SPG: the loop users would otherwise write by hand.

``fit`` runs epochs with a progress bar (loss, accuracy, group sparsity,
learning rate), evaluates on a validation loader, writes a checkpoint after
every epoch (and on Ctrl-C), and resumes from one bit-for-bit on CPU.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


class ProgressBar:
    """A one-line progress bar on stderr; one line per update when not a terminal."""

    def __init__(self, total: int, prefix: str, stream=None, width: int = 24):
        self.total, self.prefix, self.width = total, prefix, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()

    def update(self, done: int, **fields) -> None:
        if not self.tty and done != self.total:
            return
        filled = int(self.width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        text = " ".join(f"{k} {v}" for k, v in fields.items())
        elapsed = time.perf_counter() - self.start
        line = f"{self.prefix} [{bar}] {done}/{self.total} {text} {elapsed:.1f}s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    zero_groups: int
    lr: float


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # optimizer metrics, every step


def count_correct(output: torch.Tensor, target: torch.Tensor) -> float | None:
    """Correct top-1 predictions in a batch; None when the batch is not classification."""
    if output.dim() != 2 or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    return (output.argmax(1) == target).float().sum().item()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable) -> tuple[float, float | None]:
    """Mean loss and accuracy (None when the task is not classification) in eval mode."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0.0
    for x, y in loader:
        out = model(x)
        loss_sum += loss_fn(out, y).item() * len(x)
        acc = count_correct(out, y)
        correct = None if acc is None or correct is None else correct + acc
        total += len(x)
    model.train(was_training)
    return loss_sum / max(total, 1), (None if correct is None else correct / max(total, 1))


def save_checkpoint(path: Path, model: nn.Module, optimizer, epoch: int, history: History, loader=None) -> None:
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": {"epochs": [asdict(e) for e in history.epochs], "steps": history.steps},
        "torch_rng": torch.get_rng_state(),
    }
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader_rng"] = generator.get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer, loader=None) -> tuple[int, History]:
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader_rng" in state:
        generator.set_state(state["loader_rng"])
    history = History([EpochRecord(**e) for e in state["history"]["epochs"]], state["history"]["steps"])
    return state["epoch"], history


def fit(
    model: nn.Module,
    optimizer,
    train_loader: Iterable,
    loss_fn: Callable,
    epochs: int,
    *,
    val_loader: Iterable | None = None,
    scheduler=None,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stream=None,
) -> History:
    """Train ``model`` with ``optimizer`` for ``epochs`` epochs.

    An H2SPG's ``metrics()`` (zero groups ...) join the progress bar and the
    history; any other ``torch.optim`` optimizer trains a baseline the same way.

    With ``checkpoint_dir``, ``last.pt`` is written after every epoch, and on
    Ctrl-C before the ``KeyboardInterrupt`` goes on; ``resume`` continues from
    such a file with the same results as an uninterrupted run.
    """
    history, start = History(), 0
    if resume is not None:
        start, history = load_checkpoint(Path(resume), model, optimizer, train_loader)
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    epoch = start
    # Groups shrinking towards zero under the group lasso pass through denormal
    # floats, which slow CPU arithmetic several-fold: flush them while training.
    flushed = torch.set_flush_denormal(True)
    try:
        for epoch in range(start, epochs):
            model.train()
            n_batches = len(train_loader) if hasattr(train_loader, "__len__") else 0
            bar = ProgressBar(n_batches, f"epoch {epoch + 1}/{epochs}", stream) if progress else None
            seen, loss_sum, correct = 0, 0.0, 0.0
            for i, (x, y) in enumerate(train_loader):
                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                loss = loss_fn(out, y)
                loss.backward()
                optimizer.step()
                metrics = optimizer.metrics() if hasattr(optimizer, "metrics") else {}
                history.steps.append({"loss": loss.item(), **metrics})
                seen += len(x)
                loss_sum += loss.item() * len(x)
                acc = count_correct(out.detach(), y)
                correct = None if acc is None or correct is None else correct + acc
                if bar is not None:
                    fields = {"loss": f"{loss_sum / seen:.4f}"}
                    if correct is not None:
                        fields["acc"] = f"{100 * correct / seen:.1f}%"
                    if metrics:
                        fields["zero"] = f"{metrics['zero_groups']}/{metrics['groups']}"
                    fields["lr"] = f"{optimizer.param_groups[0]['lr']:.3g}"
                    bar.update(i + 1, **fields)
            if scheduler is not None:
                scheduler.step()
            val_loss, val_acc = evaluate(model, val_loader, loss_fn) if val_loader is not None else (None, None)
            history.epochs.append(EpochRecord(
                epoch + 1, loss_sum / max(seen, 1), None if correct is None else correct / max(seen, 1),
                val_loss, val_acc, metrics.get("zero_groups", 0), optimizer.param_groups[0]["lr"],
            ))
            if ckpt is not None:
                save_checkpoint(ckpt, model, optimizer, epoch + 1, history, train_loader)
    except KeyboardInterrupt:
        if ckpt is not None:
            interrupted = ckpt.with_name("interrupted.pt")
            save_checkpoint(interrupted, model, optimizer, epoch, history, train_loader)
            print(f"\ninterrupted: resume from {interrupted} (epoch {epoch + 1} restarts)", file=stream or sys.stderr)
        raise
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return history
