"""Search.fit: training with H2SPG, checkpoints and resume."""

import io

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import fxoto
from fxoto.data import get_dataset
from fxoto.pipeline import Fitted
from fxoto.zoo import DemoSupNet


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
    history = s.fit(loader, nn.CrossEntropyLoss(), 2, val_loader=DataLoader(val, batch_size=64), stream=stream)
    assert len(s.space.zero_groups()) == 3
    assert [e.epoch for e in history.epochs] == [1, 2]
    assert history.epochs[-1].zero_groups == 3 and history.epochs[-1].val_accuracy is not None
    assert len(history.steps) == 2 * len(loader)
    text = stream.getvalue()
    assert "epoch 2/2" in text and "zero 3/5" in text and "lr 0.05" in text and "acc" in text


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
    assert lines[3].split()[5] == "3"  # GeZIGs erased
    assert float(table.rsplit(":", 1)[1]) < 1e-5  # equal up to float rounding (DESIGN 6)
