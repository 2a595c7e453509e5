"""Local differential privacy at a site: DP-SGD with Opacus ([privacy] dp_sgd = true).

Each step trains on a Poisson-sampled batch (every exam drawn with probability q = 1 / ⌈exams / batch⌉),
clips each exam's gradient to `max_grad_norm` and adds Gaussian noise of standard deviation
z · max_grad_norm (Opacus's PrivacyEngine: per-sample gradient hooks, DPOptimizer, DPDataLoader). Opacus's
RDP accountant adds up the ε the site has spent; its history is kept in the site's run folder after every
round (`privacy/round-NNNN.json`), so the account carries over rounds and a resumed run.

The noise multiplier z is `noise_multiplier`, or calibrated once, in round 1, so that the run's planned
steps (rounds × local steps) spend exactly `target_epsilon`. A site whose next round would take it over
`target_epsilon` does not train and says so (`BudgetSpent`); the run goes on with the others.

The batches and the noise are drawn from a secret seed (`PrivateSGD.seed`, from the operating system),
not from the run's seeds: those the center knows, and with them it could redraw the noise and take it off
the update. So a DP-SGD round is not reproducible, by design.

The guarantee covers the site's training exams (example-level: one exam is one breast of one patient; a
patient with both breasts in the set has twice the ε). Never combined with channels_last: Opacus then
computes wrong per-sample gradients for every convolution, silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.atomic import write_atomic
from common.config import Config, PrivacyConfig

Batches = Callable[[], Iterator[Tensor]]
"""One epoch's Poisson-sampled batches of exam indices."""
STATE = "privacy"
"""The folder, in the site's run folder, of the accountant's state after each round."""


class BudgetSpent(RuntimeError):
    """The site's privacy budget does not allow another round: it stops training."""


@dataclasses.dataclass
class PrivateSGD:
    """One round of DP-SGD at a site, and the site's account of ε across rounds."""

    settings: PrivacyConfig
    batch_size: int
    sample_rate: float
    noise_multiplier: float
    history: list[tuple[float, float, int]]
    """Opacus RDPAccountant's history: (noise multiplier, sampling rate, steps)."""
    chunk: int
    """`train.physical_batch_size`: exams per chunk of a batch; 0 = whole batches."""
    seed: int = dataclasses.field(default_factory=lambda: secrets.randbits(63))
    """Seeds the Poisson sampling and the noise: secret (see the module docstring)."""
    _module: Any = None
    _engine: PrivacyEngine | None = None
    _optimizer: DPOptimizer | None = None

    @classmethod
    def for_round(cls, folder: Path, server_round: int, config: Config, exams: int, steps: int, rounds: int
                  ) -> PrivateSGD:
        """The site's DP-SGD for `server_round`: its account so far (from `folder`), the noise multiplier
        (stored, set, or calibrated for `rounds` rounds of `steps` steps); `BudgetSpent` when this round's
        `steps` would exceed the budget."""
        settings = config.privacy
        batch_size = config.train.batch_size
        sample_rate = 1 / math.ceil(exams / batch_size)  # Opacus's DPDataLoader: 1 / len(data_loader)
        previous = _load(folder, server_round)
        if previous is not None:
            noise = previous["noise_multiplier"]
        elif settings.noise_multiplier > 0:
            noise = settings.noise_multiplier
        else:
            noise = get_noise_multiplier(target_epsilon=settings.target_epsilon, target_delta=settings.delta,
                                         sample_rate=sample_rate, steps=rounds * steps, accountant="rdp")
        history = [tuple(h) for h in previous["history"]] if previous else []
        private = cls(settings, batch_size, sample_rate, noise, history, config.train.physical_batch_size)
        budget = settings.target_epsilon
        if budget > 0 and (after := private.epsilon(extra_steps=steps)) > budget:
            raise BudgetSpent(f"privacy budget spent: ε = {private.epsilon():.3f} so far, {after:.3f} after "
                              f"this round's {steps} steps, over target_epsilon = {budget:g} (δ = "
                              f"{settings.delta:g}): this site stops training")
        return private

    def epsilon(self, extra_steps: int = 0) -> float:
        """ε spent so far at δ, or after `extra_steps` more steps."""
        accountant = RDPAccountant()
        accountant.history = list(self.history)
        if extra_steps:
            accountant.history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return float(accountant.get_epsilon(self.settings.delta)) if accountant.history else 0.0

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, exams: int
               ) -> tuple[nn.Module, torch.optim.Optimizer, Batches]:
        """Opacus's per-sample gradient module and DP optimizer for `model` (on its device) and `optimizer`,
        and the epochs' Poisson-sampled index batches (in chunks of `train.physical_batch_size`, each
        chunk a call of the optimizer, which steps at the end of a batch: see `stepped`)."""
        if wrong := [n for n, p in model.named_parameters() if p.ndim == 4 and not p.is_contiguous()
                     and p.is_contiguous(memory_format=torch.channels_last)]:
            raise ValueError(f"DP-SGD with a channels_last model ({wrong[0]}, …): Opacus's per-sample "
                             "gradients of convolutions are silently wrong in that layout")
        device = next(model.parameters()).device
        loader = DataLoader(TensorDataset(torch.arange(exams)), batch_size=self.batch_size,
                            generator=torch.Generator().manual_seed(self.seed))
        with warnings.catch_warnings():  # "secure RNG turned off": see docs/privacy.md
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant="rdp")
            engine.accountant.history = list(self.history)
            module, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.settings.max_grad_norm, poisson_sampling=True,
                noise_generator=torch.Generator(device).manual_seed(self.seed))
        if abs(loader.sample_rate - self.sample_rate) > 1e-12:
            raise AssertionError(f"Opacus samples at {loader.sample_rate}, accounted {self.sample_rate}")
        self._module, self._engine, self._optimizer = module, engine, optimizer
        if 0 < self.chunk < self.batch_size:
            return module, optimizer, lambda: (index for (index,) in wrap_data_loader(
                data_loader=loader, max_batch_size=self.chunk, optimizer=optimizer))
        return module, optimizer, lambda: (index for (index,) in loader)

    def stepped(self) -> bool:
        """Whether the optimizer's last call was a step (the end of a batch), not a chunk's accumulation."""
        assert self._optimizer is not None
        return not self._optimizer._is_last_step_skipped  # Opacus has no public accessor

    def detach(self) -> None:
        """Take the steps trained into the account; the model loses Opacus's hooks."""
        assert self._engine is not None and self._module is not None
        self.history = [tuple(h) for h in self._engine.accountant.history]
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)  # the last batch's per-exam and clipped sums go too
        self._module.to_standard_module()
        self._module = self._engine = self._optimizer = None

    def save(self, folder: Path, server_round: int) -> None:
        state = {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                 "history": self.history, "epsilon": self.epsilon(), "delta": self.settings.delta}
        write_atomic(folder / STATE / f"round-{server_round:04d}.json", json.dumps(state, indent=1) + "\n")

    def metrics(self) -> dict[str, float]:
        """What the site reports each round: ε spent so far, at δ, and the noise multiplier."""
        return {"epsilon": self.epsilon(), "delta": self.settings.delta,
                "noise-multiplier": self.noise_multiplier}


def _load(folder: Path, server_round: int) -> dict[str, Any] | None:
    """The account after the last round before `server_round` (a round run again is not counted twice)."""
    kept = [p for p in sorted((folder / STATE).glob("round-*.json"))
            if int(p.stem.removeprefix("round-")) < server_round]
    return json.loads(kept[-1].read_text()) if kept else None
