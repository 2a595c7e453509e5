"""Update sanity at the center: each site's trained weights are checked before they are aggregated.

A broken or hostile site must not poison the global model: an update that is not the model's one float32
array of the exchanged size (with a half-precision `transfer-dtype`: its one half-precision update), holds
NaN or Inf, claims a non-positive number of training exams, or whose distance to the global weights is
absurd — above the run config's cap `max-update-norm`, or more than `update-norm-factor` times the median
of the other sites' distances this round — is left out of the round with a logged reason naming the site.
The robust strategies (trimmed mean, median, Krum) still aggregate what passes; this check only removes
what is certainly wrong. Under secure aggregation the center sees no single update, so these checks cannot
apply there (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common import log

from common.protocol import UPDATE, WEIGHTS, ProtocolError, decode, site_name
from server.console import MARKER


def inspect_update(reply: Message, sent: Mapping[str, np.ndarray], clip_to: float = 0.0
                   ) -> tuple[str | None, float]:
    """What makes this reply's weights unusable whatever the other sites sent (or None), and their L2
    distance to the global weights they were sent (`sent`: those weights, decoded), in one pass.

    A half-precision reply (`common.protocol.UPDATE`) is decoded here and, when usable, replaced by the
    float32 weights it makes with the center's master copy, which the strategy aggregates; its update is
    first scaled down to `clip_to` where it exceeds it (central DP's clipping at the sites: rounding to
    half precision after clipping may lengthen an update a little)."""
    arrays = reply.content.array_records.get("arrays")
    half = arrays is not None and list(arrays) == [UPDATE] and list(sent) == [WEIGHTS]
    if not half and (arrays is None or list(arrays) != list(sent)):
        return f"its weights are {sorted(arrays or {})}, expected {list(sent)}", math.nan
    squares, updates = 0.0, {}
    for name, expected in sent.items():
        if half:
            try:
                diff = decode(arrays[UPDATE])
            except ProtocolError as exc:
                return f"its update: {exc}", math.nan
            if diff.shape != expected.shape:
                return f"its update holds {diff.size} values, expected {expected.size}", math.nan
        else:
            got = arrays[name]
            try:
                dtype = np.dtype(got.dtype)
            except TypeError:
                return f"weights {name!r} are of an unknown type {got.dtype!r}", math.nan
            if (tuple(got.shape), dtype) != (expected.shape, expected.dtype):
                return (f"weights {name!r} are {got.dtype}{list(got.shape)}, "
                        f"expected {expected.dtype}{list(expected.shape)}"), math.nan
            try:
                values = decode(got)  # what the data holds, whatever the Array's shape says
            except ProtocolError as exc:
                return f"weights {name!r}: {exc}", math.nan
            if values.shape != expected.shape:
                return f"weights {name!r} hold {values.size} values, expected {expected.size}", math.nan
            diff = values - expected
        # float32 throughout (3× faster than float64; relative error ~1e-5 over 7 M weights, far below any
        # threshold's precision). The global weights are finite, so the sum of squares is not finite
        # exactly when the site's weights hold NaN or Inf (or are absurdly far off, which fails anyway).
        if not math.isfinite(part := float(np.dot(diff, diff))):
            return f"weights {name!r} hold NaN or Inf (or exceed the float32 range)", math.nan
        squares += part
        updates[name] = diff
    examples = reply.content.metric_records.get("metrics", {}).get("num-examples")
    if not isinstance(examples, int | float) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples is {examples!r}, expected a positive count", math.nan
    norm = math.sqrt(squares)
    if half:
        scale = clip_to / norm if clip_to and norm > clip_to else 1.0
        reply.content["arrays"] = ArrayRecord({name: Array(sent[name] + np.float32(scale) * diff)
                                              for name, diff in updates.items()})
    return None, norm


def screen_updates(replies: Sequence[Message], sent: ArrayRecord, what: str, *, max_norm: float = 0.0,
                   norm_factor: float = 0.0, clip_to: float = 0.0) -> tuple[list[Message], list[str]]:
    """The replies whose update passes, in order, each holding float32 weights, and one reason per rejected
    site ("site NAME: ...").

    `max_norm` caps the update's L2 norm (0: no cap); `norm_factor` rejects an update more than that many
    times the median norm of the round's other well-formed updates (0: off; needs another update);
    `clip_to`: see `inspect_update`."""
    reasons, kept, norms = [], [], {}
    decoded = {name: decode(array) for name, array in sent.items()}  # once, not once per site
    for reply in replies:
        problem, norms[id(reply)] = inspect_update(reply, decoded, clip_to)
        if problem:
            reasons.append((reply, problem))
        else:
            kept.append(reply)
    for reply in list(kept):
        norm = norms[id(reply)]
        others = [norms[id(r)] for r in kept if r is not reply]
        problem = None
        if max_norm and norm > max_norm:
            problem = f"update norm {norm:.4g} exceeds max-update-norm {max_norm:.4g}"
        elif norm_factor and others and norm > norm_factor * (median := float(np.median(others))):
            problem = (f"update norm {norm:.4g} is more than {norm_factor:g}× the median {median:.4g} of "
                       "the other sites' updates")
        if problem:
            reasons.append((reply, problem))
    rejected = {id(r) for r, _ in reasons}
    messages = [f"site {site_name(reply)}: {problem}" for reply, problem in reasons]
    for message in messages:
        log(WARNING, "%s %s: update rejected, the round goes on without it: %s", MARKER, what, message)
    return [r for r in replies if id(r) not in rejected], messages
