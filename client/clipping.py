"""Central DP's clipping at the site: when the server's strategy is wrapped for client-side clipping
(`server.privacy`), the site clips its own update with Flower's clipping mod before it leaves, so the
server never holds an unclipped update. The train message's config names the mode (`CENTRAL_DP`)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from common.protocol import CENTRAL_DP, CONFIG

_MODS = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixed or adaptive clipping mod when the server asks for client-side clipping; else nothing."""
    mod = _MODS.get(str(msg.content[CONFIG].get(CENTRAL_DP, "none")))
    return mod(msg, context, call_next) if mod else call_next(msg, context)
