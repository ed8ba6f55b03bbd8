"""Weight-only int8 and structured pruning: numerics, bytes, quality figures, and
compressed specs built by stages in worker processes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import LayerSpec, Pipeline, compress, gpt, hf, minilm, prune, quantize
from shardline.models.compress import Cosine, Int8Embedding, Int8Linear, Perplexity

pytestmark = pytest.mark.anyio

CFG = {"blocks": 2, "dim": 32, "heads": 4, "seq": 32, "vocab": 256, "seed": 5}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tokens(batch: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["int8mm", "dequant"])
def test_int8_linear_is_close_to_float_at_under_a_third_of_the_bytes(kernel: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    q, report = quantize(layer, kernel=kernel, quality=Cosine(x))
    assert isinstance(q, Int8Linear) and q.qweight.dtype == torch.int8
    assert q.scale.shape == (48,)  # one scale per output channel
    assert isinstance(layer, nn.Linear)  # the original is left alone
    # each weight within half a quantization step of its row
    assert ((q.weight - layer.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    with torch.no_grad():
        exact = nn.functional.linear(x, q.weight, layer.bias)
        got = q(x)
    assert got.shape == (3, 5, 48)
    tol = 1e-5 if kernel == "dequant" else 5e-2  # int8mm also rounds the activations
    torch.testing.assert_close(got, exact, atol=tol, rtol=tol)
    assert report.bytes_before == (64 * 48 + 48) * 4
    assert report.bytes_after == 64 * 48 + 48 * 4 + 48 * 4
    assert report.ratio < 0.3 and report.metric == "cosine"
    assert report.before == 1.0 and report.quality is not None and report.quality > 0.999


def test_int8_embedding_and_tied_weights_stay_shared() -> None:
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, head)
    q, report = quantize(net)
    assert isinstance(q[0], Int8Embedding) and isinstance(q[1], Int8Linear)
    assert q[0].qweight is q[1].qweight  # quantized once, held once
    assert report.bytes_before == 50 * 16 * 4
    assert report.bytes_after == 50 * 16 + 50 * 4
    ids = torch.tensor([[3, 7, 49]])
    with torch.no_grad():
        torch.testing.assert_close(q[0](ids), q[0].weight[ids])
        assert (q[0](ids) - emb(ids)).abs().max() <= q[0].scale.max() / 2 + 1e-7


def test_int8_minilm_keeps_its_embeddings_at_under_a_third_of_the_bytes() -> None:
    texts = ["Actors hold model shards.", "The pipeline streams tokens.",
             "Quantized weights take a quarter of the bytes.", "hello world"]
    model = minilm.model()
    q, report = quantize(model, "int8", quality=Cosine(minilm.tokenize(texts)))
    assert report.ratio <= 0.3
    assert report.quality is not None and report.quality >= 0.99
    with torch.no_grad():
        sims = compress.cosines(model(minilm.tokenize(texts)), q(minilm.tokenize(texts)))
    assert sims.min() >= 0.99


def test_perplexity_and_cosine_measures() -> None:
    class Uniform(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*x.shape, 40)

    ppl = Perplexity(torch.arange(100) % 40, seq=10)
    assert ppl.of(Uniform()) == pytest.approx(40.0)  # uniform over 40 tokens
    with pytest.raises(ValueError, match="over 10 tokens"):
        Perplexity(torch.arange(8), seq=10).of(Uniform())
    net = gpt.model(CFG)
    assert Cosine(tokens())(net, net) == (1.0, pytest.approx(1.0))


def test_pruning_a_head_that_contributes_nothing_changes_nothing() -> None:
    net = gpt.model(CFG)
    with torch.no_grad():
        for block in net[1:-1]:
            block.proj.weight[:, 16:24] = 0  # head 2 of 4 (8 wide) writes nothing
    x = tokens()
    pruned, report = prune(net, amount=0.25, structured="heads")
    for block in pruned[1:-1]:
        assert block.heads == 3
        assert block.qkv.weight.shape == (3 * 24, 32) and block.proj.weight.shape == (32, 24)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    assert report.bytes_after < report.bytes_before
    assert report.bytes_before - report.bytes_after == 2 * 4 * (3 * 8 * 32 + 3 * 8 + 8 * 32)


def test_pruning_dead_ffn_units_changes_nothing() -> None:
    net = gpt.model(CFG)
    with torch.no_grad():
        for block in net[1:-1]:
            block.mlp[2].weight[:, :64] = 0  # half the 128 hidden units write nothing
    x = tokens()
    pruned, report = prune(net, amount=0.5, structured="ffn")
    for block in pruned[1:-1]:
        assert block.mlp[0].weight.shape == (64, 32) and block.mlp[2].weight.shape == (32, 64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    assert report.ratio < 1


def test_pruned_gpt_generates_with_its_caches_and_reports_perplexity() -> None:
    net = gpt.model(CFG)
    text = gpt.corpus()[:2000]
    pruned, report = prune(net, amount=0.5, structured="heads", quality=Perplexity(text, 32))
    assert report.metric == "perplexity" and report.before is not None
    assert report.after is not None and report.after > 1
    prompt = tokens(1, 6)
    plain = gpt.generate(pruned, prompt, 8, CFG["seq"], temperature=0)
    states: list[dict[str, torch.Tensor]] = [{} for _ in pruned]
    x, cached = prompt, []
    with torch.no_grad():
        for _ in range(8):
            for layer, state in zip(pruned, states, strict=True):
                x = layer.forward_cached(x, state)
            x = x[:, -1:].argmax(-1)
            cached.append(int(x))
    assert cached == plain[0, 6:].tolist()


@pytest.mark.timeout(120)
async def test_compressed_specs_build_compressed_stages_in_workers(tmp_path: Path) -> None:
    spec = gpt.spec(CFG)
    pruned_spec, pruned_report = prune(spec, amount=0.5, structured="ffn")
    both, both_report = quantize(pruned_spec)
    assert both.factory == compress.FACTORY and len(both.config["steps"]) == 2
    assert both_report.bytes_before == pruned_report.bytes_after  # measured from its input
    local = quantize(prune(gpt.model(CFG), amount=0.5, structured="ffn").model).model
    x = tokens(4)
    with torch.no_grad():
        expected = local(x)
    async with sl.LocalCluster(2) as cluster:
        pipe = await Pipeline.start(cluster.node, both, placement=cluster.nodes,
                                    microbatches=2)
        try:
            torch.testing.assert_close(await pipe(x), expected, atol=1e-5, rtol=1e-5)
            sd = await pipe.state_dict()
            assert sd["1.mlp.0.qweight"].dtype == torch.int8
            assert sd["1.mlp.0.qweight"].shape == (64, 32)
            await pipe.save(str(tmp_path / "small"))
        finally:
            await pipe.stop()
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, spec, stages=2)
        try:
            await pipe.save(str(tmp_path / "full"))
        finally:
            await pipe.stop()
    small = (tmp_path / "small" / "model.safetensors").stat().st_size
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert small < 0.3 * full


def test_a_compressed_spec_only_wraps_factories_every_node_allows() -> None:
    foreign = LayerSpec("tests.models_fixtures:layers", {}, 2)
    with pytest.raises(ValueError, match=r"shardline\.models"):
        quantize(foreign)
    # what a peer could send: the factory checks the wrapped path itself
    with pytest.raises(sl.Unauthorized):
        compress.layers({"spec": foreign.to_wire(), "steps": [["int8", "auto"]]}, 0, 1)


def test_bad_requests_are_refused() -> None:
    net = gpt.model(CFG)
    with pytest.raises(ValueError, match="scheme"):
        quantize(net, "int4")
    with pytest.raises(ValueError, match="kernel"):
        quantize(net, kernel="fast")
    with pytest.raises(ValueError, match="structured"):
        prune(net, structured="rows")
    with pytest.raises(ValueError, match="amount"):
        prune(net, amount=1.0)
    with pytest.raises(ValueError, match="no layers"):
        prune(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="prune before quantizing"):
        prune(quantize(net).model)
    before = copy.deepcopy(net.state_dict())
    quantize(net, inplace=False)
    prune(net, amount=0.5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_layers_prune_by_head_group_and_quantize(tmp_path: Path, family: str) -> None:
    pytest.importorskip("transformers")
    from tests.test_hf import save

    spec = hf.spec(save(family, tmp_path / family))
    net = spec.build(0, spec.n_layers)
    with torch.no_grad():
        for layer in net[1:-1]:
            att = layer.layer.self_attn if family == "llama" else layer.layer.attn
            out = att.o_proj.weight if family == "llama" else att.c_proj.weight
            if family == "llama":  # 2 key-value groups of 2 query heads, 8 wide
                out[:, 16:32] = 0   # the second group writes nothing
            else:                   # Conv1D: weight [in, out]; head 1 of 4
                out[8:16] = 0
    x = torch.randint(0, 96, (2, 10))
    pruned, report = prune(net, amount=0.5 if family == "llama" else 0.25)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    assert report.ratio < 1
    ffn, _ = prune(net, amount=0.5, structured="ffn", quality=Cosine(x))
    _, qreport = quantize(ffn, quality=Cosine(x))
    assert qreport.quality is not None and qreport.quality > 0.99
    assert qreport.ratio < 0.35  # hidden 32: norms and biases, kept in float, weigh more


async def test_a_quantized_hf_spec_keeps_its_eos_and_runs_as_a_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.test_hf import save

    spec = hf.spec(save("qwen2", tmp_path / "qwen2"))  # tied head: quantized once per stage
    q, report = quantize(spec)
    assert q.config["eos_token_id"] == spec.config["eos_token_id"]
    assert report.ratio < 0.35
    local = q.build(0, q.n_layers)
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = local(x)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, q, stages=3)
        try:
            torch.testing.assert_close(await pipe(x), expected, atol=1e-5, rtol=1e-5)
            tokens_ = [t async for t in pipe.generate(x[0].tolist(), 5, eos_token_id=[])]
        finally:
            await pipe.stop()
    assert len(tokens_) == 5
