"""The fused exponential-race sampling kernel against its torch reference, run by Triton's CPU
interpreter: given the same noise the two pick the same tokens (odd vocab sizes, greedy rows,
-inf masks, ties), and the sampler's CUDA branch keeps a seeded row independent of its batch."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lanner.kernels import reference as kernel_reference  # noqa: E402
from lanner.kernels import sampling  # noqa: E402
from lanner.kernels.sampling import (  # noqa: E402
    BLOCK,
    exponential_noise,
    exponential_race,
    exponential_race_reference,
)
from lanner.runner.sampler import (  # noqa: E402
    SamplingRow,
    apply_min_tokens,
    apply_penalties,
    decode_seed,
    sample,
)
from lanner.sampling_params import SamplingParams  # noqa: E402

CPU = torch.device("cpu")
INF = float("inf")


def race(logits: torch.Tensor, temperatures: list[float], seeds: list[int]) -> list[int]:
    return exponential_race(
        logits, torch.tensor(temperatures, dtype=torch.float32), torch.tensor(seeds)
    ).tolist()


def reference(logits: torch.Tensor, temperatures: list[float], seeds: list[int]) -> list[int]:
    """The torch formula over the noise the kernel draws for these seeds."""
    noise = exponential_noise(seeds, logits.shape[1], CPU)
    temperature_tensor = torch.tensor(temperatures, dtype=torch.float32)
    return exponential_race_reference(logits, temperature_tensor, noise).tolist()


@pytest.mark.parametrize("vocab_size", [1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 17])
def test_matches_reference(vocab_size: int) -> None:
    generator = torch.Generator().manual_seed(vocab_size)
    num_rows = 10
    logits = torch.randn(num_rows, vocab_size, generator=generator) * 4
    # -inf where top-k/top-p or min_tokens cut: scattered, all but one column, every column
    logits[torch.rand(num_rows, vocab_size, generator=generator) < 0.3] = -INF
    logits[3, 1:] = -INF
    logits[8] = -INF
    temperatures = [[0.0, 0.05, 0.6, 1.0, 2.5][i % 5] for i in range(num_rows)]  # 0: greedy
    seeds = [1000 + 7919 * i for i in range(num_rows)]
    expected = reference(logits, temperatures, seeds)
    assert race(logits, temperatures, seeds) == expected
    greedy = [i for i, t in enumerate(temperatures) if t == 0.0]
    assert [expected[i] for i in greedy] == logits[greedy].argmax(-1).tolist()


def test_ties_go_to_the_lowest_column() -> None:
    vocab_size = 3 * BLOCK + 5
    logits = torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(0))
    logits[0, [2 * BLOCK + 3, 7, BLOCK + 1]] = INF  # sampled: +inf beats any noise
    logits[1, [BLOCK + 2, 2 * BLOCK]] = 10.0  # greedy: a tie across chunks
    logits[2, [2 * BLOCK + 1, BLOCK + 9]] = 1e30  # the noise is below half an ulp of 1e30
    logits[3:] = -INF  # nothing left: column 0, as torch.argmax
    temperatures = [0.6, 0.0, 1.0, 0.6, 0.0]
    seeds = [11, 12, 13, 14, 15]
    expected = [7, BLOCK + 2, BLOCK + 9, 0, 0]
    assert race(logits, temperatures, seeds) == expected
    assert reference(logits, temperatures, seeds) == expected


def test_all_greedy_batch_is_a_chunked_argmax() -> None:
    vocab_size = 3 * BLOCK + 5
    logits = torch.randn(4, vocab_size, generator=torch.Generator().manual_seed(2))
    logits[0, [BLOCK + 2, 2 * BLOCK]] = 10.0  # a tie across chunks: the lower column
    logits[1] = -INF  # nothing left: column 0, as torch.argmax
    for dtype in (torch.float32, torch.bfloat16):
        rows = logits.to(dtype)
        assert exponential_race(rows, None, None).tolist() == rows.argmax(-1).tolist()


@pytest.mark.parametrize("vocab_size", [37, BLOCK + 33, 3 * BLOCK + 17])
@pytest.mark.parametrize("greedy", [True, False])
def test_fused_bitmask_races_as_the_masked_logits_do(vocab_size: int, greedy: bool) -> None:
    """A bitmask read by the race picks what the race over the masked logits picks: rows
    with a bitmask row (any, in any order), rows without (-1), bf16 logits."""
    generator = torch.Generator().manual_seed(vocab_size + greedy)
    num_rows = 6
    logits = (torch.randn(num_rows, vocab_size, generator=generator) * 4).to(torch.bfloat16)
    words = -(-vocab_size // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, words), generator=generator, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[1] = 0
    bitmask[1, words - 1] = 1 << ((vocab_size - 1) % 32)  # only the last token allowed
    bitmask_rows = torch.tensor([2, -1, 1, 0, -1, 3])
    masked = logits.clone()
    constrained = (bitmask_rows >= 0).nonzero().flatten()
    kernel_reference.apply_token_bitmask(masked, bitmask, constrained, bitmask_rows[constrained])
    if greedy:
        got = exponential_race(logits, None, None, bitmask, bitmask_rows)
        assert got.tolist() == masked.float().argmax(-1).tolist()
    else:
        temperatures = [0.0, 0.7, 1.0, 0.3, 1.5, 0.9]
        seeds = [31 + i for i in range(num_rows)]
        got = exponential_race(
            logits,
            torch.tensor(temperatures, dtype=torch.float32),
            torch.tensor(seeds),
            bitmask,
            bitmask_rows,
        )
        assert got.tolist() == reference(masked.float(), temperatures, seeds)
    assert got[2].item() == vocab_size - 1
    with pytest.raises(ValueError, match="together"):
        exponential_race(logits, None, None, bitmask, None)


def test_strided_and_half_precision_logits() -> None:
    wide = torch.randn(4, 2 * BLOCK + 40, generator=torch.Generator().manual_seed(1)) * 3
    logits = wide[:, 3 : 2 * BLOCK + 3]  # a row stride past the vocabulary
    temperatures, seeds = [0.7, 0.0, 1.2, 0.3], [5, 6, 7, 8]
    assert race(logits, temperatures, seeds) == race(logits.contiguous(), temperatures, seeds)
    half = logits.to(torch.bfloat16)
    assert race(half, temperatures, seeds) == reference(half.float(), temperatures, seeds)


def test_a_row_depends_only_on_its_seed() -> None:
    vocab_size = 2 * BLOCK + 3
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(vocab_size, generator=generator)
    (alone,) = race(target.unsqueeze(0), [0.8], [42])
    for num_rows, position in ((3, 0), (4, 2), (6, 5)):
        logits = torch.randn(num_rows, vocab_size, generator=generator)
        logits[position] = target
        temperatures = [[0.0, 1.3, 0.5][i % 3] for i in range(num_rows)]
        seeds = [100 + i for i in range(num_rows)]
        temperatures[position], seeds[position] = 0.8, 42
        assert race(logits, temperatures, seeds)[position] == alone

    # On a flat row only the noise decides: equal seeds agree, others differ.
    flat = race(torch.zeros(5, vocab_size), [1.0] * 5, [1, 2, 1, 3, 4])
    assert flat[0] == flat[2] and len(set(flat)) >= 3


def test_empty_batch() -> None:
    assert race(torch.empty(0, 10), [], []) == []


def test_noise_is_exp1() -> None:
    noise = exponential_noise([3, 4], 4096, CPU).flatten().double().sort().values
    # Kolmogorov-Smirnov against 1 - exp(-x); 1.63 / sqrt(n) is the 1 % critical value
    cdf = 1 - torch.exp(-noise)
    n = noise.numel()
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum(steps - cdf, cdf - (steps - 1 / n)).max().item()
    assert distance < 1.63 / math.sqrt(n)


@triton.jit
def _exponential_of_kernel(uniform_ptr, out_ptr, count, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    uniform = tl.load(uniform_ptr + offsets, mask=offsets < count, other=0.5)
    tl.store(out_ptr + offsets, sampling._exponential_from_uniform(uniform), mask=offsets < count)


def test_noise_is_exact_and_positive_next_to_one() -> None:
    """u within a few ulps of 1 must give a tiny positive E (not 0, which would win the
    race outright); 0 the floor's 46. Around the switch to the series at u = 15/16 and
    everywhere else E is -log(u) to a few ulps."""
    ulp = 2.0**-24
    uniform = torch.tensor(
        [0.0, 2.0**-31, 0.25, 0.5, 0.9375 - ulp, 0.9375, 0.9375 + ulp, 0.99]
        + [1 - k * ulp for k in (1, 2, 3, 64, 4096)],
        dtype=torch.float32,
    )
    out = torch.empty_like(uniform)
    _exponential_of_kernel[(1,)](uniform, out, uniform.numel(), BLOCK=16)
    expected = -torch.log(uniform.double().clamp(min=1e-20))
    assert (out > 0).all()
    torch.testing.assert_close(out.double(), expected, rtol=5e-7, atol=0)


def test_race_follows_softmax() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    temperature = 0.7
    num_draws = 500  # the interpreter runs ~100 rows a second
    logits = (probs.log() * temperature).float().expand(num_draws, -1).contiguous()
    tokens = race(logits, [temperature] * num_draws, list(range(num_draws)))
    observed = torch.bincount(torch.tensor(tokens), minlength=4).double()
    expected = probs * num_draws
    assert ((observed - expected) ** 2 / expected).sum().item() < 16.3  # p = 0.001, 3 dof


@pytest.fixture
def cuda_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends the sampler down its CUDA branch with CPU tensors: the kernels run interpreted."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def sample_penalized(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """The device work of Sampler.launch, without its pinned host copy."""
    return sample(apply_min_tokens(apply_penalties(logits, rows), rows), rows).tolist()


def sampling_row(output: list[int] | None = None, **params: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1, 2], output or [], (0,))


@pytest.mark.usefixtures("cuda_branch")
def test_sampler_cuda_branch_keeps_seeded_rows_independent() -> None:
    vocab_size = 60
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(vocab_size, generator=generator) * 2
    plain = [sampling_row([0] * step, seed=7, temperature=0.9) for step in range(3)]
    cut = [sampling_row([0] * step, seed=8, top_k=5, top_p=0.9) for step in range(3)]
    plain_alone = [sample_penalized(target.unsqueeze(0), [r])[0] for r in plain]
    cut_alone = [sample_penalized(target.unsqueeze(0), [r])[0] for r in cut]
    assert len(set(plain_alone)) > 1
    # The kernel ran, with the seed decode_seed gives each step.
    kernel_seeds = [decode_seed(7, step) >> 1 for step in range(3)]
    expected = [reference(target.unsqueeze(0), [0.9], [s])[0] for s in kernel_seeds]
    assert plain_alone == expected
    assert set(cut_alone) <= set(target.topk(5).indices.tolist())

    neighbours = [
        sampling_row(temperature=0.0),
        sampling_row(top_k=3, seed=1),
        sampling_row([4, 4, 9], repetition_penalty=1.5, presence_penalty=0.5),
        sampling_row(min_p=0.2, temperature=1.5),
    ]
    for position in (0, 2, 4):
        logits = torch.randn(5, vocab_size, generator=generator)
        logits[position] = target
        greedy_at, top_k_at = (i if i < position else i + 1 for i in (0, 1))
        for targets, alone in ((plain, plain_alone), (cut, cut_alone)):
            for step, target_row in enumerate(targets):
                rows = neighbours[:position] + [target_row] + neighbours[position:]
                ids = sample_penalized(logits, rows)
                assert ids[position] == alone[step]
                assert ids[greedy_at] == int(logits[greedy_at].argmax())
                assert ids[top_k_at] in logits[top_k_at].topk(3).indices.tolist()
