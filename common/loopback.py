"""Ports on loopback for the processes a command starts (SuperLinks, SuperNodes' runtimes, DDP's
rendezvous); no heavy import, as the site's supervisor (`client.node`) uses it too."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
