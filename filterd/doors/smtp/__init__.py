"""The SMTP content filter door, after the queue: `nexthop` (the client side and one transaction passed on),
`session` (the server side of one SMTP session), `door` (the message path's decision carried out and relayed).
The names below are the door's public interface."""

from filterd.doors.smtp.door import FilterHandler, SmtpIngress, raise_fd_limit
from filterd.doors.smtp.nexthop import NextHopError, Relay, Reply, parse_path, passed_on

__all__ = ["FilterHandler", "NextHopError", "Relay", "Reply", "SmtpIngress", "parse_path", "passed_on", "raise_fd_limit"]
