"""systemd notifications: READY=1 / STOPPING=1 to $NOTIFY_SOCKET, and the WatchdogSec= pings; no-ops without systemd."""

from __future__ import annotations

import asyncio
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


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when systemd does not expect
    them from this process ($WATCHDOG_USEC unset, or $WATCHDOG_PID naming another process)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # inherited from a parent that is the one being watched
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


async def watchdog() -> None:
    """Ping WATCHDOG=1 every WATCHDOG_USEC/2 for as long as the event loop runs it (cancel to stop).

    A blocked or dead event loop stops the pings, and systemd restarts the service
    (WatchdogSec= in the unit). Returns at once when no watchdog is configured.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    log.info("systemd watchdog: WATCHDOG=1 every %.1fs", interval)
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)
