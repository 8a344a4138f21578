"""Ways messages reach filterd: Redis Streams (SMS) and SMTP (mail)."""
