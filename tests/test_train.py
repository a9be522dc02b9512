"""Search.fit: training with H2SPG, checkpoints and resume, devices, mixed precision, host reads."""

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import fxoto
import fxoto.train
from fxoto.data import get_dataset
from fxoto.pipeline import Fitted
from fxoto.errors import DeviceError
from fxoto.metrics import HostReads
from fxoto.train import MixedPrecisionError, autocast_factory, fit
from fxoto.zoo import DemoSupNet

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def setup(seed=0):
    torch.manual_seed(seed)
    model = DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7)
    train, val = get_dataset("digits")
    train = Fitted(Subset(train, range(96)), (1, 28, 28))
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    s = fxoto.search(model, 3, (torch.randn(1, 1, 28, 28),))
    s.optimizer(lr=0.05, total_steps=2 * len(loader))
    return model, s, loader, Fitted(Subset(val, range(64)), (1, 28, 28))


def test_fit_reaches_k_zero_groups_and_reports_progress():
    model, s, loader, val = setup()
    stream = io.StringIO()
    history = s.fit(loader, nn.CrossEntropyLoss(), 2, val_loader=DataLoader(val, batch_size=64), stream=stream,
                    log_every=2)
    assert len(s.space.zero_groups()) == 3
    assert [e.epoch for e in history.epochs] == [1, 2]
    assert history.epochs[-1].zero_groups == 3 and history.epochs[-1].val_accuracy is not None
    # readings every 2 steps and at the end of each 3-batch epoch
    assert [(r["step"], r["epoch"]) for r in history.steps] == [(2, 1), (3, 1), (5, 2), (6, 2)]
    assert [r["optimizer_step"] for r in history.steps] == [2, 3, 5, 6]
    for e, (a, b) in zip(history.epochs, [history.steps[:2], history.steps[2:]]):
        # each reading's loss is the mean over its batches (32 samples each)
        assert abs((2 * a["loss"] + b["loss"]) / 3 - e.loss) < 1e-6
    assert history.steps[-1]["zero_groups"] == 3 and history.steps[-1]["phase"] == "pruned"
    text = stream.getvalue()
    assert "epoch 2/2" in text and "zero 3/5" in text and "lr 0.05" in text and "acc" in text and "loss" in text


def test_progress_is_quiet_when_asked_and_on_every_rank_but_0(monkeypatch):
    _, s, loader, _ = setup()
    quiet = io.StringIO()
    s.fit(loader, nn.CrossEntropyLoss(), 1, stream=quiet, progress=False)
    assert quiet.getvalue() == ""
    _, s, loader, _ = setup()
    monkeypatch.setattr(fxoto.train.distributed, "rank", lambda: 1)
    other = io.StringIO()
    s.fit(loader, nn.CrossEntropyLoss(), 1, stream=other)
    assert other.getvalue() == ""


def test_resume_after_epoch_one_gives_the_same_parameters(tmp_path):
    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 2, progress=False)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 1, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "last.pt").exists()

    model, s, loader, _ = setup(seed=0)
    with torch.no_grad():  # a fresh process would start from other values: prove they are replaced
        for p in model.parameters():
            p.add_(1.0)
    s.fit(loader, nn.CrossEntropyLoss(), 2, resume=tmp_path / "last.pt", progress=False)
    resumed = model.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_report_after_fit_shows_both_networks():
    model, s, loader, val = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 2, progress=False)
    table = s.report(val_loader=DataLoader(val, batch_size=64))
    lines = table.splitlines()
    assert lines[2].startswith("super-network") and lines[3].startswith("sub-network")
    assert lines[3].split()[5] == "3"  # groups erased
    assert float(table.rsplit(":", 1)[1]) < 1e-5  # equal up to float rounding (DESIGN 6)


def test_resume_through_another_map_location_gives_the_same_parameters(tmp_path):
    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 2, progress=False)
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 1, checkpoint_dir=tmp_path, progress=False)

    locations = []

    def to_cpu(storage, location):  # what torch.load calls for every stored tensor
        locations.append(location)
        return storage.cpu()

    for map_location in ("cpu", to_cpu):
        model, s, loader, _ = setup()
        s.fit(loader, nn.CrossEntropyLoss(), 2, resume=tmp_path / "last.pt", map_location=map_location, progress=False)
        resumed = model.state_dict()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), map_location
    assert locations and set(locations) == {"cpu"}


def test_bf16_autocast_on_the_cpu_trains_to_k_zero_groups():
    model, s, loader, val = setup()
    seen = []
    model.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    history = s.fit(loader, nn.CrossEntropyLoss(), 2, val_loader=DataLoader(val, batch_size=64), device="cpu",
                    amp="bf16", progress=False)
    assert set(seen) == {torch.bfloat16}  # the forward ran in bf16, training and validation
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the variables did not
    assert len(s.space.zero_groups()) == 3 and history.epochs[-1].zero_groups == 3
    assert history.epochs[-1].val_accuracy is not None


def test_fp16_on_the_cpu_trains_with_a_grad_scaler_or_is_refused(tmp_path):
    model, s, loader, _ = setup()
    try:
        autocast_factory(torch.device("cpu"), "fp16")
    except MixedPrecisionError as exc:  # an older torch: a clear refusal, before any step
        assert "cannot autocast to torch.float16 on cpu; amp='bf16'" in str(exc)
        with pytest.raises(MixedPrecisionError, match="cannot autocast"):
            s.fit(loader, nn.CrossEntropyLoss(), 2, amp="fp16", progress=False)
        return
    s.fit(loader, nn.CrossEntropyLoss(), 2, amp="fp16", progress=False)
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(s.space.zero_groups()) == 3

    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 1, amp="fp16", checkpoint_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["scaler"]["scale"] > 0  # the scaler's state is kept
    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 2, amp="fp16", resume=tmp_path / "last.pt", progress=False)
    assert all(torch.equal(straight[k], v) for k, v in model.state_dict().items())


def test_unknown_amp_and_unusable_models_are_refused():
    model, s, loader, _ = setup()
    with pytest.raises(ValueError, match="amp must be None, 'none', 'bf16' or 'fp16', not 'fp8'"):
        s.fit(loader, nn.CrossEntropyLoss(), 1, amp="fp8", progress=False)
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        s.fit(loader, nn.CrossEntropyLoss(), 1, device="gpu", progress=False)
    model.linear.to("meta")  # one layer left without values
    with pytest.raises(DeviceError, match="DemoSupNet has tensors on cpu, meta: fit trains a model on one device"):
        s.fit(loader, nn.CrossEntropyLoss(), 1, progress=False)
    model.to("meta")
    with pytest.raises(DeviceError, match="DemoSupNet holds meta tensors"):
        s.fit(loader, nn.CrossEntropyLoss(), 1, progress=False)


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_the_training_loop_reads_nothing_back_per_step(amp):
    """With an optimizer that reads nothing itself, the loop's reads do not grow with the batches."""
    _, train = load_train()
    reads = []
    for n in (4, 8):
        torch.manual_seed(0)
        model = DemoSupNet(stem_width=6, branch_width=4, mid_width=5, add_width=7)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(Subset(train, range(8 * n)), batch_size=8)
        with HostReads() as count:
            fit(model, opt, loader, nn.CrossEntropyLoss(), 1, progress=False, amp=amp, log_every=100)
        reads.append(count.count)
    assert reads[0] == reads[1] and reads[0] <= 3, reads


def load_train():
    train, val = get_dataset("digits")
    return val, Fitted(Subset(train, range(96)), (1, 28, 28))


# -- on a GPU (each has a CPU counterpart above) ------------------------------------------------


@needs_cuda
def test_fit_on_cuda_from_a_cpu_loader_with_bf16():
    model, s, loader, val = setup()
    history = s.fit(loader, nn.CrossEntropyLoss(), 2, val_loader=DataLoader(val, batch_size=64), device="cuda",
                    amp="bf16", progress=False)
    assert all(p.is_cuda for p in model.parameters())
    assert len(s.space.zero_groups()) == 3 and history.epochs[-1].val_accuracy is not None


@needs_cuda
def test_fit_on_cuda_with_fp16_and_a_grad_scaler(tmp_path):
    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 2, device="cuda", amp="fp16", checkpoint_dir=tmp_path, progress=False)
    assert len(s.space.zero_groups()) == 3
    assert "scaler" in torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)


@needs_cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, first, then):
    model, s, loader, _ = setup()
    s.fit(loader, nn.CrossEntropyLoss(), 1, device=first, checkpoint_dir=tmp_path, progress=False)
    model, s, loader, _ = setup()
    history = s.fit(loader, nn.CrossEntropyLoss(), 2, device=then, resume=tmp_path / "last.pt", progress=False)
    assert {p.device.type for p in model.parameters()} == {then}
    assert all(t.device.type == then for state in s.opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert [e.epoch for e in history.epochs] == [1, 2] and len(s.space.zero_groups()) == 3
