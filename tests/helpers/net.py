"""Loopback ports for servers a test starts itself."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A Python prelude for a fresh interpreter: `contacted` collects every address a socket resolves or connects to
# (an audit hook sees them all), so a script can print whether it left the machine.
WATCH_CONNECTIONS = """
import sys
contacted = set()
def _watch(event, args):
    if event == "socket.getaddrinfo":
        contacted.add(str(args[0]))
    elif event == "socket.connect" and isinstance(args[1], tuple):
        contacted.add(str(args[1][0]))
sys.addaudithook(_watch)
"""
