"""A site's several GPUs, on the CPU: DistributedDataParallel over gloo in 2 processes that the training
call starts itself, against the same training in one process."""

from __future__ import annotations

import pytest
import torch
from test_train import make_site, tiny_config

from client.data import exam_set
from client.device import resolve_runtime
from client.train import train_epochs
from common.model import DualViewDenseNet


def _trained(processes: int, mu: float = 0.0) -> tuple[object, torch.Tensor, torch.optim.Optimizer]:
    config = tiny_config(batch_size=4, augment=False, processes=processes)
    config.data.image_size = (32, 32)
    config.model.norm, config.model.dropout = "group", 0.0  # the processes build the model from the config
    config.train.physical_batch_size = 1 if processes > 1 else 0  # each process accumulates 2 chunks
    data = exam_set([make_site(size=32)], "train")  # 8 exams: 2 steps
    torch.manual_seed(5)
    model = DualViewDenseNet(norm="group", dropout=0.0)
    start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    if processes == 1:  # the processes draw from a generator seeded from the caller's: so does this run
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    stats = train_epochs(model, data, config, epochs=1, optimizer=sgd, runtime=resolve_runtime(config.train),
                         generator=generator, progress=False, mu=mu,
                         global_weights={k: v.detach().clone() for k, v in model.named_parameters()})
    return stats, torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start, sgd


@pytest.mark.slow
def test_two_processes_train_as_one() -> None:
    """Each process computes half of every batch (in chunks), DDP averages: the same steps, loss, update
    and optimiser state as one process (group norm: no batch statistics), FedProx's term included."""
    one, alone, sgd = _trained(1, mu=0.5)
    two, shared, sgd_shared = _trained(2, mu=0.5)
    assert (two.steps, two.exams) == (one.steps, one.exams) == (2, 8)
    assert two.loss == pytest.approx(one.loss, rel=1e-4)
    assert float(alone.norm()) > 0
    assert float((shared - alone).norm()) < 0.01 * float(alone.norm())

    def momentum(optimizer: torch.optim.Optimizer) -> torch.Tensor:  # the state handed back to the caller
        return torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1)
                          for p in optimizer.param_groups[0]["params"]])

    assert float((momentum(sgd_shared) - momentum(sgd)).norm()) < 0.01 * float(momentum(sgd).norm())
