"""Free ports, for servers that must be told their ports before they start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now. Someone may take it before it is bound: a server started
    on it must be ready to pick again (``ServerProcess.start`` is)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
