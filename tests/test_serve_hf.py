"""`shardline serve --model hf:DIR` (issue 16): a tiny random Llama saved with
`transformers`, with a byte-level BPE tokenizer trained here and a ChatML chat template,
served over two worker processes and driven by the official openai client. Greedy text
is what `transformers` generates (stopping at the model's EOS), the chat prompt is what
`apply_chat_template` renders, and errors are OpenAI's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import shardline as sl
from shardline.models import Pipeline, hf, quantize
from tests.serve_fixtures import Server, sse

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.timeout(300)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["The cat sits on the mat.", "Pipelines split models into stages.",
         "A worker that dies is started again.", "Tokens stream one at a time.",
         "Hello there, how are you today?", "The quick brown fox jumps over the lazy dog."]
PROMPT = "The cat sits"
CONTEXT = 64


def build_tokenizer(directory: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": CONTEXT}))
    return tok


def greedy(model: Any, ids: list[int], n: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return [int(t) for t in out[0, len(ids):]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The checkpoint, and where greedy generation from PROMPT meets its EOS: the EOS is
    chosen as the fifth new token of the model's own greedy continuation (first seen
    there), so a request stops there with finish_reason "stop"."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    directory.mkdir()
    tok = build_tokenizer(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prompt = tok.encode(PROMPT).ids
    free = greedy(model, prompt, 12, None)
    k = next(i for i in range(4, 12) if free[i] not in free[:i])
    model.config.eos_token_id = model.generation_config.eos_token_id = free[k]
    model.save_pretrained(str(directory))
    return {"dir": directory, "tok": tok, "model": model, "prompt": prompt,
            "stop_at": k, "before_eos": free[:k], "eos": free[k]}


@pytest.fixture(scope="module")
def server(checkpoint: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("serve") / "err.log", "--model",
               f"hf:{checkpoint['dir']}", "--stages", "2")
    try:
        yield s
    finally:
        s.close()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_completions_are_what_transformers_generates(checkpoint: dict[str, Any],
                                                     server: Server) -> None:
    c = client(server)
    assert [m.id for m in c.models.list()] == ["tiny-llama"]
    tok = checkpoint["tok"]
    done = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20,
                                temperature=0)
    # stops at the model's EOS, which is not part of the text
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].text == tok.decode(checkpoint["before_eos"])
    assert done.usage.prompt_tokens == len(checkpoint["prompt"])
    assert done.usage.completion_tokens == checkpoint["stop_at"] + 1
    short = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2,
                                 temperature=0)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].text == tok.decode(checkpoint["before_eos"][:2])
    # streamed: the same text, piece by piece
    pieces = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20,
                                  temperature=0, stream=True)
    chunks = list(pieces)
    assert "".join(ch.choices[0].text for ch in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_renders_the_template_as_transformers_does(checkpoint: dict[str, Any],
                                                        server: Server) -> None:
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(checkpoint["dir"]))
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": "Hello there, how are you?"}]
    ids = reference.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    expected = greedy(checkpoint["model"], list(ids), 10, checkpoint["eos"])
    ended = expected[-1] == checkpoint["eos"]
    text = checkpoint["tok"].decode(expected[:-1] if ended else expected)

    c = client(server)
    answer = c.chat.completions.create(model="tiny-llama", messages=messages,
                                       max_tokens=10, temperature=0)
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == ("stop" if ended else "length")
    stream = c.chat.completions.create(model="tiny-llama", messages=messages,
                                       max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        answer.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(ids)


def test_sampling_stop_and_seed(checkpoint: dict[str, Any], server: Server) -> None:
    c = client(server)
    tok = checkpoint["tok"]
    whole = tok.decode(checkpoint["before_eos"])
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    stopped = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20,
                                   temperature=0, stop=["never there", stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == whole[:whole.index(stop)]

    def sampled(seed: int) -> str:
        return c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                    temperature=1.5, top_p=0.9,
                                    seed=seed).choices[0].text
    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(6)}) > 1


def test_errors_are_openai_s(checkpoint: dict[str, Any], server: Server) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError) as long_prompt:
        c.completions.create(model="tiny-llama", prompt="The cat sits on the mat. " * 200)
    assert long_prompt.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as long_answer:
        c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5000)
    assert long_answer.value.code == "context_length_exceeded"
    assert "5000 for the completion" in long_answer.value.message
    with pytest.raises(openai.BadRequestError) as long_chat:
        c.chat.completions.create(model="tiny-llama", max_tokens=CONTEXT, messages=[
            {"role": "user", "content": "hi"}])
    assert long_chat.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as empty:
        c.completions.create(model="tiny-llama", prompt="")
    assert empty.value.code is None
    assert empty.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-llama", messages=[])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-llama", messages=[
            {"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    # without max_tokens a chat completion may take what room the context has left
    free = c.chat.completions.create(model="tiny-llama", temperature=0, messages=[
        {"role": "user", "content": "hi"}])
    assert free.choices[0].finish_reason in ("stop", "length")
    assert free.usage.total_tokens <= CONTEXT


def test_an_empty_stream_body_still_ends_with_done(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1, "stream": True})
    events = sse(r.text)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_quantized_int8_serves_what_the_int8_pipeline_generates(
        checkpoint: dict[str, Any], tmp_path: Path, anyio_backend: str) -> None:
    spec = quantize(hf.spec(checkpoint["dir"]), "int8").model
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, spec, stages=1)
        tokens = [t async for t in pipe.generate(checkpoint["prompt"], 8)]
        await pipe.stop()
    ended = tokens[-1] == checkpoint["eos"]
    expected = checkpoint["tok"].decode(tokens[:-1] if ended else tokens)
    s = Server(tmp_path / "err.log", "--model", f"hf:{checkpoint['dir']}", "--quantize",
               "int8", "--stages", "2", "--name", "tiny-int8")
    try:
        done = client(s).completions.create(model="tiny-int8", prompt=PROMPT,
                                            max_tokens=8, temperature=0)
        assert done.choices[0].text == expected
        assert done.choices[0].finish_reason == ("stop" if ended else "length")
        assert s.errors() == []
    finally:
        s.close()
