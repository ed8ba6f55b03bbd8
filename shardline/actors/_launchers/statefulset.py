"""A Kubernetes StatefulSet pod: the rank is the ordinal at the end of the pod's
hostname (``shardline-3``), the head is ordinal 0 behind the headless Service
(``shardline-0.<service>``).

It applies inside Kubernetes only (``KUBERNETES_SERVICE_HOST`` is set in every pod) or
when ``SHARDLINE_SERVICE`` names the Service; without ``SHARDLINE_SERVICE`` the
Service is taken to have the StatefulSet's name. Kubernetes does not tell a pod the
replica count: set ``SHARDLINE_WORLD_SIZE`` in the pod template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._found import Found, integer

__all__ = ["read"]

_ORDINAL = re.compile(r"^(?P<set>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<ordinal>\d+)$")


def read(environ: Mapping[str, str], hostname: str) -> Found | None:
    service = environ.get("SHARDLINE_SERVICE", "").strip()
    if not service and not environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    name = (environ.get("HOSTNAME") or hostname).split(".")[0]
    match = _ORDINAL.match(name)
    if match is None:
        return None
    stateful_set = match.group("set")
    return Found("StatefulSet", int(match.group("ordinal")),
                 integer(environ, "SHARDLINE_WORLD_SIZE"),
                 f"{stateful_set}-0.{service or stateful_set}", None, 0)
