"""The actor runtime: actors, refs, nodes, lifecycle, supervision and clusters."""

from ._actor import Actor as Actor
from ._cluster import LocalCluster as LocalCluster
from ._formation import Cluster as Cluster
from ._lifecycle import StopInfo as StopInfo
from ._lifecycle import StopReason as StopReason
from ._mesh import ActorMesh as ActorMesh
from ._mesh import MeshError as MeshError
from ._node import Node as Node
from ._ref import ActorRef as ActorRef
from ._remote import RemoteNode as RemoteNode

__all__ = ["Actor", "ActorMesh", "ActorRef", "Cluster", "LocalCluster", "MeshError", "Node",
           "RemoteNode", "StopInfo", "StopReason"]
