"""Runs one Python snippet from the docs: ``python tests/docs_harness.py SNIPPET [FIXTURE,...]``
in the directory the snippet may write to. tests/test_docs.py starts it, once per snippet.

A snippet that calls ``sl.run(...)`` is a whole program and runs as one. Any other runs
as the body of an async function (top-level ``await`` / ``async with`` allowed, as in
``python -m asyncio``), with ``sl`` already imported as the pages assume, and with the
fixtures its ``<!-- docs-test: with ... -->`` marker names:

- ``node``: ``node``, an in-process ``sl.Node()``.
- ``pipe``: also ``pipe``, a two-stage pipeline of a small GPT in this process, a batch
  ``x, y`` and ``schedules``.
- ``counter``: a node listening on a free port with an actor named ``"counter"``; the
  snippet's ``tcp://127.0.0.1:5555`` is replaced by that node's address, and the
  snippet (blocking code, plain pyzmq) runs on a worker thread.
- ``myapp``: files ``myapp/actors.py`` (the README's ``Counter``) in the directory.
- ``tiny-llama``: a small random Llama checkpoint in ``checkpoints/tiny-llama``.
"""

from __future__ import annotations

import ast
import contextlib
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import shardline as sl

COUNTER = '''import shardline as sl


class Counter(sl.Actor):
    def __init__(self, start: int = 0) -> None:
        self.value = start

    async def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value
'''

PLACEHOLDER_ADDRESS = "tcp://127.0.0.1:5555"


def write_files(fixtures: list[str]) -> None:
    if "myapp" in fixtures:
        Path("myapp").mkdir()
        Path("myapp/__init__.py").write_text("")
        Path("myapp/actors.py").write_text(COUNTER)
    if "tiny-llama" in fixtures:
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained("checkpoints/tiny-llama")


async def run_body(source: str, filename: str, fixtures: list[str]) -> None:
    ns: dict[str, Any] = {"__name__": "__main__", "sl": sl}
    threaded = False
    async with contextlib.AsyncExitStack() as stack:
        if {"node", "pipe"} & set(fixtures):
            ns["node"] = await stack.enter_async_context(sl.Node())
        if "pipe" in fixtures:
            from shardline.models import Pipeline, gpt, schedules

            config = {"blocks": 2, "dim": 32, "heads": 4, "seq": 16, "vocab": 256}
            ns["pipe"] = await Pipeline.start(
                ns["node"], gpt.spec(config), stages=2, microbatches=2,
                loss_fn="shardline.models.gpt:loss",
                optimizer=("torch.optim.SGD", {"lr": 0.1}))
            stack.push_async_callback(ns["pipe"].stop)
            ns["x"], ns["y"] = next(gpt.batches(gpt.corpus(), 4, 16))
            ns["schedules"] = schedules
        if "counter" in fixtures:
            exec(COUNTER, ns)
            server = await stack.enter_async_context(sl.Node(listen="tcp://127.0.0.1:0"))
            await server.spawn(ns["Counter"], name="counter")
            assert PLACEHOLDER_ADDRESS in source
            source = source.replace(PLACEHOLDER_ADDRESS, server.address)
            threaded = True
        code = compile(source, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if threaded:
            await sl.to_thread(exec, code, ns)
        else:
            result = eval(code, ns)
            if result is not None:
                await result


def main() -> None:
    path = sys.argv[1]
    fixtures = [f for f in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if f]
    source = Path(path).read_text()
    write_files(fixtures)
    # As for a script beside the user's own modules (myapp/): workers started from
    # here get the same path.
    sys.path.insert(0, os.getcwd())
    if "sl.run(" in source:
        runpy.run_path(path, run_name="__main__")
    else:
        sl.run(run_body(source, path, fixtures))


if __name__ == "__main__":
    main()
