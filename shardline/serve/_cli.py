"""``shardline serve``'s flags (no heavy imports: the CLI builds them on every run).

Every value is checked here, as argparse reads it (``shardline._argtypes``), so a bad one
is a one-line error and exit code 2 before anything starts; values that are bad only
together, or for the model, are checked by ``_main.serve_command`` before it starts
anything."""

from __future__ import annotations

import argparse

from .._argtypes import LOG_LEVELS, at_least, log_level, non_negative_float, port, positive_float
from . import _limits

__all__ = ["add_arguments", "one_line"]

MODEL_HELP = ("what to serve: minilm (sentence embeddings, all-MiniLM-L6-v2); gpt:DIR "
              "(completions from the reference byte-level GPT saved in DIR by "
              "Pipeline.save, e.g. examples/train_gpt.py); plain gpt (the same GPT "
              "untrained: it answers noise, for trying the API); hf:DIR (completions and "
              "chat from a Hugging Face decoder-only checkpoint directory with "
              "tokenizer.json) (default: %(default)s)")


def one_line(message: str) -> str:
    """What a bad combination of values is told as (with exit code 2), in the form of
    argparse's own errors (``_argtypes.Parser``)."""
    return f"shardline serve: {message} (see 'shardline serve --help')\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, on the ``serve`` subparser (an ``_argtypes.Parser``: a bad value is one
    line naming the flag)."""
    at_least_1 = at_least(1)
    parser.add_argument("--model", default="minilm", help=MODEL_HELP)
    parser.add_argument("--name", default=None,
                        help="the model's id in the API, what requests give as 'model' "
                        "(default: minilm, gpt, or the checkpoint directory's name)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="serve the weights quantized: int8 (weight-only, one scale "
                        "per output channel; about a quarter of the bytes) "
                        "(default: as stored)")
    parser.add_argument("--stages", type=at_least_1, default=2,
                        help="pipeline stages the model is split into (default: %(default)s)")
    parser.add_argument("--replicas", type=at_least_1, default=1,
                        help="copies of every stage, each on its own worker: a request "
                        "on a copy that is lost runs again, once that copy is rebuilt, "
                        "on whichever copy is next in turn (default: %(default)s)")
    parser.add_argument("--workers", type=at_least(0), default=None,
                        help="worker processes holding the stages, restarted when one "
                        "dies; 0: the stages run in the server process (default: one per "
                        "stage and replica; fewer: they share workers)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port, default=8000,
                        help="port to listen on; 0: any free port, which the first line "
                        "on stdout names (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/ endpoints and "
                        "/trace (default: none required)")
    parser.add_argument("--max-batch", type=at_least_1, default=32,
                        help="embeddings: texts per pipeline batch (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                        help="embeddings: how long a batch waits for more texts before it "
                        "runs (default: %(default)s)")
    parser.add_argument("--max-queue", type=at_least_1, default=1024,
                        help="requests waiting (embeddings) or running (completions) "
                        "before new ones get 429 (default: %(default)s)")
    parser.add_argument("--microbatches", type=at_least_1, default=None,
                        help="microbatches per pipeline call (default: the stage count)")
    parser.add_argument("--max-body-bytes", type=at_least_1, default=_limits.MAX_BODY_BYTES,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--header-timeout", type=positive_float,
                        default=_limits.HEADER_TIMEOUT,
                        help="seconds to send a request's head, from the connection's "
                        "opening or the request's first byte; then the connection is "
                        "closed (default: %(default)s)")
    parser.add_argument("--body-timeout", type=positive_float,
                        default=_limits.BODY_TIMEOUT,
                        help="seconds for a request's body to arrive in full; then 408 "
                        "(default: %(default)s)")
    parser.add_argument("--log-level", type=log_level, default="warning",
                        help=f"{' | '.join(LOG_LEVELS).lower()}: what goes to stderr; recoveries "
                        "are warnings (default: %(default)s)")
