"""Sending messages to the sites and collecting their replies, by site name: the wait for enough sites,
the replies that count, and the failed or missing sites, logged and recorded (`server.attendance`).
Flower's own wait for `min_available_nodes` has no time limit, and a strategy round "completes" with no
reply at all: here both are a `RoundError`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from logging import WARNING
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from common.protocol import site_name
from server.attendance import Attendance
from server.console import MARKER
from server.settings import Settings


class RoundError(RuntimeError):
    """A round that cannot go on: no site replied, every site failed, or too few sites are connected."""


def wait_for_nodes(grid: Grid, settings: Settings) -> None:
    """Until `min-nodes` SuperNodes are connected, for at most `node-wait-timeout` seconds."""
    deadline = time.monotonic() + settings.node_wait_timeout
    while (connected := len(list(grid.get_node_ids()))) < settings.min_nodes:
        if time.monotonic() > deadline:
            raise RoundError(f"only {connected} SuperNode(s) connected after "
                             f"{settings.node_wait_timeout:.0f} s; the run needs {settings.min_nodes}")
        time.sleep(1)


def successful(replies: Iterable[Message], asked: Sequence[int], what: str, settings: Settings,
               attendance: Attendance, everyone_asked: bool = True, minimum: int = 1
               ) -> tuple[list[Message], list[str]]:
    """The replies without error, by site name, and the sites missing from the exchange; an error when
    none replied, or fewer than `minimum` (a failed round)."""
    replies, sent, timeout = list(replies), len(asked), settings.round_timeout
    failed = [r for r in replies if r.has_error()]
    for reply in failed:
        log(WARNING, "%s %s: a site failed (node %d): %s", MARKER, what, reply.metadata.src_node_id,
            reply.error.reason)
    good = sorted((r for r in replies if not r.has_error()),
                  key=lambda r: (site_name(r), r.metadata.src_node_id))
    if not good:
        reasons = "; ".join(sorted({_last_line(r.error.reason) for r in failed if r.error.reason}))
        raise RoundError(f"{what}: no site replied: {len(failed)} of {sent} failed"
                         + (f" ({reasons})" if reasons else "")
                         + f", {sent - len(replies)} did not answer within {timeout:.0f} s")
    names = [site_name(r) for r in good]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"several SuperNodes report site-name {', '.join(duplicates)}: give each its own")
    missing = attendance.missing(asked, good, everyone_asked)
    if missing:
        log(WARNING, "%s %s: missing %s (failed, or no reply within %.0f s)", MARKER, what,
            ", ".join(missing), timeout)
    if len(good) < minimum:
        raise RoundError(f"{what}: only {len(good)} site(s) replied ({', '.join(names)}; missing: "
                         f"{', '.join(missing) or 'none'}), min-nodes is {minimum}: resume the run "
                         "(resume=true) when enough sites are back")
    return good, missing


def broadcast(grid: Grid, message_type: str, content: RecordDict, what: str, settings: Settings,
              attendance: Attendance) -> tuple[list[Message], list[str]]:
    """`content` to every connected site; their good replies and the missing sites."""
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    return successful(grid.send_and_receive(messages, timeout=settings.round_timeout), nodes, what, settings,
                      attendance)


def missing_rows(server_round: int, phase: str, missing: Iterable[str]) -> list[dict[str, Any]]:
    """The metrics rows that record the sites missing from an exchange."""
    return [{"round": server_round, "phase": phase, "site": site, "missing": 1} for site in missing]


def _last_line(text: str) -> str:
    """A failure's gist: the last line of a traceback, shortened."""
    return text.strip().splitlines()[-1][:300]
