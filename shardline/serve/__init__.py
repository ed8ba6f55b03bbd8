"""Serving: models behind a pipeline and a batcher, over an OpenAI-compatible HTTP API.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client): ``pip install
'shardline[serve]'``. Names load on first use, so ``shardline --help`` stays fast.
"""

from __future__ import annotations

import importlib

__all__ = ["CompletionService", "EmbeddingService", "InputError", "Recovery",
           "ServeMetrics", "Unavailable", "create_app"]

_WHERE = {"CompletionService": "._service", "EmbeddingService": "._service",
          "InputError": "._service", "Recovery": "._healing", "ServeMetrics": "._metrics",
          "Unavailable": "._service", "create_app": "._app"}


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)
