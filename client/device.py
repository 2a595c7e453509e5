"""Where and how precisely the model runs: device, autocast, memory format, threads and seeds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from common.config import TrainConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    """Autocast dtype, or None for plain fp32."""
    channels_last: bool

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, enabled only for fp16, whose gradients underflow without it."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def place(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


def resolve_runtime(config: TrainConfig, *, private: bool = False) -> Runtime:
    """The device and precision `config` asks for. `private` (DP-SGD with Opacus) rules out channels_last,
    which gives silently wrong per-sample gradients for conv weights. `config.device` and `.precision` are
    among `common.config`'s DEVICES and PRECISIONS (checked when the config is read)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA device is available")
    cuda = device.type == "cuda"
    if config.precision == "auto":
        amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    elif config.precision == "fp16" and not cuda:
        raise ValueError("train.precision 'fp16' needs CUDA; on CPU use 'bf16' or 'fp32'")
    else:
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    return Runtime(device, amp, channels_last=cuda and not private)
