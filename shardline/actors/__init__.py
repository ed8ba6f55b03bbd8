"""The actor runtime: actors, refs, nodes, lifecycle and supervision."""

from ._actor import Actor as Actor
from ._lifecycle import StopInfo as StopInfo
from ._lifecycle import StopReason as StopReason
from ._node import Node as Node
from ._ref import ActorRef as ActorRef

__all__ = ["Actor", "ActorRef", "Node", "StopInfo", "StopReason"]
