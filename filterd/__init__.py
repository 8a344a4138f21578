"""filterd: a GPT-2 spam classifier for mail servers and SMS gateways."""

__version__ = "0.1.0"
