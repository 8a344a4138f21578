"""The milter door: the message path's decision turned into a milter reply (header edits and one verdict)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

from filterd.config import HeadersConfig, MilterConfig
from filterd.doors.milter.protocol import (
    Accept, AddHeader, ChangeSubject, Discard, MilterMessage, MilterReply, Modification, Quarantine, Reject, Tempfail,
    _HEADER_NAME, _text,
)
from filterd.doors.path import Inbound, MessagePath
from filterd.mail.headers import DEFAULT_HEADERS, plan_edits, upstream_name
from filterd.policy.decision import Decision
from filterd.policy.replies import reply_parts

if TYPE_CHECKING:
    from filterd.obs.metrics import FilterdMetrics

log = logging.getLogger("filterd.doors.milter")

# --------------------------------------------------------------------------------------------
# The door: a Decision (filterd/policy/decision.py) turned into a milter reply


class MilterDoor:
    """`on_message` for the daemon: the message path's decision answered with milter actions. Every
    accepted message loses its forged X-Spam-*/X-Filterd-* headers and gets ours. A failed or busy
    classification follows `[milter] on_error` (accept with an Unknown status, or 451), like the SMTP door's."""

    def __init__(self, cfg: MilterConfig, path: MessagePath, subject_prefix: str, metrics: FilterdMetrics | None = None,
                 headers: HeadersConfig = DEFAULT_HEADERS) -> None:  # fmt: skip
        self.cfg = cfg
        self.path = path
        self.headers = headers
        self.prefix = subject_prefix
        self.metrics = metrics
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def on_message(self, msg: MilterMessage) -> MilterReply:
        self.in_flight += 1
        self._idle.clear()
        t0 = time.perf_counter()
        try:
            return await self._decide(msg)
        finally:  # end of message to reply, also when reply_timeout cuts it short (cancelled here)
            if self.metrics is not None:
                self.metrics.observe_request("milter", time.perf_counter() - t0)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    async def _decide(self, msg: MilterMessage) -> MilterReply:
        inbound = Inbound("milter", raw=msg.raw(), sender=msg.sender, recipients=tuple(msg.recipients), client_address=msg.client,
                          authenticated=msg.macros.get("auth_authen", ""), ref=msg.queue_id, size=msg.size,
                          headers_cut=msg.headers_cut)  # fmt: skip
        scan = await self.path.scan(inbound)
        if scan.error:
            log.warning("milter: %s: classification failed (%s); on_error = %s", msg.queue_id or "-", scan.error, self.cfg.on_error)
        reply, action = self._reply(msg, scan.decision, scan.model, scan.error, scan.report)
        self.path.done(scan, action, lead=[("queue_id", msg.queue_id or "-")])
        return reply

    def _reply(self, msg: MilterMessage, d: Decision | None, model: str, error: str, report: str = "") -> tuple[MilterReply, str]:
        if d is None and self.cfg.on_error == "tempfail":
            return MilterReply(Tempfail(*reply_parts("tempfail"))), "tempfail"
        action = "accept-unknown" if d is None else d.action
        if action == "reject":
            return MilterReply(Reject(*reply_parts("reject"))), action
        if action == "soft-reject":
            return MilterReply(Tempfail(*reply_parts("soft-reject"))), action
        if action == "discard":
            return MilterReply(Discard()), action
        edits = plan_edits(d, model, error, self.headers, report, self.prefix)
        mods: list[Modification] = list(msg.forged_header_deletions())
        mods += _upstream_renamed(msg, self.headers)
        mods += [AddHeader(name, value) for name, value in edits.fields]
        if edits.subject_prefix:
            mods.append(ChangeSubject(edits.subject_prefix + _subject_of(msg)))
        elif edits.quarantine:
            mods.append(Quarantine(f"filterd: spam score {d.score:.4f}" if d is not None and d.score is not None else "filterd: spam"))
        return MilterReply(Accept(), tuple(mods)), action


def _upstream_renamed(msg: MilterMessage, headers: HeadersConfig) -> list[AddHeader]:
    """With [headers] keep_upstream: the incoming X-Spam-* fields added back under their new names
    (their originals are deleted with the forged ones). A milter cannot rename a field, and its
    ADDHEADER value is one line, so a folded value is unfolded (the same value, RFC 5322 2.2.3).
    Fields past max_message_bytes were not kept, so they are only deleted."""
    out = []
    for line in msg.header_lines:
        name, _, value = line.partition(b":")
        new = upstream_name(_text(name).strip(), headers)
        if new is not None and _HEADER_NAME.fullmatch(new):  # a name too long to rename is only deleted
            out.append(AddHeader(new, re.sub(r"[\r\n\0]", "", _text(value)).strip()))
    return out


def _subject_of(msg: MilterMessage) -> str:
    """The first Subject's value as received, wherever it lay, unfolded (a folded value cannot go back in one field)."""
    return "" if msg.subject is None else re.sub(r"[\r\n\x00]", "", _text(msg.subject)).strip()
