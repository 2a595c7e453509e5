"""The site's side of secure aggregation (SecAgg+): Flower's `secaggplus_mod` around the ordinary train
handler, so that what leaves the site in a SecAgg+ round is its update masked with pairwise and private
masks, which only the sum over the sites unmasks (`server.secagg`).

In Flower 1.41 SecAgg+ exists only in the legacy message format: its fit instruction carries the global
weights as `fitins.parameters` and expects a legacy `FitRes`. This mod translates, and nothing else: the
instruction becomes the train message the handler reads (the same training, clipping and DP-SGD as any
round), and the handler's reply becomes a `FitRes` holding the update — trained minus global weights,
small and centred on 0, so that SecAgg+'s fixed-range quantization loses little — weighted by the train
metric the server names (`secagg-weight`: the exam count, or 1 per site under central DP).
Messages of a plain round pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from common.protocol import ARRAYS, CONFIG, METRICS, SITE, TrainInstruction, site_name


def secagg_mod(weights: str) -> Mod:
    """The mod for a train handler whose message holds the global weights as the one Array `weights`."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:  # not a SecAgg+ round
            return call_next(msg, context)
        return secaggplus_mod(msg, context, _as_train(weights, call_next))

    return mod


def _as_train(weights: str, call_next: ClientAppCallable) -> Callable[[Message, Context], Message]:
    def fit(msg: Message, context: Context) -> Message:
        content = msg.content
        (sent,) = content.array_records["fitins.parameters"].values()
        config = content.config_records["fitins.config"]
        global_weights = sent.numpy()
        msg.content = RecordDict({ARRAYS: ArrayRecord({weights: Array(global_weights)}), CONFIG: config})
        reply = call_next(msg, context)
        trained = reply.content[ARRAYS][weights].numpy()
        metrics = reply.content[METRICS]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([trained - global_weights]),
                        int(metrics[TrainInstruction.parse(config).secagg_weight]),
                        {**metrics, SITE: site_name(reply)})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return fit
