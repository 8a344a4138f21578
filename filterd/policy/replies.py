"""The one table of what a client is told for each action: SMTP reply lines (RFC 3463 enhanced codes).

The content filter answers with these lines; the milter hands the same code, status and text to the
MTA, which tells the SMTP client. Relayed outcomes are answered only once the next hop took the message.
"""

from __future__ import annotations

TEMPFAIL_REPLY = "451 4.3.0 Temporary failure classifying message, try again later"
REPLIES = {
    "pass": "250 2.0.0 Ok: queued as ham",
    "tag": "250 2.0.0 Ok: tagged spam",
    "subject": "250 2.0.0 Ok: tagged spam, subject marked",
    "quarantine": "250 2.0.0 Ok: spam quarantined",
    "discard": "250 2.0.0 Ok: discarded as spam",  # the client must believe it was delivered
    "reject": "550 5.7.1 Message rejected as spam",
    "soft-reject": "451 4.7.1 Message deferred as possible spam, try again later",  # no [policy] gives smtp this
    "accept-unknown": "250 2.0.0 Ok: queued unclassified",
    "tempfail": TEMPFAIL_REPLY,
}


def reply_parts(action: str) -> tuple[int, str, str]:
    """(code, enhanced status, text) of an action's reply: 550, "5.7.1", "Message rejected as spam"."""
    code, status, text = REPLIES[action].split(" ", 2)
    return int(code), status, text
