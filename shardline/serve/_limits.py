"""The HTTP server's limits by default (flags of ``shardline serve``), in one place for
the CLI, which must not import the server to build its help."""

from __future__ import annotations

__all__ = ["BODY_TIMEOUT", "HEADER_TIMEOUT", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 2 * 1024 * 1024
"""Room for 2048 inputs (OpenAI's maximum per request) of 150-200 words each."""

HEADER_TIMEOUT = 10.0
"""Seconds from a connection's opening, or a request's first byte, to the end of its
head; then the connection is closed."""

BODY_TIMEOUT = 30.0
"""Seconds for a request's body to arrive in full (a 2 MiB body at 70 KB/s); then 408."""
