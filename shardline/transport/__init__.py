"""The wire: msgpack + raw buffer frames over ZeroMQ, peers, heartbeats, CURVE.

Knows nothing of actors or torch; the layers above register extension types into
the codec and hand the endpoint a request handler.
"""

from ._address import is_loopback as is_loopback
from ._address import parse_tcp as parse_tcp
from ._address import split_key as split_key
from ._codec import EXT_NDARRAY as EXT_NDARRAY
from ._codec import EXT_REF as EXT_REF
from ._codec import EXT_TENSOR as EXT_TENSOR
from ._codec import Codec as Codec
from ._codec import register_ext as register_ext
from ._curve import KeyPair as KeyPair
from ._curve import load_allow_keys as load_allow_keys
from ._endpoint import Endpoint as Endpoint
from ._endpoint import Reply as Reply
from ._endpoint import new_node_id as new_node_id
from ._peer import Peer as Peer
from ._wire import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._wire import Limits as Limits

__all__ = [
    "EXT_NDARRAY",
    "EXT_REF",
    "EXT_TENSOR",
    "PROTOCOL_VERSION",
    "Codec",
    "Endpoint",
    "KeyPair",
    "Limits",
    "Peer",
    "Reply",
    "is_loopback",
    "load_allow_keys",
    "new_node_id",
    "parse_tcp",
    "register_ext",
    "split_key",
]
