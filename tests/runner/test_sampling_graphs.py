"""The sampling graphs' host half, run uncaptured on the CPU (the race in Triton's
interpreter): rows packed into the input block pick what the race over the masked logits
picks, padding rows and rows of an earlier step leave no trace, and every row that needs
more than the race (or logits that are not a decode graph's) goes to the eager sampler."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import reference as kernel_reference  # noqa: E402
from lanner.kernels import sampling  # noqa: E402
from lanner.kernels.sampling import exponential_race  # noqa: E402
from lanner.runner.sampler import (  # noqa: E402
    BitmaskRows,
    Sampler,
    SamplingRow,
    TokenBitmasks,
    decode_seed,
    kernel_seeds,
)
from lanner.runner.sampling_graphs import SamplingGraphs, races_only  # noqa: E402
from lanner.sampling_params import SamplingParams  # noqa: E402
from tests.kernels import skip_unless_interpreted  # noqa: E402

skip_unless_interpreted(sampling._race_chunk_kernel)

VOCAB = sampling.BLOCK + 37  # two chunks, the second ragged
WORDS = -(-VOCAB // 32)


def row(output: list[int] | None = None, **params: Any) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1], output or [3, 4], (2,))


def graphs_over(sizes: tuple[int, ...] = (1, 2, 4)) -> SamplingGraphs:
    return SamplingGraphs({b: torch.empty(b, VOCAB, dtype=torch.bfloat16) for b in sizes})


def step_logits(graphs: SamplingGraphs, batch: int, count: int, seed: int) -> torch.Tensor:
    """A decode graph's step: its buffer rewritten, its first ``count`` rows sampled."""
    buffer = graphs.logits_by_batch[batch]
    generator = torch.Generator().manual_seed(seed)
    buffer.copy_(torch.randn(buffer.shape, generator=generator) * 3)
    return buffer[:count]


def random_bitmasks(num_rows: int, seed: int) -> TokenBitmasks:
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31 - 1, (num_rows, WORDS), generator=generator)
    return TokenBitmasks(words.to(torch.int32), num_rows)


def expected_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    """The race over the masked logits, one row at a time, with the row's own seed."""
    tokens = []
    for logits_row, sampling_row in zip(logits, rows, strict=True):
        masked = logits_row.unsqueeze(0).clone()
        if sampling_row.token_bitmask is not None:
            source = sampling_row.token_bitmask
            kernel_reference.apply_token_bitmask(
                masked, source.bitmasks.words, torch.tensor([0]), torch.tensor([source.start])
            )
        params = sampling_row.params
        if params.is_greedy:
            tokens.append(int(masked.float().argmax()))
            continue
        seed = kernel_seeds([decode_seed(params.seed, sampling_row.num_outputs)])
        (token,) = exponential_race(
            masked, torch.tensor([params.temperature]), torch.tensor(seed)
        ).tolist()
        tokens.append(token)
    return tokens


def test_graph_rows_pick_what_the_masked_race_picks() -> None:
    graphs = graphs_over()
    sampler = Sampler()
    sampler.graphs = graphs
    bitmasks = random_bitmasks(2, seed=5)
    rows = [
        row(temperature=0.0),
        row(temperature=0.8, seed=11),
        row(temperature=0.0),
    ]
    # The first and the last row under a grammar, on the buffer's rows 1 and 0.
    rows[0].token_bitmask = BitmaskRows(bitmasks, 1, 1)
    rows[2].token_bitmask = BitmaskRows(bitmasks, 0, 1)
    waited = []
    logits = step_logits(graphs, 4, 3, seed=1)  # one padding row
    sample = sampler.launch(logits, rows, lambda: waited.append(True))
    assert sample.collect().token_ids == expected_tokens(logits, rows)
    assert waited == [True]
    # The next step, at batch 2 and without grammars, takes nothing of this one.
    plain = [row(temperature=1.2, seed=3, output=[5]), row(temperature=0.0)]
    logits = step_logits(graphs, 2, 2, seed=2)
    assert sampler.launch(logits, plain).collect().token_ids == expected_tokens(logits, plain)
    # Greedy rows as the eager sampler picks them.
    greedy = [row(temperature=0.0)] * 4
    logits = step_logits(graphs, 4, 4, seed=3)
    assert sampler.launch(logits, greedy).collect().token_ids == Sampler()(logits, greedy).token_ids


def test_a_seeded_row_draws_as_alone_whatever_its_batch() -> None:
    graphs = graphs_over()
    target = row(temperature=1.0, seed=42, output=[7, 8, 9])
    alone = step_logits(graphs, 1, 1, seed=9).clone()
    (token,) = graphs.launch(graphs.logits_by_batch[1][:1], [target]).collect().token_ids
    buffer = graphs.logits_by_batch[4]
    step_logits(graphs, 4, 4, seed=10)
    buffer[2] = alone[0]
    others = [row(temperature=0.5, seed=i) for i in range(3)]
    batch = [others[0], others[1], target, others[2]]
    assert graphs.launch(buffer, batch).collect().token_ids[2] == token


@pytest.mark.parametrize(
    "params",
    [
        {"logprobs": 2},
        {"repetition_penalty": 1.3},
        {"logit_bias": {3: 1.0}},
        {"min_tokens": 5},
        {"temperature": 0.8, "top_k": 5},
        {"temperature": 0.8, "min_p": 0.1},
    ],
)
def test_rows_needing_more_than_the_race_sample_eagerly(params: dict[str, Any]) -> None:
    graphs = graphs_over()
    special = row(**params)
    assert not races_only(special)
    logits = step_logits(graphs, 2, 2, seed=4)
    rows = [row(temperature=0.0), special]
    assert graphs.launch(logits, rows) is None
    sampler = Sampler()
    sampler.graphs = graphs
    expected = Sampler()(logits.clone(), rows)
    got = sampler(logits, rows)
    assert got.token_ids[0] == expected.token_ids[0]
    assert (got.logprobs[1] is None) == (expected.logprobs[1] is None)


def test_logits_that_are_not_a_graphs_go_eager() -> None:
    graphs = graphs_over()
    logits = step_logits(graphs, 4, 4, seed=6)
    rows = [row(temperature=0.0)] * 3
    assert graphs.launch(logits[1:], rows) is None  # not the buffer's first rows
    assert graphs.launch(logits.clone()[:3], rows) is None  # an eager step's
    assert graphs.launch(step_logits(graphs, 2, 2, seed=7), rows) is None  # more rows
    # Bitmasks from two buffers, or of another width.
    one, two = random_bitmasks(1, seed=1), random_bitmasks(1, seed=2)
    mixed = [row(temperature=0.0), row(temperature=0.0)]
    mixed[0].token_bitmask = BitmaskRows(one, 0, 1)
    mixed[1].token_bitmask = BitmaskRows(two, 0, 1)
    assert graphs.launch(step_logits(graphs, 2, 2, seed=8), mixed) is None
    narrow = [row(temperature=0.0)]
    narrow[0].token_bitmask = BitmaskRows(
        TokenBitmasks(torch.zeros(1, 3, dtype=torch.int32), 1), 0, 1
    )
    assert graphs.launch(step_logits(graphs, 1, 1, seed=8), narrow) is None


def test_decode_graphs_sharing_a_buffer_are_refused() -> None:
    shared = torch.empty(4, VOCAB)
    with pytest.raises(ValueError, match="share"):
        SamplingGraphs({2: shared[:2], 4: shared})


def test_a_sample_read_late_keeps_its_tokens() -> None:
    """The turns' buffers come round again every other launch: a sample not read by then
    keeps a copy of its tokens."""
    graphs = graphs_over()
    rows = [row(temperature=0.0)] * 2
    expected, samples = [], []
    for seed in range(3):
        logits = step_logits(graphs, 2, 2, seed=20 + seed)
        expected.append(expected_tokens(logits, rows))
        samples.append(graphs.launch(logits, rows))
    assert [s.collect().token_ids for s in samples] == expected


def test_an_all_greedy_step_takes_the_decode_graphs_argmax() -> None:
    """Where the decode graphs end with their logits' argmax, an all-greedy step without
    a grammar takes those tokens; one with a grammar row still races over its mask."""
    sizes = (1, 2, 4)
    logits = {b: torch.empty(b, VOCAB, dtype=torch.bfloat16) for b in sizes}
    argmax = {b: torch.zeros(b, dtype=torch.int64) for b in sizes}
    graphs = SamplingGraphs(logits, argmax)
    step = step_logits(graphs, 4, 3, seed=30)
    argmax[4].copy_(logits[4].float().argmax(-1))  # what the decode graph computed
    rows = [row(temperature=0.0)] * 3
    sample = graphs.launch(step, rows)
    assert sample.token_ids.data_ptr() == argmax[4].data_ptr()
    assert sample.collect().token_ids == expected_tokens(step, rows)
    masked = [row(temperature=0.0) for _ in range(3)]
    masked[1].token_bitmask = BitmaskRows(random_bitmasks(1, seed=3), 0, 1)
    argmax[4].fill_(-1)  # not read: the mask must apply
    assert graphs.launch(step, masked).collect().token_ids == expected_tokens(step, masked)
