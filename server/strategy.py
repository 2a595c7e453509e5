"""The run's Flower strategy, built from its settings: the aggregation, sampling and site weighting, wrapped
for central DP where asked (`server.privacy`)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from common.config import Config
from common.protocol import NUM_EXAMPLES, SITE_WEIGHT
from server.privacy import wrap
from server.settings import Settings

BUILDERS: dict[str, Callable[..., Strategy]] = {
    "fedavg": lambda s, c, nodes: FedAvg(**nodes),
    "fedprox": lambda s, c, nodes: FedProx(**nodes, proximal_mu=s.proximal_mu),
    "fedadam": lambda s, c, nodes: FedAdam(**nodes, eta_l=c.train.lr,
                                           **({"eta": s.server_lr} if s.server_lr else {})),
    "fedavgm": lambda s, c, nodes: FedAvgM(**nodes, server_momentum=s.server_momentum,
                                           **({"server_learning_rate": s.server_lr} if s.server_lr else {})),
    "trimmed-mean": lambda s, c, nodes: FedTrimmedAvg(**nodes, beta=s.trim_beta),
    "median": lambda s, c, nodes: FedMedian(**nodes),
    "krum": lambda s, c, nodes: Krum(**nodes, num_malicious_nodes=s.krum_malicious),
}
"""Run-config `strategy` (`server.settings.STRATEGIES`) → Flower's strategy; `server-lr` 0 keeps the
strategy's own default."""


def weighting(settings: Settings) -> str:
    """The train metric the strategy weights sites by: exams, unless the run asks for equal weights or
    uses central DP (whose noise is calibrated to the plain mean of the clipped updates)."""
    equal = settings.site_weighting == "equal" or settings.central_dp != "none"
    return SITE_WEIGHT if equal else NUM_EXAMPLES


def make_strategy(settings: Settings, config: Config) -> Strategy:
    nodes = {"fraction_train": settings.fraction_train, "min_train_nodes": settings.min_nodes,
             "min_evaluate_nodes": settings.min_nodes, "min_available_nodes": settings.min_nodes,
             "weighted_by_key": weighting(settings)}
    return wrap(BUILDERS[settings.strategy](settings, config, nodes), settings)
