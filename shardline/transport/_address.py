"""Addresses: validation, the loopback rule, and what to advertise for ``0.0.0.0``."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["is_loopback", "parse_tcp", "primary_address", "split_key", "with_key"]

_KEY_MARK = ";key="


def split_key(address: str) -> tuple[str, str | None]:
    """``tcp://h:p;key=Z85`` -> (``tcp://h:p``, ``Z85``). CURVE nodes advertise their key
    inside their address, so a ref handed to a third node carries what it needs to
    connect. (Z85 never contains ``;``.)"""
    base, mark, key = address.partition(_KEY_MARK)
    return base, (key if mark else None)


def with_key(address: str, key: str | None) -> str:
    return f"{address}{_KEY_MARK}{key}" if key else address


def parse_tcp(address: str) -> tuple[str, int]:
    """Host and port of a ``tcp://host:port`` address; ``ValueError`` otherwise."""
    base, _ = split_key(address)
    parts = urlsplit(base)
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"expected an address like tcp://127.0.0.1:5555, got {address!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in address {address!r}") from None
    if port is None:
        raise ValueError(f"address {address!r} has no port (use :0 for any free port)")
    return parts.hostname, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def primary_address() -> str:
    """This host's primary IP: the source address of its default route.

    A UDP ``connect`` only consults the routing table; no packet is sent.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 9))
            return str(s.getsockname()[0])
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
