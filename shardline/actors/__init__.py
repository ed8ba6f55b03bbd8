"""The actor runtime: actors, refs, nodes, lifecycle, supervision and clusters."""

from ._actor import Actor as Actor
from ._cluster import LocalCluster as LocalCluster
from ._formation import Cluster as Cluster
from ._lifecycle import StopInfo as StopInfo
from ._lifecycle import StopReason as StopReason
from ._node import Node as Node
from ._ref import ActorRef as ActorRef
from ._remote import RemoteNode as RemoteNode

__all__ = ["Actor", "ActorRef", "Cluster", "LocalCluster", "Node", "RemoteNode", "StopInfo",
           "StopReason"]
