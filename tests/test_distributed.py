"""Training on several processes: DDP through fit and through torchrun, on the CPU with gloo.

One job of two ranks (``torch.multiprocessing.spawn``) trains a small super-network three ways
(256 digits, 3 epochs of 8 global batches of 32, H2SPG with K = 2 of 3 GeZIGs); the tests compare
what each rank saved with one process trained on the same global batches.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

import fxoto
from fxoto.data import load_digits_split
from fxoto.distributed import DistributedSetupError, RankMismatchError, check_model
from fxoto.train import fit

WORLD = 2
BATCH = 16  # per rank: a global batch of 32
EPOCHS = 3
SEED = 5
# Two ranks sum a global batch's gradient in another order than one process does (two means of
# 16, averaged by the all-reduce, against one mean of 32). That float32 rounding, grown over the
# 24 steps, moved no parameter by more than 2.4e-7 (measured); the bound leaves a factor of 10.
RTOL, ATOL = 1e-5, 2e-6


class BranchNet(nn.Module):
    """A stem and three branches summed onto it: GeZIGs a1-a2, b and c. No batch norm, whose
    statistics DDP keeps per rank (per-rank batches would then differ from one global batch)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.a1 = nn.Conv2d(width, width, 3, padding=1)
        self.a2 = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 1)
        self.c = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width * 64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.a2(torch.relu(self.a1(x)))) + torch.relu(self.b(x)) + torch.relu(self.c(x))
        return self.head(x.flatten(1))


def build(width: int = 8):
    torch.manual_seed(0)
    model = BranchNet(width)
    s = fxoto.search(model, 2, (torch.randn(1, 1, 8, 8),))
    s.optimizer(lr=0.1, warmup_steps=6, pruning_steps=12)
    return model, s


def data():
    train, val = load_digits_split()
    return Subset(train, range(256)), Subset(val, range(96))


def one_process_loader(train):
    """The global batches of the two-rank job: DistributedSampler's permutation, 32 at a time."""
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    return DataLoader(train, batch_size=WORLD * BATCH, sampler=sampler)


def rank_loader(train):
    """What a user would pass on each rank: a plain shuffled loader (fit shards it, with this seed)."""
    return DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED))


def outcome(model, s, history):
    sub = s.subnet()
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "zero": sorted(s.space.zero_groups()),
        "redundant": s.opt.redundant,
        "epochs": [vars(e) for e in history.epochs],
        "subnet_code": sub.code,
        "subnet_params": {k: v.detach().clone() for k, v in sub.state_dict().items()},
    }


def _job(rank: int, init: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        train, val = data()
        loss = nn.CrossEntropyLoss()
        saved = {}
        model, s = build()
        history = s.fit(rank_loader(train), loss, EPOCHS, val_loader=DataLoader(val, batch_size=64),
                        checkpoint_dir=os.path.join(tmp, "ddp"), progress=False)
        saved["straight"] = outcome(model, s, history)

        model, s = build()  # one epoch, for one process to resume
        s.fit(rank_loader(train), loss, 1, checkpoint_dir=os.path.join(tmp, "ddp_epoch1"), progress=False)

        model, s = build()  # resume a one-process checkpoint on two ranks
        history = s.fit(rank_loader(train), loss, EPOCHS, resume=os.path.join(tmp, "single_epoch1", "last.pt"),
                        progress=False)
        saved["from_single"] = outcome(model, s, history)

        model, s = build(width=8 if rank == 0 else 6)  # rank 1 built another model
        try:
            s.fit(rank_loader(train), loss, 1, progress=False)
        except RankMismatchError as exc:
            saved["mismatch"] = str(exc)
        torch.save(saved, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    train, val = data()
    loss = nn.CrossEntropyLoss()
    single = {}
    model, s = build()
    history = s.fit(one_process_loader(train), loss, EPOCHS, val_loader=DataLoader(val, batch_size=64),
                    progress=False)
    single["straight"] = outcome(model, s, history)
    model, s = build()
    s.fit(one_process_loader(train), loss, 1, checkpoint_dir=tmp / "single_epoch1", progress=False)

    torch.multiprocessing.spawn(_job, args=("file://" + str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    model, s = build()  # the two-rank checkpoint, resumed by one process
    history = s.fit(one_process_loader(train), loss, EPOCHS, resume=tmp / "ddp_epoch1" / "last.pt", progress=False)
    single["from_ddp"] = outcome(model, s, history)
    return types.SimpleNamespace(tmp=tmp, single=single, ranks=ranks)


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


def test_every_rank_trains_the_same_subnetwork(job):
    r0, r1 = (r["straight"] for r in job.ranks)
    assert r0["redundant"] == r1["redundant"] and len(r0["zero"]) == 2 and r0["zero"] == r1["zero"]
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["subnet_code"] == r1["subnet_code"]
    assert all(torch.equal(r0["subnet_params"][k], r1["subnet_params"][k]) for k in r0["subnet_params"])


def test_two_ranks_equal_one_process_on_the_same_global_batches(job):
    ddp, single = job.ranks[0]["straight"], job.single["straight"]
    assert ddp["redundant"] == single["redundant"] and ddp["zero"] == single["zero"]
    assert ddp["subnet_code"] == single["subnet_code"]
    assert_close(ddp["params"], single["params"])
    for d, s in zip(ddp["epochs"], single["epochs"]):  # loss, accuracy summed over the ranks' shares
        assert (d["world_size"], s["world_size"]) == (2, 1)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert d[key] == pytest.approx(s[key], rel=1e-5), key
        assert d["zero_groups"] == s["zero_groups"]


def test_rank_zero_writes_one_checkpoint_that_says_how_many_ranks_wrote_it(job):
    assert sorted(os.listdir(job.tmp / "ddp")) == ["last.pt"]
    state = torch.load(job.tmp / "ddp" / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["epoch"] == EPOCHS
    assert all(not k.startswith("module.") for k in state["model"])  # the plain module's names
    assert [e["world_size"] for e in state["history"]["epochs"]] == [2] * EPOCHS


def test_resume_across_world_sizes(job):
    single = job.single["straight"]
    for resumed, sizes in ((job.single["from_ddp"], [2, 1, 1]), (job.ranks[1]["from_single"], [1, 2, 2])):
        assert [e["world_size"] for e in resumed["epochs"]] == sizes
        assert resumed["zero"] == single["zero"] and resumed["subnet_code"] == single["subnet_code"]
        assert_close(resumed["params"], single["params"])


def test_ranks_that_disagree_on_the_model_are_refused(job):
    for r in job.ranks:
        message = r["mismatch"]
        assert message.startswith("the ranks disagree on the model or its search space (rank 0:")
        assert "rank 1:" in message and "same fxoto version" in message


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_sharded_parameters_and_wrapped_search_spaces_are_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "rendezvous"), rank=0, world_size=1)
    try:
        train, _ = data()
        model, s = build()
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(DistributedSetupError, match=r"built on the DistributedDataParallel wrapper.*ddp\.module"):
            check_model(model, types.SimpleNamespace(model=ddp))  # what fit sees of such a space
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(DistributedSetupError, match=r"parameter 'stem\.weight' is a DTensor sharded as"):
            s.fit(rank_loader(train), nn.CrossEntropyLoss(), 1, progress=False)
        wrapped = FullyShardedDataParallel(BranchNet(), device_id=torch.device("cpu"))
        with pytest.raises(DistributedSetupError, match="module 'FullyShardedDataParallel' is wrapped in"):
            fit(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), rank_loader(train), nn.CrossEntropyLoss(), 1,
                progress=False)
    finally:
        dist.destroy_process_group()


SMALL_DEMO = '''
import torch
from fxoto.zoo import DemoSupNet, example_input

def small():
    torch.manual_seed(0)
    return DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7), example_input("demosupnet")
'''


def test_torchrun_runs_the_command_line_on_two_ranks(tmp_path):
    (tmp_path / "smallnets.py").write_text(SMALL_DEMO)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m", "fxoto",
         "search", "smallnets:small", "--K", "3", "--epochs", "1", "--batch-size", "128", "--device", "cpu",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("max |super - sub| output difference") == 1  # one report, from rank 0
    assert "trained on 2 processes (DistributedDataParallel), device cpu, float32" in run.stdout
    assert run.stderr.count("epoch 1/1: 100%") == 1  # one progress bar (tqdm's), ending once, from rank 0
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and len(report["erased"]) == 3 and report["max_output_difference"] < 1e-4
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt"]
