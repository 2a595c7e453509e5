"""Which sites answered an exchange and which did not, by site name.

Flower knows SuperNodes by node id, which changes when a SuperNode restarts, and names none: the error
reply the SuperLink makes for a dead node even names node 1 (itself). People know sites by name. A site's
name is learnt from its first reply (`site-name` in its node config); from then on, a site that was sent a
message but did not answer (dead, failed, or slower than `round-timeout`), or that is no longer connected
at all while every connected node was asked, is *missing* from that exchange: named in the round's metrics
and on the console, so that the center can tell which hospital to call. The run goes on when `min-nodes`
sites answered, and a site that comes back (under any node id) simply answers the next exchange.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Message

from common.protocol import ALL, site_name


class Attendance:
    """Site names by node id, and the sites known to take part in the run (kept across a resume through
    the metrics history, since node ids are not)."""

    def __init__(self, history: Iterable[Mapping[str, Any]] = ()) -> None:
        self.names: dict[int, str] = {}
        self.known = {str(row["site"]) for row in history
                      if row.get("phase") in ("train", "evaluate") and row.get("site") not in (None, ALL)}

    def missing(self, asked: Sequence[int], replies: Iterable[Message], everyone_asked: bool) -> list[str]:
        """The sites that did not answer (`replies`: the good ones) among `asked` (node ids), and with
        `everyone_asked` every known site that did not answer. A node that never answered in this run is
        `node N`, unless a known site is missing too: it is then most likely that site under a new id."""
        answered = {r.metadata.src_node_id: site_name(r) for r in replies}
        self.names |= answered
        self.known |= set(answered.values())
        silent = [node for node in asked if node not in answered]
        named = {self.names[node] for node in silent if node in self.names}
        if everyone_asked:
            named |= self.known
        named -= set(answered.values())
        unnamed = [f"node {node}" for node in silent if node not in self.names]
        return sorted(named) + ([] if named else unnamed)
