"""The CPU path (kernels/cpu_attention.py) against the pure-torch reference: ragged mixed
batches, grouped-query heads, sliding windows, chunks on a cached prefix, decode-only
batches, an fp8 cache, bf16; qkv_prepare must give the reference's very bits."""

from __future__ import annotations

import pytest
import torch

from lanner.kernels import cpu_attention, ops, reference
from lanner.kernels.attention_metadata import AttentionMetadata
from tests.kernels.test_paged_attention import BLOCK_SIZE, make_case

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def check(query, kv_cache, metadata, window=None) -> torch.Tensor:
    scale = query.shape[-1] ** -0.5
    expected = reference.paged_attention(query, kv_cache, metadata, scale, window)
    out = cpu_attention.paged_attention(query, kv_cache, metadata, scale, window)
    tol = TOLERANCE[query.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_ragged_mixed_batch(dtype: torch.dtype, group: int) -> None:
    """Decodes, a fresh prefill, an extend on a prefix ending mid-block and long contexts
    crossing many blocks, in one batch."""
    query_lens = [1, 9, 6, 1, 1, 17, 1]
    seq_lens = [23, 9, 13, 1, 40, 21, 64]
    query, kv_cache, metadata = make_case(query_lens, seq_lens, 2 * group, 2, 32, dtype)
    check(query, kv_cache, metadata)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window(window: int) -> None:
    query, kv_cache, metadata = make_case([1, 12, 1, 7], [40, 30, 9, 25], 4, 2, 32, torch.float32)
    check(query, kv_cache, metadata, window)


def test_chunks_on_a_cached_prefix() -> None:
    """Chunked prefill: each chunk's queries sit after a cached prefix and see all of it."""
    query, kv_cache, metadata = make_case([5, 16, 3], [37, 48, 4], 6, 2, 64, torch.float32)
    check(query, kv_cache, metadata)


def test_decode_only_batch_writes_every_row() -> None:
    query, kv_cache, metadata = make_case([1] * 9, [1, 2, 15, 16, 17, 33, 64, 5, 100], 6, 2, 64,
                                          torch.float32)  # fmt: skip
    out = check(query, kv_cache, metadata)
    assert out.shape == query.shape and torch.isfinite(out).all()


def test_plan_is_built_once_a_step_and_shared_by_layers() -> None:
    query, kv_cache, metadata = make_case([1, 4, 1], [10, 4, 20], 4, 2, 32, torch.float32)
    check(query, kv_cache, metadata)
    plan = metadata.host_plan
    assert isinstance(plan, cpu_attention.CpuAttentionPlan)
    other_layer = torch.randn_like(kv_cache)  # the next layer: same metadata, its own cache
    check(query, other_layer, metadata)
    assert metadata.host_plan is plan


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_is_read_as_the_reference_reads_it(query_dtype: torch.dtype) -> None:
    query, kv_cache, metadata = make_case([1, 7, 1], [19, 7, 33], 8, 2, 32, torch.float32)
    check(query.to(query_dtype), (kv_cache * 3).to(torch.float8_e4m3fn), metadata)


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tokens", [7, 1])
def test_qkv_prepare_gives_the_reference_bits(
    dtype: torch.dtype, cache_dtype: torch.dtype | None, qk_norm: bool, tokens: int
) -> None:
    heads, kv_heads, head_dim = 6, 2, 64
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    # q, k and v as the model makes them: views into one projection output.
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in (q, k, v))
    # One rotation for q and k together, a decode row's too (its views' row strides
    # differ, which a single row does not care about).
    assert cpu_attention._side_by_side(q, k) is not None
    positions = torch.tensor([0, 5, 9, 100, 3, 4, 7])[:tokens]
    cos_sin = torch.randn(128, head_dim, generator=generator)
    norms = (randn(head_dim).abs() + 0.5, randn(head_dim).abs() + 0.5) if qk_norm else (None, None)
    slots = torch.tensor([0, 5, 9, 17, 33, 2, 39])[:tokens]
    expected_cache = torch.zeros(2, 10, BLOCK_SIZE, kv_heads, head_dim, dtype=cache_dtype or dtype)
    cache = expected_cache.clone()
    eq, ek = q, k
    if qk_norm:
        eq, ek = reference.rms_norm(q, norms[0], 1e-6), reference.rms_norm(k, norms[1], 1e-6)
    eq = reference.apply_rotary(eq, positions, cos_sin)
    ek = reference.apply_rotary(ek, positions, cos_sin)
    reference.store_kv_cache(ek, v, expected_cache, slots)
    out = cpu_attention.qkv_prepare(q, k, v, positions, cos_sin, cache, slots, *norms, 1e-6)
    assert torch.equal(out, eq)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    # Another layer of the same step (same positions tensor) reuses the rotary tables.
    again = cpu_attention.qkv_prepare(q, k, v, positions, cos_sin, cache, slots, *norms, 1e-6)
    assert torch.equal(again, eq)


def test_a_padding_slot_stores_nothing_as_in_the_reference() -> None:
    """A -1 slot (an EAGLE head's padding rows) writes nowhere; the other rows are stored
    as the reference stores them."""
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 8, generator=generator)
    k, v = torch.randn(3, 1, 8, generator=generator), torch.randn(3, 1, 8, generator=generator)
    positions, cos_sin = torch.tensor([0, 1, 2]), torch.randn(4, 8, generator=generator)
    slots = torch.tensor([0, -1, 5])
    cache = torch.zeros(2, 2, BLOCK_SIZE, 1, 8)
    expected = cache.clone()
    reference.store_kv_cache(reference.apply_rotary(k, positions, cos_sin), v, expected, slots)
    cpu_attention.qkv_prepare(q, k, v, positions, cos_sin, cache, slots, None, None, 1e-6)
    assert torch.equal(cache, expected)
    assert cache.count_nonzero() == expected.count_nonzero() > 0


def test_ops_choose_the_cpu_path_and_reference_on_request(monkeypatch) -> None:
    query, kv_cache, metadata = make_case([1, 3], [5, 3], 4, 2, 16, torch.float32)
    calls = []
    monkeypatch.setattr(cpu_attention, "paged_attention", lambda *a: calls.append("cpu"))
    monkeypatch.setattr(reference, "paged_attention", lambda *a: calls.append("reference"))
    ops.paged_attention(query, kv_cache, metadata, 0.25)
    monkeypatch.setattr(ops, "FORCE_REFERENCE", True)
    ops.paged_attention(query, kv_cache, metadata, 0.25)
    assert calls == ["cpu", "reference"]


def test_metadata_without_decodes_or_without_prefills() -> None:
    for query_lens, seq_lens in (([4, 6], [4, 10]), ([1, 1], [3, 70])):
        query, kv_cache, metadata = make_case(query_lens, seq_lens, 4, 2, 16, torch.float32)
        check(query, kv_cache, metadata)
    metadata = AttentionMetadata.build([1], [1], [[0]], BLOCK_SIZE, "cpu")
    plan = cpu_attention.build_plan(metadata, BLOCK_SIZE)
    assert plan.decode is not None and not plan.chunks


def _decode_steps(seq_lens: list[int], steps: int, window: int | None = None, poison=False):
    """Decode ``steps`` tokens for every sequence as the engine does (each step writes its
    new K/V, then attends), checking each step against the reference; returns the plans."""
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim = 6, 2, 16
    final = [n + steps for n in seq_lens]
    blocks = [-(-n // BLOCK_SIZE) for n in final]
    order = torch.randperm(sum(blocks) + 2, generator=generator).tolist()
    tables = []
    for count in blocks:
        tables.append(order[:count])
        order = order[count:]
    kv_cache = torch.randn(2, sum(blocks) + 2, BLOCK_SIZE, kv_heads, head_dim, generator=generator)
    if poison:
        # A buffer left from an earlier batch of the same shape, full of NaN: rebuilding
        # reuses it and must leave nothing there that attention could read.
        shape = (2, len(seq_lens), kv_heads, 2 * max(final) + 2 * BLOCK_SIZE, head_dim)
        kv_cache._lanner_dense = cpu_attention._DenseKV(-1, torch.full(shape, torch.nan))
    plans = []
    for step in range(steps):
        lens = [n + step for n in seq_lens]
        metadata = AttentionMetadata.build([1] * len(lens), lens, tables, BLOCK_SIZE, "cpu")
        new = torch.randn(2, len(lens), kv_heads, head_dim, generator=generator)
        reference.store_kv_cache(new[0], new[1], kv_cache, metadata.slot_mapping)
        query = torch.randn(len(lens), heads, head_dim, generator=generator)
        out = check(query, kv_cache, metadata, window)
        assert torch.isfinite(out).all()
        plans.append(metadata.host_plan)
    return plans


@pytest.fixture
def small_headroom(monkeypatch: pytest.MonkeyPatch) -> int:
    """Room for 6 tokens: a few steps outgrow the dense copy (the reference is slow)."""
    monkeypatch.setattr(cpu_attention, "DENSE_HEADROOM", 6)
    return 6


@pytest.mark.parametrize("window", [None, 7])
def test_continuing_decodes_append_to_the_dense_copy(
    window: int | None, small_headroom: int
) -> None:
    """Sequences of different lengths decode past block boundaries and past the dense
    copy's room (a rebuild), every step equal to the reference."""
    plans = _decode_steps([3, 40, 17, 1], small_headroom + 8, window)
    continued = [p.decode.continues is not None for p in plans]
    assert not continued[0] and all(continued[1:])


def test_a_reused_dense_buffer_is_cleaned(small_headroom: int) -> None:
    _decode_steps([5, 30, 2], small_headroom + 4, poison=True)


def test_verify_rows_after_rejected_drafts_read_the_rewritten_positions() -> None:
    """A verify step runs a sequence's known token and its k drafts as k + 1 one-token
    rows on one block table. When every draft is rejected the next verify step has the
    same rows, each one token further, and rewrites the rejected drafts' positions: it
    must read them from the paged cache, not from a dense copy of the step before (the
    TP=2 draft-model bug: the worker rank, which runs no draft model between the
    target's steps, kept the copy)."""
    generator = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, k = 4, 2, 16, 3
    # Two sequences at positions 18 and 16, on scattered blocks.
    order = torch.randperm(12, generator=generator).tolist()
    tables = [order[:6], order[6:]]
    kv_cache = torch.randn(2, 12, BLOCK_SIZE, kv_heads, head_dim, generator=generator)
    plans = []
    for start in (18, 19):  # step 2 starts one further: its first token corrects a draft
        positions = [start + i for i in range(k + 1)] + [start - 2 + i for i in range(k + 1)]
        lens = [p + 1 for p in positions]
        rows = [tables[0]] * (k + 1) + [tables[1]] * (k + 1)
        metadata = AttentionMetadata.build([1] * len(lens), lens, rows, BLOCK_SIZE, "cpu")
        new = torch.randn(2, len(lens), kv_heads, head_dim, generator=generator)
        reference.store_kv_cache(new[0], new[1], kv_cache, metadata.slot_mapping)
        check(torch.randn(len(lens), heads, head_dim, generator=generator), kv_cache, metadata)
        plans.append(metadata.host_plan)
    assert plans[1].decode.continues is None


def test_a_batch_that_changes_rebuilds_the_dense_copy() -> None:
    """A step after a different batch (here: a prefill step between) does not continue."""
    query, kv_cache, metadata = make_case([1, 1], [9, 19], 4, 2, 16, torch.float32)
    check(query, kv_cache, metadata)
    make_case([4], [4], 4, 2, 16, torch.float32)  # another step's plan...
    other = make_case([4], [4], 4, 2, 16, torch.float32)
    check(*other)  # ...with a prefill chunk
    again = AttentionMetadata.build(
        [1, 1], [10, 20], metadata.block_tables.tolist(), BLOCK_SIZE, "cpu"
    )
    kv_cache.view(2, -1, 2, 16)[:, again.slot_mapping] = torch.randn(2, 2, 2, 16)
    check(torch.randn(2, 4, 16), kv_cache, again)
    assert again.host_plan.decode.continues is None
