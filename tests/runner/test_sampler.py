"""Sampler: greedy, temperature, top-k/p, min-p, penalties, min_tokens, seeds and logprobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lanner.runner.sampler import (
    Sampler,
    SamplingRow,
    apply_min_tokens,
    apply_penalties,
    apply_token_constraints,
    apply_top_k_top_p_min_p,
    decode_seed,
    greedy_tokens,
    prompt_logprobs,
)
from lanner.sampling_params import SamplingParams

VOCAB = 50
EOS = 2


def row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: tuple[int, ...] = (EOS,),
    **params: Any,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), prompt or [1], output or [], eos)


def counts_of(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(token_ids), minlength=vocab_size).double()


def draw(logits_row: torch.Tensor, num_draws: int, **params: Any) -> list[int]:
    """Sample one distribution many times in one batch (unseeded rows)."""
    logits = logits_row.unsqueeze(0).expand(num_draws, -1).contiguous()
    return Sampler()(logits, [row(**params)] * num_draws).token_ids


def test_greedy_is_argmax_for_every_dtype() -> None:
    logits = torch.randn(8, VOCAB)
    expected = logits.argmax(-1).tolist()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows = [row(temperature=0.0) for _ in range(8)]
        out = Sampler()(logits.to(dtype), rows)
        assert out.token_ids == logits.to(dtype).float().argmax(-1).tolist()
        assert out.logprobs == [None] * 8
    assert Sampler()(logits, [row(temperature=0.0) for _ in range(8)]).token_ids == expected


def test_greedy_ties_take_the_first_maximum_as_argmax_does() -> None:
    logits = torch.randint(0, 3, (64, VOCAB)).float()  # many ties in every row
    logits[0] = torch.nan  # a NaN row: argmax's answer too
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    rows = [
        row(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3),
        row(temperature=0.0, output=[3, 4], min_tokens=5, presence_penalty=1.0),
        row(seed=1, frequency_penalty=0.5, output=[5, 5]),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_empty_batch() -> None:
    out = Sampler()(torch.empty(0, VOCAB), [])
    assert out.token_ids == [] and out.logprobs == []


def test_shape_mismatch_is_explained() -> None:
    with pytest.raises(ValueError, match="one row per SamplingRow"):
        Sampler()(torch.randn(2, VOCAB), [row()])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    num_draws = 40_000
    tokens = draw(logits, num_draws, temperature=temperature)
    expected = torch.softmax(logits.double() / temperature, -1) * num_draws
    observed = counts_of(tokens, 5)
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 20.5  # p = 0.0004 for 4 degrees of freedom


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(16, VOCAB) * 3
    greedy = logits.argmax(-1).tolist()
    assert Sampler()(logits, [row(top_k=1) for _ in range(16)]).token_ids == greedy
    assert Sampler()(logits, [row(top_p=1e-6) for _ in range(16)]).token_ids == greedy
    assert Sampler()(logits, [row(min_p=1.0) for _ in range(16)]).token_ids == greedy


# A hand-built distribution: probabilities 0.4, 0.3, 0.2, 0.1.
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])
LOGITS = PROBS.log()


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (dict(top_k=2), [0, 1]),
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_p=0.6), [0, 1]),  # mass before token 2 is 0.7 >= 0.6
        (dict(top_p=0.75), [0, 1, 2]),
        (dict(top_p=0.3), [0]),
        (dict(min_p=0.3), [0, 1, 2]),  # keeps p >= 0.12
        (dict(min_p=0.6), [0, 1]),  # keeps p >= 0.24
        # top_p measured after top_k: [0.4, 0.3] renormalizes to [0.57, 0.43]
        (dict(top_k=2, top_p=0.5), [0]),
        (dict(top_k=3, min_p=0.6), [0, 1]),
    ],
)
def test_truncation_masks_exactly(params: dict[str, Any], allowed: list[int]) -> None:
    masked = apply_top_k_top_p_min_p(LOGITS.unsqueeze(0), [row(**params)])[0]
    kept = torch.isfinite(masked).nonzero().flatten().tolist()
    assert kept == allowed
    assert torch.equal(masked[allowed], LOGITS[allowed])  # survivors untouched

    tokens = draw(LOGITS, 20_000, **params)
    observed = counts_of(tokens, 4)
    assert set(observed.nonzero().flatten().tolist()) == set(allowed)
    expected = PROBS[allowed].double() / PROBS[allowed].sum()
    assert torch.allclose(observed[allowed] / len(tokens), expected, atol=0.015)


def test_truncated_and_plain_rows_share_a_batch() -> None:
    """Each group follows its own distribution when the truncated rows race apart."""
    num_draws = 20_000
    rows = [
        row(top_k=2, temperature=0.5) if i % 2 else row(temperature=0.5) for i in range(num_draws)
    ]
    rows[0] = row(temperature=0.0)
    logits = LOGITS.unsqueeze(0).expand(num_draws, -1).contiguous()
    tokens = torch.tensor(Sampler()(logits, rows).token_ids)
    assert tokens[0].item() == 0
    for group, allowed in ((tokens[2::2], [0, 1, 2, 3]), (tokens[1::2], [0, 1])):
        expected = torch.softmax(LOGITS[allowed].double() / 0.5, -1)
        observed = counts_of(group.tolist(), 4) / len(group)
        assert observed[[t for t in range(4) if t not in allowed]].sum() == 0
        assert torch.allclose(observed[allowed], expected, atol=0.015)


def test_truncation_is_per_row() -> None:
    logits = LOGITS.unsqueeze(0).repeat(4, 1)
    rows = [row(top_k=1), row(), row(top_p=0.6), row(min_p=0.6, top_k=3)]
    masked = apply_top_k_top_p_min_p(logits, rows)
    assert torch.isfinite(masked).tolist() == [
        [True, False, False, False],
        [True, True, True, True],
        [True, True, False, False],
        [True, True, False, False],
    ]


def test_top_k_larger_than_vocab_is_a_no_op() -> None:
    masked = apply_top_k_top_p_min_p(LOGITS.unsqueeze(0), [row(top_k=100)])
    assert torch.equal(masked[0], LOGITS)


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The formulas, one token at a time."""
    out = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for token in set(r.prompt_token_ids + r.output_token_ids):
            value = out[i, token].item()
            value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
            out[i, token] = value
        for token in set(r.output_token_ids):
            count = r.output_token_ids.count(token)
            out[i, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_follow_the_formulas() -> None:
    logits = torch.randn(4, VOCAB) * 2
    rows = [
        row(prompt=[1, 2, 3], output=[3, 7, 7, 7], repetition_penalty=1.5),
        row(prompt=[4], output=[5, 5, 6], frequency_penalty=0.5, presence_penalty=-0.25),
        row(prompt=[8, 8], output=[9, 8, 9], repetition_penalty=0.8, frequency_penalty=1.0),
        row(prompt=[10], output=[11]),  # no penalties: unchanged
    ]
    out = apply_penalties(logits, rows)
    assert torch.allclose(out, reference_penalties(logits, rows), atol=1e-6)
    assert torch.equal(out[3], logits[3])


def test_repetition_penalty_makes_seen_tokens_less_likely() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits, [row(prompt=[0, 1], output=[], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_no_penalty_work_when_unused() -> None:
    logits = torch.randn(2, VOCAB)
    assert apply_penalties(logits, [row(output=[1, 2]), row()]) is logits


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    rows = [row(output=[5], temperature=0.0, presence_penalty=0.5)]
    assert Sampler()(logits, rows).token_ids == [6]


def test_min_tokens_blocks_eos_and_stop_tokens() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 100.0
    logits[:, 9] = 50.0
    logits[:, 4] = 10.0
    rows = [
        row(output=[1], min_tokens=3, stop_token_ids=[9], temperature=0.0),
        row(output=[1, 1, 1], min_tokens=3, stop_token_ids=[9], temperature=0.0),  # reached
        row(output=[], min_tokens=2, temperature=0.0, eos=(EOS, 9, 10_000)),  # id past vocab
    ]
    assert Sampler()(logits, rows).token_ids == [4, EOS, 4]
    masked = apply_min_tokens(logits, rows)
    assert masked[0, EOS] == float("-inf") and masked[0, 9] == float("-inf")
    assert torch.equal(masked[1], logits[1])
    # sampling, not just greedy, respects it
    tokens = draw(logits[0], 200, output=[1], min_tokens=3, stop_token_ids=[9])
    assert EOS not in tokens and 9 not in tokens


def test_pending_outputs_are_not_history() -> None:
    # A deferred row holds its request's live list, ending in the placeholder of the token
    # it samples: counted off (num_pending), it samples as the list without it would, for
    # penalties, min_tokens and the seeded generator's step alike.
    logits = torch.randn(3, VOCAB) * 3
    logits[:, EOS] = 8.0
    history = {"presence_penalty": 1.5, "min_tokens": 3, "seed": 7, "temperature": 0.9}
    trimmed = [row(output=[5, 6], **history), row(output=[5, 6, 6], **history)]
    pending = [row(output=[5, 6, -1], **history), row(output=[5, 6, 6, -1], **history)]
    for r in pending:
        r.num_pending = 1
    assert [r.num_outputs for r in pending] == [2, 3] and pending[0].outputs() == [5, 6]
    assert pending[1].output_token_ids == [5, 6, 6, -1]  # the list itself is left alone
    sampler = Sampler()
    for _ in range(3):
        assert sampler(logits[:2], pending).token_ids == sampler(logits[:2], trimmed).token_ids
    assert torch.equal(apply_penalties(logits[:2], pending), apply_penalties(logits[:2], trimmed))
    assert torch.equal(apply_min_tokens(logits[:2], pending), apply_min_tokens(logits[:2], trimmed))


def seeded_tokens(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return sampler(logits, rows).token_ids


def test_seeded_row_ignores_the_rest_of_the_batch() -> None:
    sampler = Sampler()
    target_logits = torch.randn(VOCAB)

    def seeded(step: int) -> SamplingRow:
        return row(output=list(range(step)), seed=1234, temperature=1.0)

    alone = [sampler(target_logits.unsqueeze(0), [seeded(step)]).token_ids[0] for step in range(20)]
    assert len(set(alone)) > 3  # the step changes the draw

    for batch_size, position in ((2, 0), (5, 3), (9, 8)):
        for step in range(20):
            logits = torch.randn(batch_size, VOCAB)
            logits[position] = target_logits
            rows = [neighbour(k) for k in range(batch_size)]
            rows[position] = seeded(step)
            assert sampler(logits, rows).token_ids[position] == alone[step]


def neighbour(k: int) -> SamplingRow:
    """Rows of every kind a seeded row may share a batch with."""
    kinds = [
        row(),
        row(seed=k, top_k=7),
        row(temperature=0.0),
        row(output=[3, 3, 8], repetition_penalty=1.4, frequency_penalty=0.3),
        row(top_p=0.8, min_p=0.05, temperature=1.3),
        row(output=[1], min_tokens=4, logprobs=2),
    ]
    return kinds[k % len(kinds)]


def test_seeded_truncated_row_ignores_the_rest_of_the_batch() -> None:
    """Alone it is the only row to cut; in a batch it races apart from the others."""
    target_logits = torch.randn(VOCAB)

    def seeded(step: int) -> SamplingRow:
        return row(output=list(range(step)), seed=99, top_k=10, top_p=0.95, temperature=0.8)

    alone = [
        Sampler()(target_logits.unsqueeze(0), [seeded(step)]).token_ids[0] for step in range(10)
    ]
    assert len(set(alone)) > 2
    assert set(alone) <= set(target_logits.topk(10).indices.tolist())
    for batch_size, position in ((3, 1), (7, 6)):
        for step in range(10):
            logits = torch.randn(batch_size, VOCAB)
            logits[position] = target_logits
            rows = [neighbour(k) for k in range(batch_size)]
            rows[position] = seeded(step)
            assert Sampler()(logits, rows).token_ids[position] == alone[step]


def test_different_seeds_draw_differently() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: any difference comes from the noise

    def sequence(seed: int) -> list[int]:
        rows = [[row(output=[0] * step, seed=seed)] for step in range(30)]
        return [Sampler()(logits, r).token_ids[0] for r in rows]

    assert sequence(1) == sequence(1)
    assert sequence(1) != sequence(2)
    assert decode_seed(1, 0) != decode_seed(0, 1)


def test_unseeded_rows_follow_the_global_generator() -> None:
    logits = torch.zeros(4, VOCAB)
    torch.manual_seed(7)
    first = Sampler()(logits, [row() for _ in range(4)]).token_ids
    torch.manual_seed(7)
    assert Sampler()(logits, [row() for _ in range(4)]).token_ids == first


def test_logprobs_come_from_raw_logits() -> None:
    logits = torch.randn(3, VOCAB) * 2
    rows = [
        row(logprobs=5, temperature=0.3, repetition_penalty=2.0, prompt=[0, 1, 2, 3]),
        row(logprobs=0, temperature=0.0),
        row(),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, -1)
    for i in range(2):
        info = out.logprobs[i]
        assert info is not None
        token = out.token_ids[i]
        assert info.token_id == token
        assert info.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert info.rank == 1 + int((raw[i] > raw[i, token]).sum())
    top5 = out.logprobs[0].top  # type: ignore[union-attr]
    values, indices = raw[0].topk(5)
    assert [t for t, _ in top5] == indices.tolist()
    assert [lp for _, lp in top5] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[1].top == [] and out.logprobs[1].rank == 1  # type: ignore[union-attr]
    assert out.logprobs[2] is None


def test_rank_counts_strictly_greater() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0]])
    params = dict(temperature=0.0, logprobs=2, output=[1, 2], presence_penalty=2.0)
    info = Sampler()(logits, [row(**params)]).logprobs[0]
    assert info is not None and info.token_id == 4  # 1 and 2 penalized to 1.0
    assert info.rank == 3
    assert [t for t, _ in info.top] in ([1, 2], [2, 1])


def test_prompt_logprobs() -> None:
    logits = torch.randn(6, VOCAB).to(torch.bfloat16)
    targets = [3, 1, 4, 1, 5, 9]
    infos = prompt_logprobs(logits, targets, num_top=3)
    raw = torch.log_softmax(logits.float(), -1)
    for i, info in enumerate(infos):
        assert info.token_id == targets[i]
        assert info.logprob == pytest.approx(raw[i, targets[i]].item(), abs=1e-6)
        assert info.rank == 1 + int((raw[i] > raw[i, targets[i]]).sum())
        assert [t for t, _ in info.top] == raw[i].topk(3).indices.tolist()
    assert prompt_logprobs(torch.empty(0, VOCAB), [], 2) == []
    assert prompt_logprobs(logits[:1], [7], 0)[0].top == []


def test_mixed_batch() -> None:
    logits = torch.randn(6, VOCAB) * 2
    rows = [
        row(temperature=0.0, logprobs=2),
        row(seed=42, temperature=0.8),
        row(),
        row(top_k=3, temperature=1.5, logprobs=1),
        row(top_p=0.5, min_p=0.05, seed=7),
        row(temperature=0.0, output=[int(logits[5].argmax())], repetition_penalty=100.0),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == int(logits[0].argmax())
    alone = Sampler()(logits[1:2], [rows[1]]).token_ids[0]
    assert out.token_ids[1] == alone
    assert out.token_ids[3] in logits[3].topk(3).indices.tolist()
    assert out.token_ids[5] != int(logits[5].argmax())
    assert [lp is None for lp in out.logprobs] == [False, True, True, False, True, True]
    assert len(out.logprobs[0].top) == 2 and len(out.logprobs[3].top) == 1  # type: ignore[union-attr]
    assert all(isinstance(t, int) for t in out.token_ids)


def test_one_host_sync_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every device-to-host read goes through one of these; the sampler uses one."""
    calls: list[str] = []

    def counting(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    logits = torch.randn(4, VOCAB)
    rows = [
        row(temperature=0.0, logprobs=3, min_tokens=4, output=[1]),
        row(seed=5, top_k=4, top_p=0.9, min_p=0.01, repetition_penalty=1.2, output=[3, 3]),
        row(frequency_penalty=0.3, presence_penalty=0.2, output=[7], logprobs=0),
        row(temperature=0.5),
    ]
    Sampler()(logits, rows)
    assert calls == ["tolist"]
    calls.clear()
    prompt_logprobs(logits, [1, 2, 3, 4], 2)
    assert calls == ["tolist"]


def test_token_constraints_follow_their_definitions() -> None:
    logits = torch.randn(4, VOCAB)
    rows = [
        row(logit_bias={7: 5.0, 9: -3.0}),
        row(allowed_token_ids=[3, 4, 5]),
        row(output=[10, 11], bad_words_token_ids=[[12], [11, 13], [10, 14]]),
        row(),
    ]
    out = apply_token_constraints(logits, rows)
    assert out.dtype == torch.float32
    expected = logits.clone()
    expected[0, 7] += 5.0
    expected[0, 9] -= 3.0
    expected[1, [i for i in range(VOCAB) if i not in (3, 4, 5)]] = float("-inf")
    # 12 always; 13 follows "11", which the output ends with; 14 needs "10" last: free.
    expected[2, [12, 13]] = float("-inf")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert apply_token_constraints(logits, [row()] * 4) is logits  # nothing to do, no copy


def test_token_constraints_decide_and_ignore_neighbours() -> None:
    logits = torch.randn(3, VOCAB)
    rows = [row(temperature=0.0, logit_bias={17: 100.0}), row(temperature=0.0), row(
        temperature=1.0, seed=5, allowed_token_ids=[20, 21])]  # fmt: skip
    out = Sampler()(logits, rows).token_ids
    assert out[0] == 17 and out[1] == logits[1].argmax().item() and out[2] in (20, 21)
    # A constrained seeded row draws the same alone as in the batch.
    assert Sampler()(logits[2:], rows[2:]).token_ids == [out[2]]
    # Ids past the logits (a tokenizer larger than the head) are skipped, not an error.
    assert Sampler()(logits[:1], [row(temperature=0.0, logit_bias={VOCAB + 5: 100.0})])
