"""katerchen: a personal mail server. SMTP in, Maildir out, a durable relay queue."""

__version__ = "0.1.0"
