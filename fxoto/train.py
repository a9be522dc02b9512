"""Training a super-network with H2SPG: the loop users would otherwise write by hand.

``fit`` runs epochs with a progress bar (``tqdm.auto``: a widget in a notebook; loss, accuracy,
zero groups, learning rate), evaluates on a validation loader, writes a checkpoint after every
epoch (and on Ctrl-C), and resumes from one bit-for-bit on the CPU.

Device. ``fit`` trains on the model's device, or moves the model to ``device`` first, and moves
each batch there (non-blocking; fxoto's own loaders pin their memory for CUDA). A checkpoint is
loaded onto the training device (``torch.load``'s ``map_location``), so a run saved on a GPU
resumes on the CPU and the other way round.

Precision. ``amp="bf16"`` or ``"fp16"`` runs the forward pass and the loss under
``torch.autocast``; fp16 scales the loss with a ``torch.amp.GradScaler``, whose state is
checkpointed with the rest. The parameters and H2SPG's arithmetic stay in their own dtype.

Host reads. Nothing in the per-step loop reads a value back from the device: the loss and the
correct predictions are summed on the device and read, with the optimizer's ``metrics()``
(which synchronises), only every ``log_every`` steps and at the end of each epoch. A non-finite
gradient is reported there too (``check_finite``, where the optimizer has it). A
``GradScaler`` (fp16) reads its inf flag once per step, unless the optimizer takes the scaler
itself.

Several processes. Under an initialised process group of more than one rank (``torchrun``),
``fit`` wraps the model in ``DistributedDataParallel`` itself (a model already wrapped is used as
it is), gives each rank its share of the loaders (``fxoto.distributed``), sums the loss,
accuracy and counts over the ranks at each reading, checks that every rank has the same zero
groups, and lets rank 0 alone print and write checkpoints. See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from fxoto import distributed
from fxoto.data import to_device
from fxoto.errors import DeviceError, FxotoError

#: ``amp`` settings and the autocast dtype of each.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecisionError(FxotoError, ValueError):
    """An ``amp`` dtype that this torch cannot autocast to on the training device."""


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    zero_groups: int
    lr: float
    world_size: int = 1  # processes that trained this epoch (DDP ranks)


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    # One record per progress reading (every ``log_every`` steps and at the end of each epoch):
    # "step" (batches trained so far), "epoch", "loss" (mean over the batches since the previous
    # reading) and the optimizer's metrics(), its own step count as "optimizer_step".
    steps: list[dict] = field(default_factory=list)


# -- device and precision -----------------------------------------------------------------------


def resolve_device(spec: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """The device that ``spec`` names on this machine: ``"auto"`` (CUDA when available), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. Without an index, CUDA means device ``local_rank`` (default: this
    process's ``LOCAL_RANK`` under ``torchrun``, one GPU per process; otherwise the current device)."""
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{spec}' asked for, but CUDA is not available to this torch ({torch.__version__}, "
                f"built for CUDA {torch.version.cuda}): use --device cpu or auto"
            )
        if device.index is not None:
            index = device.index
        elif local_rank is not None or "LOCAL_RANK" in os.environ:
            index = distributed.local_rank() if local_rank is None else local_rank
        else:
            index = torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device 'cuda:{index}' asked for, but this machine has only "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def model_device(model: nn.Module) -> torch.device:
    """The one device holding ``model``'s parameters and buffers (the CPU when it has none)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    name = type(model).__name__
    if len(devices) > 1:
        raise DeviceError(
            f"{name} has tensors on {', '.join(sorted(map(str, devices)))}: fit trains a model on one device; "
            f"pass device=... to move all of it there"
        )
    device = devices.pop() if devices else torch.device("cpu")
    if device.type == "meta":
        raise DeviceError(f"{name} holds meta tensors, which have no values: materialise it "
                                 f"(module.to_empty(device=...) and load its weights) before training")
    return device


def autocast_factory(device: torch.device, amp: str | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A maker of the autocast context for ``amp`` (None or ``"none"``: full precision) on ``device``.

    Refuses, with ``MixedPrecisionError``, a dtype that this torch cannot autocast to on that
    device (torch disables such an autocast with a warning, which would train in full precision
    unnoticed).
    """
    if amp is None or amp == "none":
        return contextlib.nullcontext
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'none', 'bf16' or 'fp16', not {amp!r}")
    dtype = AMP_DTYPES[amp]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=dtype):
                works = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
        except RuntimeError:
            works = False
    if not works:
        raise MixedPrecisionError(
            f"amp='{amp}': this torch ({torch.__version__}) cannot autocast to {dtype} on {device.type}"
            + ("; amp='bf16' trains in mixed precision on the CPU" if device.type == "cpu" else "")
        )
    return lambda: torch.autocast(device.type, dtype=dtype)


def _place(model: nn.Module, module: nn.Module, optimizer, device) -> torch.device:
    """The training device: ``device`` (``module`` and the optimizer's state moved there) or the model's."""
    if device is None:
        return model_device(module)
    device = resolve_device(device)
    if {t.device for t in (*module.parameters(), *module.buffers())} <= {device}:
        return device
    if isinstance(model, DistributedDataParallel):
        raise DeviceError(f"the model is wrapped in DistributedDataParallel and cannot move to {device}: "
                                 f"move the module before wrapping it, or pass the plain module to fit")
    module.to(device)  # moves the values in place: the optimizer still holds the same parameters
    # torch.optim's load_state_dict puts the state on its parameter's device.
    optimizer.load_state_dict(optimizer.state_dict())
    return device


# -- counting on the device ---------------------------------------------------------------------


def _correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Correct top-1 predictions in a batch, as a tensor on the device; None when not classification."""
    if output.dim() != 2 or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    return (output.argmax(1) == target).sum()


def count_correct(output: torch.Tensor, target: torch.Tensor) -> float | None:
    """Correct top-1 predictions in a batch; None when the batch is not classification."""
    hits = _correct(output, target)
    return None if hits is None else float(hits)


def _batch_size(y: Any) -> int:
    return y.shape[0] if isinstance(y, torch.Tensor) else len(y)


class _Tally:
    """Loss and correct predictions summed on the device; read back (summed over the ranks) on demand."""

    def __init__(self, device: torch.device):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.sums = torch.zeros(2, dtype=self.dtype, device=device)  # loss x samples, correct
        self.seen = 0  # samples, on this rank
        self.classification = True
        self.read_at = (0.0, 0.0, 0.0)  # global loss sum, correct and samples at the last reading
        self.reads = 0  # this rank's batches at the last reading

    def add(self, loss: torch.Tensor, output: torch.Tensor, target) -> None:
        n = _batch_size(target)
        hits = _correct(output.detach(), target) if isinstance(target, torch.Tensor) else None
        if hits is None:
            self.classification = False
            self.sums[0] += loss.detach().to(self.dtype) * n
        else:
            self.sums += torch.stack((loss.detach().to(self.dtype) * n, hits.to(self.dtype)))
        self.seen += n

    def read(self) -> tuple[float, float, float]:
        """Global (loss sum, correct, samples) so far: one host read, one all-reduce under DDP."""
        both = torch.cat((self.sums, torch.tensor([float(self.seen)], dtype=self.dtype, device=self.sums.device)))
        loss_sum, correct, seen = distributed.all_sum(both).tolist()
        return loss_sum, correct, seen


@torch.no_grad()
def _evaluate_sums(model: nn.Module, loader: Iterable, loss_fn: Callable, device: torch.device,
                   autocast: Callable) -> _Tally:
    was_training = model.training
    model.eval()
    tally = _Tally(device)
    for x, y in loader:
        x, y = to_device(x, device), to_device(y, device)
        with autocast():
            out = model(x)
            loss = loss_fn(out, y)
        tally.add(loss, out, y)
    model.train(was_training)
    return tally


def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable, *, device: torch.device | str | None = None,
             amp: str | None = None) -> tuple[float, float | None]:
    """Mean loss and accuracy (None when the task is not classification) in eval mode.

    Batches go to ``device`` (default: the model's); one host read at the end.
    """
    device = model_device(model) if device is None else resolve_device(device)
    tally = _evaluate_sums(model, loader, loss_fn, device, autocast_factory(device, amp))
    loss_sum, correct, seen = tally.sums.tolist() + [tally.seen]
    return loss_sum / max(seen, 1), (correct / max(seen, 1) if tally.classification else None)


# -- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, optimizer, epoch: int, history: History, loader=None, *,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the run's state to ``path`` (atomically: a temporary file renamed).

    ``model`` is the plain module (not a DDP wrapper), so the file loads into one process or
    any number of ranks; ``world_size`` records how many processes wrote it.
    """
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": {"epochs": [asdict(e) for e in history.epochs], "steps": history.steps},
        "torch_rng": torch.get_rng_state(),
        "world_size": distributed.world_size(),
    }
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader_rng"] = generator.get_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer, loader=None, *, map_location=None,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[int, History]:
    """Restore a ``save_checkpoint`` file; returns the epochs done and the history.

    Tensors are loaded through ``map_location`` (``torch.load``'s: a device, a dict or a
    function; default: the model's device), so a checkpoint written on a GPU resumes on the
    CPU and the other way round; torch.optim then puts the optimizer's state on its parameters'
    devices. The random number generators' states come back to the CPU, where torch keeps them.
    """
    if map_location is None:
        map_location = model_device(model)
    state = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader_rng" in state:
        generator.set_state(state["loader_rng"].cpu())
    history = History([EpochRecord(**e) for e in state["history"]["epochs"]], state["history"]["steps"])
    return state["epoch"], history


# -- the loop -------------------------------------------------------------------------------------


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
    device: torch.device | str | None = None,
    amp: str | None = None,
    log_every: int = 10,
    map_location=None,
) -> History:
    """Train ``model`` with ``optimizer`` for ``epochs`` epochs.

    An H2SPG's ``metrics()`` (zero groups ...) join the progress bar and the history; any
    other ``torch.optim`` optimizer trains a baseline the same way.

    ``device``: where to train (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``); the model,
    and the optimizer's state, are moved there first. Default: the model's device. Each batch
    is moved to the training device. ``amp``: ``"bf16"`` or ``"fp16"`` for mixed precision
    (fp16 with a ``GradScaler``), None for full precision.

    ``log_every``: the progress bar and ``History.steps`` are updated, and the optimizer's
    ``metrics()`` read, every ``log_every`` steps and at the end of each epoch.

    With ``checkpoint_dir``, ``last.pt`` is written after every epoch, and on Ctrl-C before
    the ``KeyboardInterrupt`` goes on; ``resume`` continues from such a file with the same
    results as an uninterrupted run. ``map_location`` overrides where its tensors are loaded
    (default: the training device).

    Under a process group of several ranks, the model is wrapped in DDP here, and each rank
    trains on its share of the loaders (module docstring).
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, not {log_every}")
    module = model.module if isinstance(model, DistributedDataParallel) else model
    distributed.check_model(module, getattr(optimizer, "space", None))
    device = _place(model, module, optimizer, device)
    autocast = autocast_factory(device, amp)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        distributed.check_ranks_agree(module, optimizer)
        train_loader = distributed.shard_train_loader(train_loader)
        val_loader = None if val_loader is None else distributed.shard_eval_loader(val_loader)

    history, start = History(), 0
    if resume is not None:
        start, history = load_checkpoint(Path(resume), module, optimizer, train_loader,
                                         map_location=device if map_location is None else map_location, scaler=scaler)
    batches = history.steps[-1].get("step", 0) if history.steps else 0
    net = distributed.wrap(module, device) if world > 1 and model is module else model
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None and rank == 0 else None
    stream = stream or sys.stderr
    check_finite = getattr(optimizer, "check_finite", None)
    metrics: dict[str, Any] = {}

    @torch.no_grad()
    def reading(tally: _Tally, epoch: int, bar: tqdm | None, done: int) -> None:
        """Read the sums and the optimizer's metrics back from the device: one record, one bar update."""
        nonlocal metrics
        if check_finite is not None:
            check_finite()
        loss_sum, correct, seen = tally.read()
        metrics = optimizer.metrics() if hasattr(optimizer, "metrics") else {}
        prev_loss, _, prev_seen = tally.read_at
        record = {"step": batches, "epoch": epoch + 1, "loss": (loss_sum - prev_loss) / max(seen - prev_seen, 1)}
        record.update({("optimizer_step" if k == "step" else k): v for k, v in metrics.items()})
        history.steps.append(record)
        tally.read_at, tally.reads = (loss_sum, correct, seen), done
        if bar is not None:
            fields = {"loss": f"{loss_sum / max(seen, 1):.4f}"}
            if tally.classification:
                fields["acc"] = f"{100 * correct / max(seen, 1):.1f}%"
            if metrics:
                fields["zero"] = f"{metrics['zero_groups']}/{metrics['groups']}"
            fields["lr"] = f"{optimizer.param_groups[0]['lr']:.3g}"
            bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in fields.items()), refresh=False)
            bar.update(done - bar.n)

    epoch, bar = start, None
    # Groups shrinking towards zero under the group lasso pass through denormal
    # floats, which slow CPU arithmetic several-fold: flush them while training.
    flushed = torch.set_flush_denormal(True)
    try:
        for epoch in range(start, epochs):
            net.train()
            sampler = getattr(train_loader, "sampler", None)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            n_batches = len(train_loader) if hasattr(train_loader, "__len__") else 0
            bar = _progress_bar(n_batches, f"epoch {epoch + 1}/{epochs}", stream) if progress and rank == 0 else None
            tally, done = _Tally(device), 0
            for x, y in train_loader:
                x, y = to_device(x, device), to_device(y, device)
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    out = net(x)
                    loss = loss_fn(out, y)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                tally.add(loss, out, y)
                batches, done = batches + 1, done + 1
                if done % log_every == 0 or done == n_batches:
                    reading(tally, epoch, bar, done)
            if tally.reads != done or done == 0:
                reading(tally, epoch, bar, done)
            if bar is not None:
                bar.close()
            if scheduler is not None:
                scheduler.step()
            distributed.broadcast_buffers(module)
            val_loss = val_acc = None
            if val_loader is not None:
                val = _evaluate_sums(module, val_loader, loss_fn, device, autocast)
                v_loss, v_correct, v_seen = val.read()
                val_loss, val_acc = v_loss / max(v_seen, 1), (v_correct / max(v_seen, 1) if val.classification else None)
            loss_sum, correct, seen = tally.read_at
            zero = metrics.get("zero_groups", 0)
            _check_same_on_every_rank(zero, device)
            history.epochs.append(EpochRecord(
                epoch + 1, loss_sum / max(seen, 1), correct / max(seen, 1) if tally.classification else None,
                val_loss, val_acc, zero, optimizer.param_groups[0]["lr"], world,
            ))
            if ckpt is not None:
                save_checkpoint(ckpt, module, optimizer, epoch + 1, history, train_loader, scaler=scaler)
            if checkpoint_dir is not None and world > 1:
                torch.distributed.barrier()  # the file is complete before any rank goes on (and may read it)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            interrupted = ckpt.with_name("interrupted.pt")
            save_checkpoint(interrupted, module, optimizer, epoch, history, train_loader, scaler=scaler)
            print(f"\ninterrupted: resume from {interrupted} (epoch {epoch + 1} restarts)", file=stream)
        raise
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return history


def _progress_bar(total: int, desc: str, stream) -> tqdm:
    """One epoch's bar: tqdm's, redrawn in place on a terminal (a widget in a notebook), at most
    every 30 s into a log file or pipe, so that a log keeps a few states per epoch, not one per reading."""
    tty = getattr(stream, "isatty", lambda: False)()
    return tqdm(total=total or None, desc=desc, file=stream, unit="batch", dynamic_ncols=tty,
                mininterval=0.1 if tty else 30.0)


def _check_same_on_every_rank(zero_groups: int, device: torch.device) -> None:
    """Refuse to go on when the ranks' zero groups differ (they take identical steps under DDP)."""
    if distributed.world_size() == 1:
        return
    spread = torch.tensor([zero_groups, -zero_groups], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    high, low = spread.tolist()
    low = -low
    if high != low:
        raise distributed.RankMismatchError(
            f"the ranks' zero groups differ ({int(low)} to {int(high)}) on rank {distributed.rank()}: under DDP every "
            f"rank takes the same H2SPG step, so their models have drifted apart (a rank-dependent forward or "
            f"optimizer setting?). Resume from the last checkpoint, which holds rank 0's state"
        )
