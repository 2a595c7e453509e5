"""Where and how the model runs: device, autocast, memory format, compilation and the site's processes.

On CUDA: bf16 autocast where the GPU has it (fp16 with loss scaling elsewhere), channels_last (not with
DP-SGD), cuDNN's autotuner (the views' size never changes within a run, so the fastest convolution
algorithms are measured once; it makes GPU runs not bit-reproducible, which CPU runs remain), and one
training process per GPU (`client.distributed`)."""

from __future__ import annotations

import contextlib
import itertools
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
    processes: int = 1
    """Training processes (DistributedDataParallel, `client.distributed`); 1 = this process alone."""
    compile: bool = False
    """Run the model's forward and backward through `torch.compile`."""

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, enabled only for fp16, whose gradients underflow without it."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def place(self, model: nn.Module) -> nn.Module:
        """`model` on this device, its convolution weights in this memory format either way (a model lent
        from message to message, `client.app`, may come from a runtime with another). A model already
        placed is left alone: `to` walks its ~1,200 tensors."""
        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if any(t.device != device or (t.dim() == 4 and not t.is_contiguous(memory_format=layout))
               for t in itertools.chain(model.parameters(), model.buffers())):
            model.to(device, memory_format=layout)
        return model

    def compiled(self, model: nn.Module) -> nn.Module:
        """What to call for the forward pass: `model` itself, or compiled (its weights stay `model`'s, and
        so do its state dict's keys)."""
        return torch.compile(model) if self.compile else model  # type: ignore[return-value]


def resolve_runtime(config: TrainConfig, *, private: bool = False) -> Runtime:
    """The device, precision and processes `config` asks for. `private` (DP-SGD with Opacus) rules out
    channels_last, which gives silently wrong per-sample gradients for conv weights, compilation (Opacus's
    hooks) and several processes. `config.device` and `.precision` are among `common.config`'s DEVICES and
    PRECISIONS (checked when the config is read)."""
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
    gpus = torch.cuda.device_count() if cuda else 0
    processes = config.processes or (gpus if cuda and device.index is None and not private else 1)
    if processes > 1 and private:
        raise ValueError(f"train.processes = {processes} with DP-SGD: a site's DP-SGD runs in one process")
    if cuda and processes > 1 and (device.index is not None or processes > gpus):
        raise ValueError(f"train.processes = {processes} needs as many GPUs, with train.device 'auto' or "
                         f"'cuda' (one process per GPU); this machine shows {gpus}")
    if cuda:
        torch.backends.cudnn.benchmark = True
    return Runtime(device, amp, channels_last=cuda and not private, processes=max(processes, 1),
                   compile=config.compile and not private)
