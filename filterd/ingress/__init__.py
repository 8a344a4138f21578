"""Ways messages reach filterd: Redis Streams (SMS), SMTP after the queue, the milter protocol before it (mail), and an
HTTP scan API (Rspamd-compatible, for Exim, Haraka, Amavis; JSON for applications)."""
