"""Compression benchmark, baselines in the same run.

    python -m bench.compress [--train-seconds 60] [--texts 64] [--eval-tokens 32768]
                             [--threads N]

MiniLM: the float model vs int8 (both kernels) on a fixed set of texts from Python's
help topics: bytes of the weights, cosine of each embedding against the float one
(mean and min), and encoding time for the whole set. The demo GPT: trained here for
``--train-seconds`` on the first 90% of ``gpt.corpus()``, then pruned (heads and FFN
units, 3 amounts each) and quantized; perplexity on held-out text (the last 10%) and
bytes, against the unpruned float model.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from bench._common import emit
from shardline.models import compress, gpt, minilm, prune, quantize


def texts(n: int) -> list[str]:
    """Sentences of 6 to 40 words from Python's help topics, the first ``n``."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for body in topics.values():
        for sentence in " ".join(body.split()).split(". "):
            if 6 <= len(sentence.split()) <= 40:
                out.append(sentence)
                if len(out) == n:
                    return out
    return out


def seconds(fn: Any, *args: Any, repeats: int = 3) -> float:
    """Best of ``repeats`` (a busy machine adds noise, never removes it)."""
    best = float("inf")
    with torch.inference_mode():
        fn(*args)  # warm up
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t0)
    return best


def minilm_figures(n_texts: int) -> None:
    batch = minilm.tokenize(texts(n_texts))
    model = minilm.model()
    base = seconds(model, batch)
    emit(bench="compress", model="minilm", method="float", texts=n_texts,
         bytes=compress.state_bytes(model), encode_s=round(base, 4))
    with torch.inference_mode():
        reference = model(batch)
    for kernel in ("int8mm", "dequant"):
        q, report = quantize(model, "int8", kernel=kernel, quality=compress.Cosine(batch))
        with torch.inference_mode():
            sims = compress.cosines(reference, q(batch))
        t = seconds(q, batch)
        emit(bench="compress", model="minilm", method="int8", kernel=kernel,
             bytes_before=report.bytes_before, bytes_after=report.bytes_after,
             ratio=round(report.ratio, 4), cosine_mean=round(float(sims.mean()), 5),
             cosine_min=round(float(sims.min()), 5), encode_s=round(t, 4),
             speedup_vs_float=round(base / t, 2))


def train(config: dict[str, Any], data: torch.Tensor, budget_s: float) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    net = gpt.model(config)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    stream = gpt.batches(data, 16, config["seq"])
    steps, end = 0, time.monotonic() + budget_s
    while time.monotonic() < end:
        x, y = next(stream)
        loss = gpt.loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return net.eval(), steps


def gpt_figures(train_s: float, eval_tokens: int) -> None:
    config = {"vocab": 256, "dim": 128, "heads": 8, "blocks": 4, "seq": 64}
    data = gpt.corpus()
    split = int(0.9 * len(data))
    net, steps = train(config, data[:split], train_s)
    held_out = compress.Perplexity(data[split:split + eval_tokens], seq=config["seq"])
    base = held_out.of(net)
    emit(bench="compress", model="gpt", method="float", train_steps=steps,
         bytes=compress.state_bytes(net), perplexity=round(base, 4),
         held_out_tokens=held_out.tokens.numel())
    for structured in ("heads", "ffn"):
        for amount in (0.25, 0.5, 0.75):
            _, report = prune(net, amount=amount, structured=structured, quality=held_out)
            assert report.after is not None
            emit(bench="compress", model="gpt", method="prune", structured=structured,
                 amount=amount, bytes_before=report.bytes_before,
                 bytes_after=report.bytes_after, ratio=round(report.ratio, 4),
                 perplexity=round(report.after, 4),
                 perplexity_vs_float=round(report.after / base, 4))
    _, report = quantize(net, "int8", quality=held_out)
    assert report.after is not None
    emit(bench="compress", model="gpt", method="int8", bytes_before=report.bytes_before,
         bytes_after=report.bytes_after, ratio=round(report.ratio, 4),
         perplexity=round(report.after, 4), perplexity_vs_float=round(report.after / base, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    minilm_figures(opts.texts)
    gpt_figures(opts.train_seconds, opts.eval_tokens)


if __name__ == "__main__":
    main()
