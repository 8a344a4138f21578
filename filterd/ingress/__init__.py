"""Ways messages reach filterd: Redis Streams (SMS), SMTP after the queue and the milter protocol before it (mail)."""
