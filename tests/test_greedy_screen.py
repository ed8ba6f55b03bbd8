"""Greedy tokens of an fp32 LM head screened in bf16 (``_greedy.Screen``): the fp32
argmax every time, including near ties that bf16 cannot tell apart, and the head's
``pick`` in a pipeline of concurrent streams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import Pipeline, _greedy, hf
from shardline.models._greedy import Screen
from shardline.models._rows import pick_tokens
from tests.test_continuous_batching import batched, same_tokens_alone_and_together

transformers = pytest.importorskip("transformers")

HIDDEN, VOCAB = 64, 3000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the loop does not matter here; the arithmetic does


def head_weight(seed: int = 0) -> torch.Tensor:
    """``[hidden, vocab]``, as the head multiplies (column-major, as hf heads keep it)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.05).t()


def screened(min_rows: int = 4) -> Screen:
    screen = Screen(min_rows)
    screen.enabled = True  # what the trial decides is a matter of speed, not tested here
    return screen


def inputs(rows: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    plain = torch.randn(rows, HIDDEN, generator=gen)
    outlier = plain.clone()
    outlier[:, 3] *= 40  # trained models' hidden states have a few huge features
    return [plain, plain * 1e-3, plain * 1e3, outlier, -plain]


@pytest.mark.parametrize("rows", [4, 16, 33])
def test_screened_tokens_are_the_fp32_argmax(rows: int) -> None:
    weight_t = head_weight()
    screen = screened()
    for seed in range(5):
        for x in inputs(rows, seed):
            assert torch.equal(screen.tokens(x, weight_t),
                               torch.mm(x, weight_t).argmax(1)), (seed, rows)


def test_near_ties_below_bf16_resolution_are_told_apart() -> None:
    """Columns 1e-4 apart (bf16 rounds them to the same logit) and exact copies of
    the winning column: the fp32 winner, the first of equals."""
    weight_t = head_weight().contiguous()
    x = inputs(8, 1)[0]
    best = torch.mm(x, weight_t).argmax(1)
    near = weight_t.clone()
    for i, j in enumerate(best.tolist()):
        twin = (j + 1 + i) % VOCAB
        near[:, twin] = weight_t[:, j] * (1 + 1e-4 * (-1) ** i)  # above or below j
    copies = weight_t.clone()
    copies[:, 0] = weight_t[:, best[0]]  # an equal maximum before row 0's winner
    for w in (near, copies):
        assert torch.equal(screened().tokens(x, w), torch.mm(x, w).argmax(1))
    assert int(screened().tokens(x, copies)[0]) == 0


def test_what_it_cannot_screen_is_left_to_fp32() -> None:
    weight_t = head_weight()
    screen = screened(min_rows=4)
    x = inputs(8, 2)[0]
    assert screen.tokens(x[:3], weight_t) is None  # too few rows to gain
    assert screen.tokens(x.double(), weight_t.double()) is None
    bad = x.clone()
    bad[2, 5] = float("nan")
    assert screen.tokens(bad, weight_t) is None
    assert screen.tokens(x * 1e38, weight_t) is None  # |x||w| past fp32's largest
    huge = weight_t.contiguous()
    huge[0, 7] = 1e20  # its square overflows fp32: the bound must not turn NaN
    got = screen.tokens(torch.eye(8, HIDDEN), huge)
    assert got is None or torch.equal(got, torch.mm(torch.eye(8, HIDDEN), huge).argmax(1))
    # a caller outside no_grad, with the head's weight a parameter
    param = torch.nn.Parameter(weight_t.t().contiguous())
    assert torch.equal(screened().tokens(x.requires_grad_(), param.t()),
                       torch.mm(x, param.t()).argmax(1))


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def test_a_head_scaled_small_keeps_its_rounding_in_the_bound() -> None:
    """Weights about 1e-21, where an fp32 square of a bf16 rounding error underflows:
    column 1 wins in fp32 by 3%, yet its bf16 weights round down and column 0's up,
    so that bf16 puts column 0 ahead by more than any bound without that rounding."""
    gen = torch.Generator().manual_seed(1)
    x = bf16(torch.randn(512, generator=gen)).expand(4, 512).contiguous()
    c = bf16(torch.randn(512, generator=gen) * 1e-21)
    c = c if float(c @ x[0]) > 0 else -c
    side = torch.sign(x[0])

    def ulp(v: torch.Tensor) -> torch.Tensor:  # a bf16 step at v
        return torch.pow(2.0, torch.floor(torch.log2(v.abs())) - 7)

    winner = c + side * 0.24 * ulp(c)  # bf16: c
    lead = float((x[0] * side * 0.24 * ulp(c)).sum())
    base, order, i = c.clone(), torch.argsort(-(x[0].abs() * ulp(c))), 0
    while float(x[0] @ (base - c)) < lead:  # a bf16 base ahead of c by about `lead`
        j = order[i % 512]
        base[j] = bf16(base[j] + side[j] * ulp(base[j]))
        i += 1
    loser = base - side * 0.24 * ulp(base)  # bf16: base
    weight_t = torch.zeros(64, 512)
    weight_t[0], weight_t[1] = loser, winner
    weight_t = weight_t.t()
    assert torch.equal(torch.mm(x, weight_t).argmax(1), torch.ones(4, dtype=torch.int64))
    assert torch.equal(screened().tokens(x, weight_t), torch.ones(4, dtype=torch.int64))


def test_subnormal_inputs_the_bf16_kernel_reads_as_zero() -> None:
    """Column 1's logit comes from subnormal features (the bf16 kernel takes them for
    zero) times large weights, 255 times column 0's: the fp32 winner, or fp32's call."""
    x = torch.full((8, 512), float(bf16(torch.tensor(1e-38))))
    x[:, 0] = float(bf16(torch.tensor(2e-38)))
    weight_t = torch.zeros(512, 64)
    weight_t[0, 0] = weight_t[1:, 1] = 2.0 ** 56
    want = torch.mm(x, weight_t).argmax(1)
    assert torch.equal(want, torch.ones(8, dtype=torch.int64))
    got = screened().tokens(x, weight_t)
    assert got is None or torch.equal(got, want)


def test_a_weight_changed_in_place_is_screened_afresh() -> None:
    weight_t = head_weight().contiguous()
    screen = screened()
    x = inputs(8, 3)[0]
    assert torch.equal(screen.tokens(x, weight_t), torch.mm(x, weight_t).argmax(1))
    with torch.no_grad():
        weight_t.mul_(-1)  # as an optimizer step would: in place
    assert torch.equal(screen.tokens(x, weight_t), torch.mm(x, weight_t).argmax(1))


def test_another_parameter_on_the_same_memory_is_screened_afresh() -> None:
    """A parameter that replaced the head's may sit in the old one's memory at the
    same version: the screen tells them apart by the parameter itself."""
    first = nn.Parameter(head_weight(0).t().contiguous())
    screen = screened()
    x = inputs(8, 4)[0]
    assert torch.equal(screen.tokens(x, first.t(), first), torch.mm(x, first.t()).argmax(1))
    second = nn.Parameter(first.data)  # same memory, and no version bump below
    second.data.copy_(head_weight(1).t())
    assert torch.equal(screen.tokens(x, second.t(), second),
                       torch.mm(x, second.t()).argmax(1))


@pytest.mark.parametrize("keep", [True, False])
def test_the_trial_answers_exactly_then_decides(monkeypatch: pytest.MonkeyPatch,
                                                keep: bool) -> None:
    monkeypatch.setattr(_greedy, "_FASTER", 1e9 if keep else 0.0)
    weight_t = head_weight()
    screen = Screen()
    for seed in range(_greedy._TRIALS):
        assert screen.enabled is None
        x = inputs(8, seed)[0]
        assert torch.equal(screen.tokens(x, weight_t), torch.mm(x, weight_t).argmax(1))
    assert screen.enabled is keep
    x = inputs(8, 9)[0]
    got = screen.tokens(x, weight_t)
    assert (got is None) is not keep
    assert got is None or torch.equal(got, torch.mm(x, weight_t).argmax(1))


def next_token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


@pytest.mark.anyio
@pytest.mark.timeout(180)
async def test_a_fused_optimizer_step_is_screened_with_the_new_weights(
        llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused optimizer writes the weights without bumping their versions, which is
    how the screen learns its bf16 copy is stale: the stage bumps them. After a step,
    concurrent streams (screened) still give the tokens they give alone (one row: too
    few to screen)."""
    monkeypatch.setattr(_greedy, "_FASTER", 1e9)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(llama), stages=2, microbatches=2,
                                    loss_fn=next_token_loss,
                                    optimizer=("torch.optim.AdamW",
                                               {"lr": 0.05, "fused": True}))
        try:
            await same_tokens_alone_and_together(pipe, VOCAB)  # the trial; then kept
            x = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(5))
            await pipe.train_step(x[:, :-1], x[:, 1:])
            await same_tokens_alone_and_together(pipe, VOCAB)
        finally:
            await pipe.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a vocabulary wide enough to have near ties."""
    directory = tmp_path_factory.mktemp("screen") / "llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, max_position_embeddings=128)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(directory))
    return directory


def test_the_head_picks_as_pick_tokens(llama: Path) -> None:
    spec = hf.spec(llama)
    head = spec.build(spec.n_layers - 1, spec.n_layers)[0]
    head.prepare_pick()
    head.screen.enabled = True
    h = torch.randn(8, 1, HIDDEN, generator=torch.Generator().manual_seed(4))
    greedy = [True, False, True, True, False, True, True, True]
    with torch.inference_mode():
        got, want = head.pick(h, greedy), pick_tokens(head(h), greedy)
    assert torch.equal(got["tokens"][torch.tensor(greedy)],
                       want["tokens"][torch.tensor(greedy)])
    # the sampled rows' logits, from a matmul of fewer rows: the last bits may differ
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=0)


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_concurrent_streams_with_the_screen_equal_one_at_a_time(
        llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process stages, the screen kept whatever its speed: the greedy and sampled
    streams of the continuous-batching check give the tokens they give alone."""
    monkeypatch.setattr(_greedy, "_FASTER", 1e9)
    used: list[int] = []
    original = Screen._screened

    def counting(self: Screen, x: torch.Tensor, weight_t: torch.Tensor) -> Any:
        out = original(self, x, weight_t)
        used.append(out is not None)
        return out

    monkeypatch.setattr(Screen, "_screened", counting)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(llama), stages=2)
        try:
            counters = await same_tokens_alone_and_together(pipe, VOCAB)
        finally:
            await pipe.stop()
    batched(counters, 8)
    assert sum(used) > 3  # past its trial, the screen gave tokens
