"""The milter door, before the queue: `protocol` (the wire format and the types it carries), `server` (the
listening socket and its sessions), `door` (the message path's decision turned into milter actions).
The names below are the door's public interface."""

from filterd.doors.milter.door import MilterDoor
from filterd.doors.milter.protocol import (
    FORGED_PREFIXES,
    Accept,
    AddHeader,
    ChangeSubject,
    DeleteHeader,
    Discard,
    MilterMessage,
    MilterReply,
    Quarantine,
    Reject,
    Tempfail,
    forged_header_deletions,
)
from filterd.doors.milter.server import MilterServer, MilterStats

__all__ = [
    "FORGED_PREFIXES", "Accept", "AddHeader", "ChangeSubject", "DeleteHeader", "Discard", "MilterDoor", "MilterMessage",
    "MilterReply", "MilterServer", "MilterStats", "Quarantine", "Reject", "Tempfail", "forged_header_deletions",
]  # fmt: skip
