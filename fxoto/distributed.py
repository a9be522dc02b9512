"""Training on several processes: ``torchrun`` and ``DistributedDataParallel``.

fxoto's part of data parallelism is small, because H2SPG already is a citizen of it: DDP
all-reduces the gradients, so every rank takes the same H2SPG step, and H2SPG broadcasts rank 0's
redundancy scores at the one selection step (paper, Algorithm 3, line 8), so every rank selects
the same redundant set. What this module adds is what ``fxoto.train.fit`` and ``fxoto search``
need around it:

- ``process_group``: the process group from ``torchrun``'s environment (NCCL on CUDA, gloo on
  the CPU), opened and closed by the command line;
- ``check_model``: refusals, with the reason: parameters sharded by FSDP or tensor parallelism
  (a GeZIG spans whole tensors every rank must hold), a search space built on the DDP wrapper
  instead of the module, ranks whose models or search spaces differ;
- ``shard_train_loader`` / ``shard_eval_loader``: each rank's share of a ``DataLoader``;
- ``wrap``, ``all_sum``, ``broadcast_buffers``: the DDP wrapper and the few collectives the
  training loop makes (at progress readings and at the end of an epoch, never per step).

Every rank builds the same model and the same search space on the unwrapped module (the
structures are compared once, through a digest, before training starts); rank 0 writes the
checkpoints and the outputs, every rank reads the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from fxoto.errors import FxotoError

__all__ = [
    "DistributedSetupError",
    "RankMismatchError",
    "all_sum",
    "broadcast_buffers",
    "check_model",
    "check_ranks_agree",
    "local_rank",
    "process_group",
    "rank",
    "shard_eval_loader",
    "shard_train_loader",
    "world_size",
    "wrap",
]


class DistributedSetupError(FxotoError):
    """A multi-process set-up fxoto cannot train correctly (sharded parameters, a wrapped search space ...)."""


class RankMismatchError(DistributedSetupError):
    """The ranks of one job hold different models or search spaces."""


def world_size() -> int:
    """Processes in the default process group; 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 when none is initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its machine, as ``torchrun`` sets it (``LOCAL_RANK``); 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[int]:
    """The default process group of a ``torchrun`` job, for the time of the block; yields the world size.

    Opened from the environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` ...) when ``torchrun``
    started more than one process and no group is open yet: NCCL when ``device`` is a CUDA
    device (one per process: pass ``cuda:LOCAL_RANK``), gloo on the CPU. A group opened here is
    destroyed on the way out; an existing one is left as it is.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield world_size()
        return
    if not dist.is_available():
        raise DistributedSetupError("torchrun started several processes, but this torch was built without torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield dist.get_world_size()
    finally:
        dist.destroy_process_group()


# -- what cannot work ----------------------------------------------------------------------


def check_model(module: nn.Module, space=None) -> None:
    """Refuse what fxoto cannot train: sharded parameters, a search space built on a DDP wrapper.

    ``module`` is the model ``fit`` trains (the module inside a DDP wrapper), ``space`` the
    ``SearchSpace`` its optimizer works on, if any. Checked in every process, with or without a
    process group.
    """
    if space is not None and isinstance(space.model, DistributedDataParallel):
        raise DistributedSetupError(
            "the search space was built on the DistributedDataParallel wrapper: its GeZIGs name the wrapper's "
            "parameters ('module.conv1.weight' ...) and its graph runs the wrapper's forward. Build it on the "
            "module: fxoto.search(ddp.module, K, example_inputs), or pass the plain module to fit, which wraps "
            "it in DDP itself under a process group"
        )
    why = _sharded(module)
    if why is not None:
        raise DistributedSetupError(
            f"{why}: fxoto trains with DistributedDataParallel, where every rank holds whole parameters. A GeZIG "
            f"spans whole tensors (and channel slices of them), so its norms, its half-space projection and the "
            f"sub-network need every member on every rank. Train without FSDP or tensor parallelism (DDP: pass "
            f"the plain module to fxoto's fit under torchrun)"
        )


def _sharded(module: nn.Module) -> str | None:
    """Where ``module`` is sharded (FSDP, or DTensor parameters of FSDP2 and tensor parallelism), or None."""
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, m in module.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            return f"module '{name or type(module).__name__}' is wrapped in FullyShardedDataParallel"
    from torch.distributed.tensor import DTensor

    for name, p in module.named_parameters():
        if isinstance(p, DTensor):
            return f"parameter '{name}' is a DTensor sharded as {tuple(p.placements)} (FSDP2 or tensor parallelism)"
    return None


def _structure(module: nn.Module, optimizer) -> tuple[str, int, int]:
    """A digest of the parameters' names, shapes and dtypes, and of H2SPG's GeZIGs and settings."""
    parts = [f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in module.named_parameters()]
    space = getattr(optimizer, "space", None)
    groups = [] if space is None else space.groups
    parts += [repr(g) for g in groups]
    if space is not None:
        parts += [f"{key}={getattr(optimizer, key, None)!r}" for key in ("K", "variant", "warmup_steps", "pruning_steps")]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return digest, len(parts) - len(groups), len(groups)


def check_ranks_agree(module: nn.Module, optimizer) -> None:
    """Refuse with ``RankMismatchError`` when the ranks' models or search spaces differ.

    One ``all_gather_object`` of a digest per rank: parameter names, shapes and dtypes, the
    GeZIGs (nodes and members) and H2SPG's K, variant and phase lengths. Ranks that disagree
    would train different networks under one DDP, or select different redundant sets.
    """
    if world_size() == 1:
        return
    mine = _structure(module, optimizer)
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) == 1:
        return
    lines = "; ".join(f"rank {r}: {n} parameters and settings, {g} GeZIGs, digest {d}"
                      for r, (d, n, g) in enumerate(everyone))
    raise RankMismatchError(
        f"the ranks disagree on the model or its search space ({lines}). Build the same model with the same "
        f"arguments on every rank (same code, same fxoto version, same K) and the search space on the "
        f"unwrapped module before training"
    )


# -- data ----------------------------------------------------------------------------------


def shard_train_loader(loader) -> DataLoader:
    """This rank's share of a training ``DataLoader``: ``DistributedSampler``, same batch size per rank.

    A loader that already has a ``DistributedSampler`` is returned as it is. Otherwise the
    loader is rebuilt over the same dataset with the same batch size (per rank, as in torch),
    collate function and workers, shuffled when the original was (with rank 0's seed: its
    generator's, else 0), so an epoch's global batch holds world size x batch size samples.
    """
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    _check_shardable(loader, "training")
    shuffle = isinstance(loader.sampler, RandomSampler)
    seed = [loader.generator.initial_seed() if loader.generator is not None else 0]
    dist.broadcast_object_list(seed, src=0)
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed[0] % 2**63, drop_last=loader.drop_last)
    return _rebuilt(loader, sampler)


class _Shard(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank``, without the padding of ``DistributedSampler``,
    so that sums over the ranks count each sample once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_eval_loader(loader) -> DataLoader:
    """This rank's share of a validation ``DataLoader``: every sample counted once over the ranks."""
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    _check_shardable(loader, "validation")
    return _rebuilt(loader, _Shard(len(loader.dataset), rank(), world_size()))


def _check_shardable(loader, role: str) -> None:
    where = f"the {role} loader ({type(loader).__name__})"
    if not isinstance(loader, DataLoader):
        raise DistributedSetupError(
            f"{where} is not a torch DataLoader, so fit cannot give each of the {world_size()} ranks its share: "
            f"pass a DataLoader, or one whose sampler is a DistributedSampler"
        )
    if isinstance(loader.dataset, IterableDataset):
        raise DistributedSetupError(
            f"{where} reads an IterableDataset, which fit cannot shard: let the dataset yield each rank's share "
            f"(torch.distributed.get_rank()) and pass a DataLoader with a DistributedSampler over a map-style dataset"
        )
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or type(loader.batch_sampler) is not BatchSampler:
        raise DistributedSetupError(
            f"{where} has its own sampler ({type(loader.sampler).__name__}) or batch sampler, which fit cannot "
            f"shard without changing what it draws: give it a DistributedSampler"
        )


def _rebuilt(loader: DataLoader, sampler) -> DataLoader:
    extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers} \
        if loader.num_workers > 0 else {}
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator, **extra,
    )


# -- the wrapper and the collectives ------------------------------------------------------------


def wrap(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` in DDP, on ``device`` (one CUDA device per process, or the CPU)."""
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (unchanged with one process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics ...) on every rank.

    DDP broadcasts them before each training forward, and each rank then updates its own copy
    with its own batch: after the last step they differ. Called at the end of each epoch, so that
    validation, the checkpoint and the sub-network are the same on every rank.
    """
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)
