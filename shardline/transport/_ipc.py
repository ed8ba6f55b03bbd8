"""A node's second listening endpoint, ``ipc://`` on an abstract Unix socket, for
clients on its own host.

A round trip over a Unix socket skips the kernel's TCP stack on both sides (a sixth
to a quarter of a small remote ask on loopback). The name is in Linux's abstract
namespace: no file is ever created, so nothing is left behind when the process is
killed, and a client in another network namespace cannot reach it (it then stays on
TCP). The TCP address stays the node's identity; ``Peer`` moves a connection here
only after a hello over TCP said both ends are on one host.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

import zmq

from ._memfd import host_id

__all__ = ["bind_ipc", "ipc_offer_usable", "ipc_wanted"]

log = logging.getLogger("shardline.transport")

_PREFIX = "ipc://@shardline-node/"
_host = functools.cache(host_id)  # two files read once, not at every connection


def ipc_wanted() -> bool:
    """Linux with a libzmq that has ipc, and not ``SHARDLINE_IPC=off``."""
    value = os.environ.get("SHARDLINE_IPC", "").strip().lower()
    if value in ("off", "0", "no", "false"):
        return False
    return sys.platform == "linux" and bool(zmq.has("ipc"))


def bind_ipc(sock: zmq.Socket[Any], node_id: str) -> dict[str, str] | None:
    """Bind ``sock`` also to the node's abstract ipc endpoint; the hello's ``ipc``
    offer (None: not offered, and TCP carries everything)."""
    if not ipc_wanted():
        return None
    host = _host()
    if not host:
        return None  # no way for a client to tell it is on this host
    address = f"{_PREFIX}{node_id}"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        log.debug("no ipc endpoint (%s): clients on this host use TCP", exc)
        return None
    return {"addr": address, "host": host}


def ipc_offer_usable(offer: Any) -> str | None:
    """The address of a hello's ``ipc`` offer, if this process should use it: the
    node is on this host and the offer is well formed."""
    if not isinstance(offer, dict) or not ipc_wanted():
        return None
    address, host = offer.get("addr"), offer.get("host")
    if not (isinstance(address, str) and address.startswith(_PREFIX)
            and len(address) <= 200 and isinstance(host, str) and host):
        return None
    return address if host == _host() else None
