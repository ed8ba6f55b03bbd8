"""Semantic search against `shardline serve`: all-MiniLM-L6-v2 split over two worker
processes, queried with the official openai client.

Run: python examples/serve_embeddings.py   (starts the server, asks, stops it)
"""

from __future__ import annotations

import signal
import subprocess
import sys

import torch
from openai import OpenAI

DOCUMENTS = [
    "Pipeline parallelism splits a model into stages that run on different devices.",
    "The cat slept on the warm windowsill all afternoon.",
    "ZeroMQ moves messages between processes without a broker.",
    "Gradient accumulation sums gradients over several microbatches before a step.",
    "Our bakery opens at seven and sells rye bread until noon.",
]
QUERIES = ["how do I run one model on several GPUs?", "where can I buy bread?"]


def main() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "serve", "--model", "minilm", "--stages",
         "2", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[2]  # "shardline serve http://... ..."
        print("server at", url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        docs = client.embeddings.create(model="minilm", input=DOCUMENTS)
        doc_vectors = torch.tensor([d.embedding for d in docs.data])
        for query in QUERIES:
            q = client.embeddings.create(model="minilm", input=query).data[0].embedding
            scores = doc_vectors @ torch.tensor(q)  # unit vectors: cosine similarity
            best = int(scores.argmax())
            print(f"{query!r}\n  -> {DOCUMENTS[best]!r} (cosine {scores[best]:.3f})")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        if server.stdout is not None:
            server.stdout.close()


if __name__ == "__main__":
    main()
