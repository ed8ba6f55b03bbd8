"""Generation benchmark (continuous batching), baselines in the same run.

    python -m bench.generate [--streams 16] [--tokens 64] [--rounds 3] [--threads N]

A tiny-but-not-trivial Llama (hidden 256, 4 layers, 8 heads over 4 key-value heads,
vocabulary 32000, random weights from ``transformers``, saved to a temporary directory)
over 2 stages in 2 worker processes:

(a) ``--streams`` concurrent greedy streams of ``--tokens`` tokens each against one
    stream alone: total tokens per second (target: at least 4x).
(b) The same streams against ``transformers``' ``model.generate`` with the same prompts
    batched (left-padded) in one process on the same model (target: at least 0.8x).
    It runs with the threads of one stage process and with those of both; the faster
    is the baseline.
(c) Time to first token, p50 and p99 over every stream of every round, with all
    ``--streams`` starting at once.

The systems take turns (``--rounds``), so a noisy neighbour hits both alike; figures
are medians over the rounds. Every stream generates exactly ``--tokens`` tokens (no
EOS), and the concurrent streams must produce the tokens each produces alone.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch

import shardline as sl
from bench._common import emit
from shardline.models import Pipeline, hf

MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "intermediate_size": 688, "vocab_size": 32000,
         "max_position_embeddings": 512}


def save_model(directory: Path) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**MODEL))
    model.save_pretrained(str(directory))


def prompts(n: int) -> list[list[int]]:
    """``n`` prompts of 8 to 40 tokens."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, MODEL["vocab_size"], (8 + (i * 13) % 33,),
                          generator=gen).tolist() for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def stream(pipe: Pipeline, prompt: list[int], tokens: int,
                 first: list[float]) -> list[int]:
    t0 = time.perf_counter()
    out: list[int] = []
    async for token in pipe.generate(prompt, tokens, eos_token_id=[]):
        if not out:
            first.append(time.perf_counter() - t0)
        out.append(token)
    return out


async def concurrent(pipe: Pipeline, batch: list[list[int]], tokens: int,
                     first: list[float]) -> tuple[float, list[list[int]]]:
    """All streams at once: seconds from the first call to the last token."""
    out: list[list[int]] = [[] for _ in batch]

    async def one(i: int) -> None:
        out[i] = await stream(pipe, batch[i], tokens, first)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(batch)):
            tg.start_soon(one, i)
    return time.perf_counter() - t0, out


def transformers_generate(directory: Path, batch: list[list[int]], tokens: int,
                          threads: int) -> tuple[float, list[list[int]]]:
    """``model.generate`` on the prompts left-padded into one batch: seconds, tokens."""
    import transformers

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        model.generation_config.eos_token_id = None
        longest = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.int64)
        mask = torch.zeros(len(batch), longest, dtype=torch.int64)
        for i, p in enumerate(batch):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        kwargs: dict[str, Any] = {"attention_mask": mask, "do_sample": False,
                                  "max_new_tokens": tokens, "min_new_tokens": tokens,
                                  "pad_token_id": 0}
        with torch.inference_mode():
            model.generate(ids[:2], **{**kwargs, "attention_mask": mask[:2],
                                       "max_new_tokens": 4, "min_new_tokens": 4})
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            seconds = time.perf_counter() - t0
        return seconds, out[:, longest:].tolist()
    finally:
        torch.set_num_threads(before)


async def run(opts: argparse.Namespace, directory: Path) -> None:
    batch = prompts(opts.streams)
    total = opts.streams * opts.tokens
    env = {"OMP_NUM_THREADS": str(opts.threads)}
    ours_s: list[float] = []
    single_s: list[float] = []
    theirs: dict[int, list[float]] = {opts.threads: [], 2 * opts.threads: []}
    first_token: list[float] = []
    single_first: list[float] = []
    matches: list[float] = []
    async with sl.LocalCluster(2, env=env) as cluster:
        pipe = await Pipeline.start(cluster.node, hf.spec(directory),
                                    placement=cluster.nodes)
        try:
            alone = [await stream(pipe, p, opts.tokens, []) for p in batch]  # and warm up
            steps = rows = 0
            for _ in range(opts.rounds):
                t0 = time.perf_counter()
                for p in batch[:opts.single]:
                    await stream(pipe, p, opts.tokens, single_first)
                single_s.append((time.perf_counter() - t0) / opts.single)
                before = (await pipe.stats())["decode"]
                seconds, got = await concurrent(pipe, batch, opts.tokens, first_token)
                after = (await pipe.stats())["decode"]
                steps += after["calls"] - before["calls"]
                rows += after["rows"] - before["rows"]
                ours_s.append(seconds)
                if got != alone:
                    raise AssertionError("concurrent streams differ from the same alone")
                for threads in theirs:
                    seconds, tokens = await sl.to_thread(
                        transformers_generate, directory, batch, opts.tokens, threads)
                    theirs[threads].append(seconds)
                    matches.append(sum(a == b for a, b in zip(tokens, alone, strict=True))
                                   / len(batch))
        finally:
            await pipe.stop()
    ours = total / statistics.median(ours_s)
    single = opts.tokens / statistics.median(single_s)
    emit(bench="generate", metric="concurrent_vs_one_stream_tokens_per_s",
         streams=opts.streams, tokens=opts.tokens, model=MODEL, stages=2,
         threads_per_stage=opts.threads, one_stream=round(single, 1),
         concurrent=round(ours, 1), ratio=round(ours / single, 2), target=4.0,
         decode_rows_per_step=round(rows / max(1, steps), 2),
         rounds=opts.rounds)
    base_threads, base_s = min(((t, statistics.median(v)) for t, v in theirs.items()),
                               key=lambda tv: tv[1])
    emit(bench="generate", metric="concurrent_vs_transformers_generate_tokens_per_s",
         streams=opts.streams, tokens=opts.tokens,
         transformers={str(t): round(total / statistics.median(v), 1)
                       for t, v in theirs.items()},
         transformers_threads=base_threads, baseline=round(total / base_s, 1),
         shardline=round(ours, 1), ratio=round(ours / (total / base_s), 2), target=0.8,
         same_tokens_as_transformers=round(statistics.mean(matches), 3))
    emit(bench="generate", metric="time_to_first_token_ms", streams=opts.streams,
         p50=round(percentile(first_token, 50) * 1e3, 1),
         p99=round(percentile(first_token, 99) * 1e3, 1),
         one_stream_p50=round(percentile(single_first, 50) * 1e3, 1),
         samples=len(first_token))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=2,
                        help="streams run one after the other per round for the "
                        "one-stream figure")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="intra-op threads per stage process (default: the cores "
                        "split between the two, as LocalCluster does)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "llama"
        save_model(directory)
        sl.run(run(opts, directory))


if __name__ == "__main__":
    main()
