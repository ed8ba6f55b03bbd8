"""shardline: asyncio actors over ZeroMQ + msgpack for sharded models.

The import surface is deliberate and small; everything else lives in underscored
modules. ``import shardline`` never imports torch.
"""

from ._errors import ActorError as ActorError
from ._errors import ActorNameTaken as ActorNameTaken
from ._errors import ActorNotFound as ActorNotFound
from ._errors import ActorStopped as ActorStopped
from ._errors import AskTimeout as AskTimeout
from ._errors import ClusterTimeout as ClusterTimeout
from ._errors import JoinRefused as JoinRefused
from ._errors import MethodNotFound as MethodNotFound
from ._errors import NodeLost as NodeLost
from ._errors import ProtocolError as ProtocolError
from ._errors import SerializationError as SerializationError
from ._errors import ShardlineError as ShardlineError
from ._errors import Unauthorized as Unauthorized
from ._runtime import run as run
from ._runtime import to_thread as to_thread
from ._version import __version__ as __version__
from .actors import Actor as Actor
from .actors import ActorMesh as ActorMesh
from .actors import ActorRef as ActorRef
from .actors import Cluster as Cluster
from .actors import LocalCluster as LocalCluster
from .actors import MeshError as MeshError
from .actors import Node as Node
from .actors import RemoteNode as RemoteNode
from .actors import StopInfo as StopInfo
from .actors import StopReason as StopReason


def __getattr__(name: str) -> object:
    # ``sl.models`` and ``sl.tensors`` import torch; load them on first use so
    # ``import shardline`` does not.
    if name in ("models", "tensors"):
        import importlib

        return importlib.import_module(f"shardline.{name}")
    raise AttributeError(f"module 'shardline' has no attribute {name!r}")


__all__ = [
    "Actor",
    "ActorError",
    "ActorMesh",
    "ActorNameTaken",
    "ActorNotFound",
    "ActorRef",
    "ActorStopped",
    "AskTimeout",
    "Cluster",
    "ClusterTimeout",
    "JoinRefused",
    "LocalCluster",
    "MeshError",
    "MethodNotFound",
    "Node",
    "NodeLost",
    "ProtocolError",
    "RemoteNode",
    "SerializationError",
    "ShardlineError",
    "StopInfo",
    "StopReason",
    "Unauthorized",
    "__version__",
    "run",
    "to_thread",
]
