"""Triton paged attention (decode and prefill/extend) against the pure-torch reference,
run by Triton's CPU interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import (
    attention_metadata,  # noqa: E402
    reference,  # noqa: E402
)
from lanner.kernels.attention_metadata import AttentionMetadata, shared_prefix_tokens  # noqa: E402
from lanner.kernels.paged_attention import (  # noqa: E402
    decode_attention,
    paged_attention,
    prefill_attention,
)

BLOCK_SIZE = 4


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A random cache whose blocks are scattered, and queries for each sequence."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for count in blocks_needed:
        tables.append(order[:count])
        order = order[count:]
    kv_cache = torch.randn(
        2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=generator
    ).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(dtype)
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
    return query, kv_cache, metadata


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def check(query, kv_cache, metadata, sliding_window=None) -> None:
    scale = query.shape[-1] ** -0.5
    expected = reference.paged_attention(query, kv_cache, metadata, scale, sliding_window)
    out = torch.full_like(query, float("nan"))  # poison: every row must be written
    paged_attention(query, kv_cache, metadata, scale, sliding_window, out=out)
    tol = TOLERANCE[query.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def check_launch(kernel, query, kv_cache, metadata, **launch) -> None:  # noqa: ANN001
    """One float32 kernel wrapper (decode_attention, prefill_attention) with the given
    launch settings against the reference."""
    scale = query.shape[-1] ** -0.5
    expected = reference.paged_attention(query, kv_cache, metadata, scale)
    out = torch.full_like(query, float("nan"))
    kernel(query, kv_cache, metadata, scale, None, out, **launch)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_ragged_mixed_batch_matches_reference(group: int) -> None:
    """Decodes, a fresh prefill, an extend on a prefix ending mid-block (7 cached + 6 new),
    and sequences crossing many block boundaries, all in one batch."""
    query_lens = [1, 9, 6, 1, 1, 17]
    seq_lens = [23, 9, 13, 1, 40, 21]
    query, kv_cache, metadata = make_case(query_lens, seq_lens, 2 * group, 2, 32, torch.float32)
    assert metadata.num_decode == 3 and metadata.num_prefill == 3
    check(query, kv_cache, metadata)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_half_precision_and_real_head_dims(head_dim: int) -> None:
    # fp16 only: Triton 3.6's interpreter computes bf16 tl.dot wrongly (a 16x16 bf16
    # product is off by 1e10 there); bf16 is checked on the GPU by
    # benchmarks/kernels_attention.py at real shapes.
    query, kv_cache, metadata = make_case([1, 5, 1], [30, 12, 3], 8, 2, head_dim, torch.float16)
    check(query, kv_cache, metadata)


def test_decode_with_many_splits_and_long_context() -> None:
    # 300 tokens of context: the decode splits it across several programs.
    query, kv_cache, metadata = make_case([1, 1], [300, 129], 4, 1, 32, torch.float32, seed=3)
    metadata.num_kv_splits = 5
    check(query, kv_cache, metadata)


@pytest.mark.parametrize("table_ahead", [False, True])
def test_decode_reads_the_block_table_in_step_or_one_tile_ahead(table_ahead: bool) -> None:
    """Both ways of reading a tile's block numbers (``_attend_tiles``' TABLE_AHEAD): a
    context of whole tiles and partial ones, the last tile's look-ahead past the end."""
    query, kv_cache, metadata = make_case([1, 1, 1], [64, 37, 5], 4, 2, 32, torch.float32)
    metadata.num_kv_splits = 2
    check_launch(
        decode_attention,
        query,
        kv_cache,
        metadata,
        block_n=16,
        num_warps=2,
        table_ahead=table_ahead,
    )


def test_reduction_merges_more_splits_than_one_tile() -> None:
    # 11 splits: the reduction's loop takes a full tile of 8, then a partial one.
    query, kv_cache, metadata = make_case([1, 1], [200, 97], 4, 2, 32, torch.float32)
    metadata.num_kv_splits = 11
    check(query, kv_cache, metadata)


@pytest.mark.parametrize("window", [None, 5])
def test_one_split_decode_writes_the_output_without_a_reduction(window: int | None) -> None:
    query, kv_cache, metadata = make_case([1, 1, 1], [9, 33, 1], 8, 2, 32, torch.float32)
    metadata.num_kv_splits = 1
    check(query, kv_cache, metadata, sliding_window=window)


def test_sliding_window() -> None:
    query, kv_cache, metadata = make_case([1, 12, 1], [40, 30, 9], 4, 2, 32, torch.float32)
    check(query, kv_cache, metadata, sliding_window=10)


def test_padding_sequence_of_length_zero_writes_zeros() -> None:
    """CUDA-graph padding rows have seq_len 0; their output must be finite, not garbage."""
    query, kv_cache, metadata = make_case([1, 1], [5, 1], 4, 2, 32, torch.float32)
    metadata.seq_lens[1] = 0
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kv_cache, metadata, 0.2, None, out=out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("block_m", "block_n"), [(128, 64), (32, 16), (16, 32)])
def test_long_extend_uses_unmasked_and_diagonal_tiles(block_m: int, block_n: int) -> None:
    """Rows far past the tile size: keys before the tile go through the unmasked loop,
    the diagonal through the masked one; both must agree with the reference."""
    query, kv_cache, metadata = make_case([150, 70], [200, 70], 4, 2, 32, torch.float32, seed=5)
    check_launch(
        prefill_attention,
        query,
        kv_cache,
        metadata,
        block_m=block_m,
        block_n=block_n,
        num_warps=4,
        num_stages=2,
    )


def make_shared_prefix_case(
    suffix_lens: list[int],
    prefix_blocks: int,
    num_heads: int,
    num_kv_heads: int,
    extra_prefill: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], list[list[int]]]:
    """Decode sequences whose first ``prefix_blocks`` blocks are the same cache blocks
    (a shared system prompt), each with its own suffix; optionally a prefill chunk of
    ``extra_prefill`` tokens in the same batch."""
    generator = torch.Generator().manual_seed(seed)
    prefix_len = prefix_blocks * BLOCK_SIZE
    seq_lens = [prefix_len + n for n in suffix_lens]
    own_blocks = [-(-n // BLOCK_SIZE) - prefix_blocks for n in seq_lens]
    extra_blocks = -(-extra_prefill // BLOCK_SIZE)
    num_blocks = prefix_blocks + sum(own_blocks) + extra_blocks + 2
    order = torch.randperm(num_blocks, generator=generator).tolist()
    shared, order = order[:prefix_blocks], order[prefix_blocks:]
    tables = []
    for count in own_blocks:
        tables.append(shared + order[:count])
        order = order[count:]
    query_lens = [1] * len(seq_lens)
    if extra_prefill:
        tables.insert(1, order[:extra_blocks])
        seq_lens.insert(1, extra_prefill)
        query_lens.insert(1, extra_prefill)
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, 32, generator=generator)
    query = torch.randn(sum(query_lens), num_heads, 32, generator=generator)
    return query, kv_cache, query_lens, seq_lens, tables


@pytest.fixture
def small_cascade_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cascade at interpreter-sized batches: 3 sequences sharing 8 tokens suffice."""
    monkeypatch.setattr(attention_metadata, "CASCADE_MIN_SEQS", 3)
    monkeypatch.setattr(attention_metadata, "CASCADE_MIN_TOKENS", 8)


@pytest.mark.usefixtures("small_cascade_thresholds")
@pytest.mark.parametrize("group", [1, 4, 8])
def test_cascade_attention_over_a_shared_prefix(group: int) -> None:
    """Decodes sharing 5 prefix blocks read them through the cascade kernel; suffixes of
    1 token, a whole block, and several blocks; a prefill chunk in the same batch."""
    query, kv_cache, query_lens, seq_lens, tables = make_shared_prefix_case(
        [1, 4, 9, 2, 13], 5, 2 * group, 2, extra_prefill=7
    )
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
    # The shortest sequence (20 + 1 tokens) keeps its last token out of the prefix.
    assert metadata.shared_prefix_len_cpu == 20
    assert metadata.shared_prefix_len.tolist() == [20]
    check(query, kv_cache, metadata)


@pytest.mark.usefixtures("small_cascade_thresholds")
def test_cascade_with_many_prefix_slices_and_fixed_splits() -> None:
    """A prefix long enough for several cascade slices, suffixes split across programs."""
    query, kv_cache, query_lens, seq_lens, tables = make_shared_prefix_case(
        [150, 3, 70, 1], 70, 8, 2, seed=4
    )
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
    assert metadata.shared_prefix_len_cpu == 280
    metadata.num_kv_splits = 3
    check(query, kv_cache, metadata)


@pytest.mark.parametrize("splits", [1, 4])
def test_cascade_metadata_as_cuda_graphs_set_it(splits: int) -> None:
    """Under graphs the cascade kernel always runs with a device-side prefix length:
    0 when the step shares nothing, and padding rows (seq_len 0) must stay zeros. With
    one split and nothing shared, the decode kernel writes the output itself."""
    query, kv_cache, query_lens, seq_lens, tables = make_shared_prefix_case(
        [1, 6, 3, 1], 3, 8, 2, seed=2
    )
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
    metadata.seq_lens[3] = 0  # a padding row
    metadata.num_kv_splits = splits
    metadata.shared_prefix_len_cpu = 100  # an upper bound, as a captured graph has
    for prefix_len in (0, 12):
        metadata.shared_prefix_len = torch.tensor([prefix_len], dtype=torch.int32)
        out = torch.full_like(query, float("nan"))
        paged_attention(query, kv_cache, metadata, 0.2, None, out=out)
        assert torch.equal(out[3], torch.zeros_like(out[3]))
        metadata.seq_lens_cpu[3] = 0
        expected = reference.paged_attention(query, kv_cache, metadata, 0.2)
        torch.testing.assert_close(out[:3], expected[:3], atol=2e-5, rtol=2e-5)


@pytest.mark.usefixtures("small_cascade_thresholds")
def test_sliding_window_layers_ignore_the_cascade() -> None:
    query, kv_cache, query_lens, seq_lens, tables = make_shared_prefix_case(
        [1, 9, 30], 4, 4, 2, seed=6
    )
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
    assert metadata.shared_prefix_len_cpu == 16
    check(query, kv_cache, metadata, sliding_window=10)


def test_shared_prefix_needs_enough_sequences_and_tokens(monkeypatch) -> None:
    monkeypatch.setattr(attention_metadata, "CASCADE_MIN_SEQS", 2)
    monkeypatch.setattr(attention_metadata, "CASCADE_MIN_TOKENS", 8)
    shared = [7, 3, 9]
    tables = [shared + [1, 2], shared + [4], shared + [5, 6]]
    assert shared_prefix_tokens(tables, [20, 13, 18], 4) == 12
    # The shortest sequence's last token (position 8) never counts as shared.
    assert shared_prefix_tokens(tables, [20, 9, 18], 4) == 8
    assert shared_prefix_tokens(tables, [20, 8, 18], 4) == 0  # 4 tokens: below the minimum
    assert shared_prefix_tokens([[1, 2, 3], [0, 2, 3]], [12, 12], 4) == 0  # first block differs
    assert shared_prefix_tokens(tables[:1], [20], 4) == 0  # one sequence: nothing to share


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float8_cache_is_widened_to_the_query_dtype(query_dtype: torch.dtype) -> None:
    """kv_cache_dtype="fp8": the kernels read e4m3 K/V and compute in the queries' dtype
    (fp16 for bf16 queries); the reference reads the same float8 values."""
    query, kv_cache, metadata = make_case(
        [1, 9, 1, 6], [40, 9, 3, 20], 8, 2, 32, torch.float32, seed=7
    )
    kv_cache = kv_cache.mul(3).to(torch.float8_e4m3fn)
    check(query.to(query_dtype), kv_cache, metadata)
