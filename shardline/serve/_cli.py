"""``shardline serve``'s flags (no heavy imports: the CLI builds them on every run)."""

from __future__ import annotations

import argparse

from . import _limits

__all__ = ["MODELS", "add_arguments"]

MODELS = ("minilm", "gpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm",
                        help="minilm (sentence embeddings) or gpt[:CHECKPOINT_DIR] (text "
                        "completions; without a checkpoint: untrained weights)")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes for the stages (default: one per stage; "
                        "0: stages in this process)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="requests waiting for a batch before answering 429")
    parser.add_argument("--microbatches", type=int, default=None,
                        help="microbatches per pipeline call (default: the stage count)")
    parser.add_argument("--max-body-bytes", type=int, default=_limits.MAX_BODY_BYTES,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--header-timeout", type=float, default=_limits.HEADER_TIMEOUT,
                        help="seconds to send a request's head, from the connection's "
                        "opening or the request's first byte; then the connection is "
                        "closed (default: %(default)s)")
    parser.add_argument("--body-timeout", type=float, default=_limits.BODY_TIMEOUT,
                        help="seconds for a request's body to arrive in full; then 408 "
                        "(default: %(default)s)")
    parser.add_argument("--log-level", default="warning")
