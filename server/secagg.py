"""Secure aggregation of a training round (SecAgg+, Bell et al. 2020): the center learns only the weighted
mean of the sampled sites' updates, never one site's.

Flower 1.41 runs SecAgg+ only in its legacy server workflow. This module is the thin adapter: the run's
own strategy samples the sites and writes their train messages as in any round; here Flower's
`SecAggPlusWorkflow` carries those messages' weights and config to the sites through a legacy context,
and the unmasked mean update comes back as the round's new global weights, with each site's train metrics
(loss, exams, seconds) as the replies the ServerApp records. The sites' side is `client.secagg`.

What it costs and what it does not protect (docs/privacy.md): every update coordinate times the site's
weight share is clipped to ±`secagg-clipping-range` and quantized to 2^24 levels (the mean then differs
from the plain one by about 2·range/2^24 / weight share); the center cannot screen single updates
(`server.sanity`) nor use the robust strategies; with fewer than 3 sites a site could subtract the others'.
With `central-dp = client-fixed` each site clips its update before masking it, and the center adds the
noise to the unmasked mean: the center sees the clipped updates' mean, never one of them, and the
model it sends out carries the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from common.protocol import ARRAYS, CONFIG, METRICS, SECAGG_WEIGHT, SITE, WEIGHTS, site_record
from server.console import MARKER
from server.settings import SECAGG_CENTRAL_DP, Settings

QUANTIZATION_LEVELS = 2**24
"""Per site; with Flower's 2^32 modulus a sum over up to 255 sites cannot wrap around."""
RECONSTRUCTION_THRESHOLD = 2 / 3
"""Shares needed to unmask a dropped site: a third of a site's neighbours may drop out of a round."""


class _Relay(Strategy):
    """The legacy strategy the workflow drives: it sends the run strategy's messages as they are and keeps
    what the unmasking gives back (every result's parameters are the mean update)."""

    def __init__(self, messages: Sequence[Message], grid: Grid, run_id: int) -> None:
        self.messages = {m.metadata.dst_node_id: m for m in messages}
        self.proxies = [GridClientProxy(node, grid, run_id) for node in self.messages]
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any
                      ) -> list[tuple[ClientProxy, FitIns]]:
        fit = []
        for proxy in self.proxies:
            content = self.messages[proxy.node_id].content
            fit.append((proxy, FitIns(ndarrays_to_parameters([content[ARRAYS][WEIGHTS].numpy()]),
                                      dict(content[CONFIG]))))
        return fit

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
                      ) -> tuple[Parameters | None, dict[str, Any]]:
        self.results, self.failures = results, failures
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, *args: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


def secure_round(grid: Grid, context: Context, settings: Settings, server_round: int,
                 messages: Sequence[Message], weight: str) -> tuple[ArrayRecord | None, list[Message]]:
    """Run SecAgg+ on the sampled sites' train `messages` (all holding the same global weights), sites
    weighted by their train metric `weight`. Returns the new global weights (None when the protocol
    halted) and one reply per sampled site: its train metrics and name, or its failure."""
    if not messages:
        return None, []
    relay = _Relay(messages, grid, context.run_id)
    for message in messages:
        message.content[CONFIG][SECAGG_WEIGHT] = weight
    legacy = LegacyContext(Context(run_id=context.run_id, node_id=context.node_id, node_config={},
                                   state=RecordDict(), run_config=context.run_config),
                           config=ServerConfig(num_rounds=settings.rounds), strategy=relay,
                           client_manager=SimpleClientManager())
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content[ARRAYS]
    # Under central DP every site weighs 1, and no value of a clipped update exceeds C.
    dp = settings.central_dp == SECAGG_CENTRAL_DP
    SecAggPlusWorkflow(1.0, RECONSTRUCTION_THRESHOLD, max_weight=1.0 if dp else settings.secagg_max_weight,
                       clipping_range=settings.dp_clipping_norm if dp else settings.secagg_clipping_range,
                       quantization_range=QUANTIZATION_LEVELS, timeout=settings.round_timeout)(grid, legacy)
    arrays = None
    if relay.results:
        (mean_update,) = parameters_to_ndarrays(relay.results[0][1].parameters)
        if dp:
            s = settings
            noise = compute_stdv(s.dp_noise_multiplier, s.dp_clipping_norm, s.dp_sampled_sites)
            add_gaussian_noise_inplace([mean_update], noise)
            log(INFO, "%s round %d: central DP noise of std %.4g added to the secure mean", MARKER,
                server_round, noise)
        global_weights = messages[0].content[ARRAYS][WEIGHTS].numpy()
        arrays = ArrayRecord({WEIGHTS: Array((global_weights + mean_update).astype(np.float32))})
    by_node = {proxy.node_id: fit for proxy, fit in relay.results}
    replies = []
    for message in messages:
        fit = by_node.get(message.metadata.dst_node_id)
        if fit is None:
            reason = "; ".join(map(str, relay.failures)) or "dropped out of the SecAgg+ protocol"
            replies.append(Message(Error(code=0, reason=f"SecAgg+: {reason}"), reply_to=message))
            continue
        metrics = dict(fit.metrics)
        site = str(metrics.pop(SITE))
        replies.append(Message(RecordDict({METRICS: MetricRecord(metrics), SITE: site_record(site)}),
                               reply_to=message))
    return arrays, replies
