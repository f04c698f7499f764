"""Creditline: an online charging server (OCS) over gRPC, balances in Redis."""

__version__ = "0.1.0"
