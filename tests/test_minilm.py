"""all-MiniLM-L6-v2 through the pipeline against sentence-transformers itself."""

from __future__ import annotations

import functools

import pytest
import torch

import shardline as sl
from shardline.models import Pipeline, minilm

pytestmark = pytest.mark.anyio

TEXTS = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog, twice, with élan!",
    "Pipeline parallelism splits a model into stages on different devices.",
    "",
    "short",
    "ZeroMQ sockets carry msgpack headers and raw tensor frames. " * 40,  # truncated
    "naïve café façade — ünïcödé",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@functools.lru_cache(maxsize=1)
def reference() -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    out = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    assert isinstance(out, torch.Tensor)
    return out


def check(ours: torch.Tensor) -> None:
    ref = reference()
    assert ours.shape == ref.shape == (len(TEXTS), 384)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    assert cosine.min().item() >= 0.9999, cosine


def test_unsharded_matches_sentence_transformers() -> None:
    with torch.inference_mode():
        check(minilm.model()(minilm.tokenize(TEXTS)))


@pytest.mark.parametrize("stages", [1, 2, 3])
async def test_pipeline_in_process_matches(stages: int) -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, minilm.spec(), stages=stages, microbatches=2)
        try:
            check(await pipe(minilm.tokenize(TEXTS)))
        finally:
            await pipe.stop()


async def test_pipeline_across_processes_matches() -> None:
    async with sl.LocalCluster(3) as cluster:
        for stages in (1, 2, 3):
            pipe = await Pipeline.start(cluster.node, minilm.spec(),
                                        placement=cluster.nodes[:stages], microbatches=2)
            try:
                check(await pipe(minilm.tokenize(TEXTS)))
            finally:
                await pipe.stop()


def test_layers_load_only_their_own_weights() -> None:
    first, last = minilm.layers({"path": None}, 0, 1), minilm.layers({"path": None}, 7, 8)
    assert sum(p.numel() for p in first.parameters()) == 30522 * 384 + 512 * 384 + 2 * 384 + 768
    assert list(last.parameters()) == []
    with pytest.raises(ValueError):
        minilm.layers({"path": None}, 3, 9)


def test_tokenizer_pads_masks_and_truncates() -> None:
    ids, mask = minilm.tokenize(["one", "one two three", "word " * 1000])
    assert ids.shape == mask.shape == (3, minilm.MAX_TOKENS)
    assert mask[0].sum() == 3 and mask[1].sum() == 5  # [CLS] ... [SEP]
    assert (ids[mask == 0] == 0).all()
    assert minilm.Tokenizer().count("word " * 1000) == 1002
