"""systemd `Type=notify` readiness: READY=1 / STOPPING=1 to $NOTIFY_SOCKET, a no-op without it."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("filterd")


def sd_notify(state: str) -> bool:
    """Send one notification; returns whether it was sent. Never raises: systemd is optional."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", state.split("\n")[0], e)
        return False
