"""Hugging Face checkpoints as pipeline stages: tiny random GPT-2 / Llama / Qwen2 /
Mistral models saved with ``save_pretrained`` and compared with ``transformers``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import shardline as sl
from shardline.models import Pipeline, hf
from shardline.models.hf import _checkpoint

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the loop does not matter here; the models do

VOCAB = 96
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3,
          "num_attention_heads": 4, "max_position_embeddings": 64}
LLAMA_LIKE = {**COMMON, "intermediate_size": 64, "num_key_value_heads": 2}


def config(family: str, **overrides: Any) -> Any:
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                       n_positions=64, bos_token_id=1, eos_token_id=2,
                                       **overrides)
    if family == "llama":
        return transformers.LlamaConfig(**{**LLAMA_LIKE, **overrides})
    if family == "qwen2":  # small Qwen2s tie the head to the embeddings
        return transformers.Qwen2Config(**{**LLAMA_LIKE, "tie_word_embeddings": True,
                                           **overrides})
    if family == "mistral":  # a window shorter than the test sequences
        return transformers.MistralConfig(**{**LLAMA_LIKE, "sliding_window": 8,
                                             **overrides})
    raise AssertionError(family)


def save(family: str, directory: Path, seed: int = 0, **kw: Any) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(family))
    model.save_pretrained(str(directory), **kw)
    return directory


def reference(directory: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()


FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {f: save(f, root / f) for f in FAMILIES}
    out["sharded"] = save("llama", root / "sharded", max_shard_size="20KB")
    return out


def ids(batch: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def test_spec_layout_and_sharded_checkpoint(checkpoints: dict[str, Path]) -> None:
    s = hf.spec(checkpoints["sharded"])
    assert s.factory == "shardline.models.hf:layers"
    assert s.n_layers == 3 + 2
    assert s.config["eos_token_id"] == 2 and s.config["model_type"] == "llama"
    index = json.loads((checkpoints["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stages", [1, 2, 3])
async def test_logits_equal_transformers(checkpoints: dict[str, Path], family: str,
                                         stages: int) -> None:
    x = ids()
    with torch.no_grad():
        expected = reference(checkpoints[family])(x).logits
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(checkpoints[family]), stages=stages,
                                    microbatches=2)
        try:
            logits = await pipe(x)
        finally:
            await pipe.stop()
    assert logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


class Reads:
    """Records which files a stage opens and which tensors it takes from them, by
    wrapping the real ``safe_open``."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.files: list[str] = []
        self.tensors: list[str] = []

    def __call__(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self.files.append(Path(path).name)
        reads = self

        class Opened:
            def __enter__(self) -> Any:
                self.f = reads.real(path, *args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc: Any) -> None:
                self.f.__exit__(*exc)

            def keys(self) -> Any:
                return self.f.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                reads.tensors.append(name)
                return self.f.get_tensor(name)  # type: ignore[no-any-return]

        return Opened()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    spy = Reads(_checkpoint.safe_open)
    monkeypatch.setattr(_checkpoint, "safe_open", spy)
    yield spy


def test_each_stage_reads_only_its_tensors_from_only_its_files(
        checkpoints: dict[str, Path], reads: Reads) -> None:
    directory = checkpoints["sharded"]
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())[
        "weight_map"]
    s = hf.spec(directory)
    expected = [{"model.embed_tokens.weight"}]
    expected += [{k for k in weight_map if k.startswith(f"model.layers.{i}.")} for i in range(3)]
    expected += [{"model.norm.weight", "lm_head.weight"}]
    for (a, b) in [(0, 1), (1, 3), (3, 4), (4, 5)]:
        reads.files.clear()
        reads.tensors.clear()
        shard = s.build(a, b)
        assert len(shard) == b - a
        wanted = set().union(*expected[a:b])
        assert sorted(reads.tensors) == sorted(wanted)  # each read once, nothing else
        assert set(reads.files) == {weight_map[k] for k in wanted}


def test_a_tied_head_reads_the_embeddings(checkpoints: dict[str, Path], reads: Reads) -> None:
    for family, embed, norm in [("qwen2", "model.embed_tokens.weight", {"model.norm.weight"}),
                                ("gpt2", "transformer.wte.weight",
                                 {"transformer.ln_f.weight", "transformer.ln_f.bias"})]:
        s = hf.spec(checkpoints[family])
        reads.tensors.clear()
        head = s.build(s.n_layers - 1, s.n_layers)[0]
        assert sorted(reads.tensors) == sorted({embed} | norm)
        whole = s.build(0, s.n_layers)  # both ends in one stage share one tensor
        assert whole[-1].out.weight is whole[0].tokens.weight
        torch.testing.assert_close(head.out.weight, whole[0].tokens.weight)



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_head_keeps_its_weight_column_major(checkpoints: dict[str, Path],
                                                family: str) -> None:
    """Same values in a layout MKL multiplies faster: the logits are the checkpoint's,
    and so is what the stage saves."""
    s = hf.spec(checkpoints[family])
    head = s.build(s.n_layers - 1, s.n_layers)[0]
    model = reference(checkpoints[family])
    weight = model.get_output_embeddings().weight
    assert head.out.weight.t().is_contiguous() and not head.out.weight.is_contiguous()
    assert torch.equal(head.out.weight, weight)
    assert torch.equal(head.state_dict()["out.weight"], weight)
    h = torch.randn(8, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(head(h), model.lm_head(head.norm(h)), atol=1e-6, rtol=0)

def eos_checkpoint(root: Path, family: str) -> tuple[Path, list[int], int]:
    """A checkpoint whose EOS is a token greedy generation reaches after a few steps:
    returns it, a prompt, and how many tokens ``transformers`` then generates."""
    directory = save(family, root / "free")
    model = reference(directory)
    model.generation_config.eos_token_id = None
    for seed in range(20):  # a random model may loop on one token: find a prompt it does not
        prompt = ids(1, 6, seed=seed)
        free = model.generate(prompt, do_sample=False, max_new_tokens=12)[0, 6:].tolist()
        # the first token that only appears from step 3 on: generation must stop there
        firsts = [i for i, t in enumerate(free) if i >= 3 and t not in free[:i]]
        if firsts:
            stop_at = firsts[0]
            break
    else:
        raise AssertionError("no prompt found whose continuation brings a new token late")
    model.config.eos_token_id = model.generation_config.eos_token_id = free[stop_at]
    model.save_pretrained(str(root / "eos"))
    return root / "eos", prompt[0].tolist(), stop_at + 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", FAMILIES)
async def test_greedy_generation_equals_transformers_and_stops_at_eos(
        tmp_path: Path, family: str) -> None:
    directory, prompt, length = eos_checkpoint(tmp_path, family)
    model = reference(directory)
    expected = model.generate(torch.tensor([prompt]), do_sample=False,
                              max_new_tokens=12)[0, len(prompt):].tolist()
    assert len(expected) == length  # transformers stopped at EOS, and yielded it
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(directory), stages=2)
        try:
            ours = [t async for t in pipe.generate(prompt, 12)]
            assert ours == expected
            # without a stop token it runs on, the EOS token included, to max_new_tokens
            longer = [t async for t in pipe.generate(prompt, 12, eos_token_id=[])]
            assert len(longer) == 12 and longer[:length] == expected
            await anyio.sleep(0.2)  # releases are one-way messages
            assert [await d.cached_requests() for d in pipe.devices] == [0, 0]
        finally:
            await pipe.stop()


@pytest.mark.timeout(240)
async def test_stages_in_worker_processes(checkpoints: dict[str, Path],
                                          tmp_path: Path) -> None:
    directory, prompt, length = eos_checkpoint(tmp_path, "llama")
    model = reference(directory)
    expected_tokens = model.generate(torch.tensor([prompt]), do_sample=False,
                                     max_new_tokens=12)[0, len(prompt):].tolist()
    x = ids(3, 10)
    with torch.no_grad():
        expected = reference(checkpoints["sharded"])(x).logits
        tied_expected = reference(checkpoints["qwen2"])(x).logits
    async with sl.LocalCluster(2) as cluster:
        a, b = cluster.nodes
        pipe = await Pipeline.start(cluster.node, hf.spec(checkpoints["sharded"]),
                                    placement=[a, b, a], microbatches=3)
        try:
            torch.testing.assert_close(await pipe(x), expected, atol=1e-4, rtol=1e-4)
        finally:
            await pipe.stop()
        pipe = await Pipeline.start(cluster.node, hf.spec(checkpoints["qwen2"]),
                                    placement=[a, b])
        try:
            torch.testing.assert_close(await pipe(x), tied_expected, atol=1e-4, rtol=1e-4)
        finally:
            await pipe.stop()
        pipe = await Pipeline.start(cluster.node, hf.spec(directory), placement=[b, a])
        try:
            assert [t async for t in pipe.generate(prompt, 12)] == expected_tokens
            assert len(expected_tokens) == length
        finally:
            await pipe.stop()


async def test_bfloat16_weights(checkpoints: dict[str, Path]) -> None:
    x = ids()
    with torch.no_grad():
        expected = reference(checkpoints["llama"]).to(torch.bfloat16)(x).logits
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(checkpoints["llama"], dtype="bfloat16"),
                                    stages=2)
        try:
            logits = await pipe(x)
        finally:
            await pipe.stop()
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)


def test_bad_checkpoints_are_refused_clearly(tmp_path: Path,
                                             checkpoints: dict[str, Path]) -> None:
    with pytest.raises(hf.CheckpointError, match=r"config\.json"):
        hf.spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                      "num_hidden_layers": 2}))
    (tmp_path / "model.safetensors").write_bytes(
        (checkpoints["llama"] / "model.safetensors").read_bytes())
    with pytest.raises(hf.CheckpointError, match="'bert' is not supported"):
        hf.spec(tmp_path)
    (tmp_path / "config.json").write_text((checkpoints["gpt2"] / "config.json").read_text())
    with pytest.raises(hf.CheckpointError, match=r"no tensor .transformer\.wte\.weight"):
        hf.spec(tmp_path).build(0, 1)  # llama tensors under a GPT-2 config
    with pytest.raises(ValueError, match="dtype"):
        hf.spec(checkpoints["llama"], dtype="int8")
    with pytest.raises(ValueError, match="outside"):
        hf.layers({"path": str(checkpoints["llama"])}, 2, 9)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(hf.CheckpointError, match="neither"):
        hf.spec(tmp_path)
