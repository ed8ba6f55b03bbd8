"""The whole error hierarchy, in one place.

Each class is named for what happened and, where it helps, who is to blame; each
subclasses the standard library meaning where one exists, so ``except TimeoutError``
catches an ask that ran past its deadline.
"""

from __future__ import annotations

__all__ = [
    "ShardlineError",
    "ActorError",
    "ActorNotFound",
    "ActorNameTaken",
    "MethodNotFound",
    "ActorStopped",
    "AskTimeout",
    "NodeLost",
    "SerializationError",
    "ProtocolError",
    "Unauthorized",
    "JoinRefused",
    "ClusterTimeout",
]


class ShardlineError(Exception):
    """Base class of every error shardline raises on purpose."""


class ActorError(ShardlineError):
    """A method (or ``on_start``) of an actor raised.

    The original exception may live in another process, so it is carried as text:
    ``type_name`` (qualified name of the remote type), ``message`` and the formatted
    ``remote_traceback``. When the actor runs in this process the original exception
    is also chained as ``__cause__``.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "",
                 actor: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.actor = actor
        where = f" in actor {actor}" if actor else ""
        super().__init__(f"{type_name}{where}: {message}")


class ActorNotFound(ShardlineError, LookupError):
    """No actor with that name or id lives on the node that was asked."""


class ActorNameTaken(ShardlineError, ValueError):
    """``spawn(..., name=N)`` while another live actor on the node is called ``N``."""


class MethodNotFound(ShardlineError, AttributeError):
    """The actor has no public method of that name (private names are never callable)."""


class ActorStopped(ShardlineError):
    """The actor stopped before (or while) the message could be handled."""


class AskTimeout(ShardlineError, TimeoutError):
    """No reply arrived before the ask's deadline."""


class NodeLost(ShardlineError, ConnectionError):
    """The node hosting the actor stopped answering (or went away) mid-conversation."""


class SerializationError(ShardlineError, TypeError):
    """A value cannot be put on the wire (or read back from it); says which and why."""


class ProtocolError(ShardlineError):
    """A peer sent something malformed, oversized, or of another protocol version."""


class Unauthorized(ShardlineError, PermissionError):
    """A CURVE handshake or a spawn allow-list refused the request."""


class JoinRefused(ShardlineError):
    """A cluster's driver turned a worker away (it joined twice, claimed a rank that is
    taken, the cluster is full, or its request was malformed); the message says which.

    ``ended`` is true when the refusal only means the driver's script has already
    finished: a worker told so exits with status 0.
    """

    def __init__(self, message: str, *, ended: bool = False) -> None:
        super().__init__(message)
        self.ended = ended


class ClusterTimeout(ShardlineError, TimeoutError):
    """Workers did not all join (or a worker found no driver) before the deadline; the
    message says how many joined out of how many expected, and from where."""
