"""Checkpoints: round trip, atomic writes, refusal of corrupted files, the latest pointer, optimizer state."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
from torch import nn

from common.atomic import write_atomic
from common.checkpoint import (
    LATEST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    mark_latest,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(4, 3),
        "half": torch.randn(5).to(torch.bfloat16),
        "count": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "transposed": torch.randn(3, 2).t(),  # not contiguous
    }


def test_round_trip(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "a.safetensors", tensors(), {"epoch": 3, "config": {"lr": 1e-3}})
    loaded = load_checkpoint(path)
    assert loaded.metadata == {"epoch": 3, "config": {"lr": 1e-3}}
    assert loaded.tensors.keys() == tensors().keys()
    for name, value in tensors().items():
        assert torch.equal(loaded.tensors[name], value) and loaded.tensors[name].dtype == value.dtype


def test_write_leaves_no_temp_files_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"epoch": 1})
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(3)}, {"epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert load_checkpoint(path).metadata == {"epoch": 1}


def test_corrupted_checkpoint_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.randn(1000)}, {"epoch": 1})
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.safetensors: checksum mismatch"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "t.safetensors", {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"t\.safetensors: unreadable checkpoint"):
        load_checkpoint(path)


def test_foreign_or_missing_files_are_refused(tmp_path) -> None:
    foreign = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fedmammo checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_latest_pointer(tmp_path) -> None:
    assert latest_checkpoint(tmp_path) is None
    first = save_checkpoint(tmp_path / "epoch_001.safetensors", {"w": torch.zeros(1)})
    mark_latest(first)
    second = save_checkpoint(tmp_path / "epoch_002.safetensors", {"w": torch.ones(1)})
    assert latest_checkpoint(tmp_path) == first  # not moved until the new file is complete and marked
    mark_latest(second)
    assert latest_checkpoint(tmp_path) == second
    second.unlink()
    with pytest.raises(CheckpointError, match=r"epoch_002\.safetensors, which does not exist"):
        latest_checkpoint(tmp_path)
    assert (tmp_path / LATEST).read_text() == "epoch_002.safetensors\n"


def test_write_atomic_text(tmp_path) -> None:
    write_atomic(tmp_path / "sub" / "m.json", '{"a": 1}')
    assert (tmp_path / "sub" / "m.json").read_text() == '{"a": 1}'


def test_optimizer_state_round_trip_continues_identically(tmp_path) -> None:
    def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)

    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    reference, reference_opt = setup()
    steps(reference, reference_opt, 6)

    model, optimizer = setup()
    steps(model, optimizer, 3)
    state, meta = optimizer_tensors(optimizer)
    path = save_checkpoint(tmp_path / "o.safetensors", {**model.state_dict(), **state}, {"optimizer": meta})
    resumed, resumed_opt = setup()
    checkpoint = load_checkpoint(path)
    resumed.load_state_dict(checkpoint.model_state())
    restore_optimizer(resumed_opt, checkpoint, checkpoint.metadata["optimizer"])
    steps(resumed, resumed_opt, 3)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        restore_optimizer(torch.optim.AdamW(nn.Linear(2, 2).parameters()), checkpoint,
                          checkpoint.metadata["optimizer"])


def test_one_resume_rule_for_both_trainers():
    """`resume_problems`: what `fedmammo train --resume` and a federated run's resume share. A run is
    resumed only where it ends as an uninterrupted one would: its length may change with a constant
    learning rate, not with a cosine schedule or DP-SGD calibrated to a target ε."""
    from common.checkpoint import resume_problems
    from common.config import Config

    constant, cosine, private = Config(), Config(), Config()
    cosine.train.lr_schedule = "cosine"
    private.privacy.dp_sgd, private.privacy.target_epsilon = True, 8.0
    stored = {"train.epochs": 10, "train.lr": 3e-4, "train.num_threads": 1}
    longer = {**stored, "train.epochs": 20, "train.num_threads": 2}
    assert resume_problems(stored, longer, length="train.epochs", config=constant) == []
    [problem] = resume_problems(stored, longer, length="train.epochs", config=cosine)
    assert problem.startswith("train.epochs = 10 (now 20): the cosine learning-rate schedule spans")
    [problem] = resume_problems(stored, longer, length="train.epochs", config=private)
    assert "DP-SGD's noise is calibrated to spend target_epsilon" in problem
    assert resume_problems(stored, {**stored, "train.lr": 1e-3}, length="train.epochs",
                           config=constant) == ["train.lr = 0.0003 (now 0.001)"]
    assert resume_problems(stored, {**stored, "extra": 1}, length="train.epochs",
                           config=constant) == ["extra = None (now 1)"]
