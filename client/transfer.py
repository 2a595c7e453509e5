"""Half-precision transfer at the site: when the center sends the global weights as bfloat16 or float16
(run config `transfer-dtype`), the site trains from them decoded to float32 and replies with its update
(trained − received) in the same type, half the bytes of float32 weights (`common.protocol`).

A mod around the train handler, outside central DP's clipping mod: the handler and the clipping see
float32 weights as in any round, and the reply is encoded last, after clipping."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.protocol import ARRAYS, UPDATE, WEIGHTS, decode, encode, transfer_dtype


def transfer_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    dtype = transfer_dtype(msg.content[ARRAYS])
    if dtype == "float32":
        return call_next(msg, context)
    received = decode(msg.content[ARRAYS][WEIGHTS])
    msg.content[ARRAYS] = ArrayRecord({WEIGHTS: Array(received)})
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    update = decode(reply.content[ARRAYS][WEIGHTS]) - received
    reply.content[ARRAYS] = ArrayRecord({UPDATE: encode(torch.from_numpy(update), dtype)})
    return reply
