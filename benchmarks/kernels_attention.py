"""GPU check and timing of the Triton paged attention kernels at real shapes.

Decode attention is timed against the device copy bandwidth (bytes of K/V read);
prefill attention against torch SDPA (causal, same shapes) in the same run.
Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/kernels_attention.py [--commit SHA]
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import reference
from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.paged_attention import (
    choose_num_kv_splits,
    decode_attention,
    paged_attention,
    prefill_attention,
)

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # llama3-8b


def paged_case(
    query_lens: list[int], seq_lens: list[int], dtype=torch.bfloat16, heads: int = HEADS
):
    """A cache with each sequence's blocks scattered, and queries for the new tokens."""
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    total = sum(blocks)
    order = torch.randperm(total).tolist()
    tables, start = [], 0
    for count in blocks:
        tables.append(order[start : start + count])
        start += count
    kv_cache = torch.randn(2, total, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    query = torch.randn(sum(query_lens), heads, HEAD_DIM, dtype=dtype, device="cuda")
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cuda")
    return query, kv_cache, metadata


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_decode(batch: int, context: int, bandwidth: float, fp8: bool = False) -> dict:
    query, kv_cache, metadata = paged_case([1] * batch, [context] * batch)
    if fp8:  # kv_cache_dtype="fp8": half the bytes to read
        kv_cache = kv_cache.to(torch.float8_e4m3fn)
    scale = HEAD_DIM**-0.5
    out = paged_attention(query, kv_cache, metadata, scale)
    error = relative_error(out, reference.paged_attention(query, kv_cache, metadata, scale))
    ms = triton.testing.do_bench(
        lambda: paged_attention(query, kv_cache, metadata, scale),
        warmup=25,
        rep=200,
        return_mode="median",
    )
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * kv_cache.element_size()
    achieved = kv_bytes / (ms / 1e3)
    # Floor: reading the K/V bytes once at the copy rate (a copy's bytes read + written).
    share = achieved / bandwidth
    return {
        "kernel": "decode-fp8" if fp8 else "decode",
        "batch": batch,
        "context": context,
        "ms": ms,
        "GBps": achieved / 1e9,
        "share_of_copy_bandwidth": share,
        "rel_error": error,
    }


def bench_cascade(batch: int, prefix: int, suffix: int) -> dict:
    """Decodes whose first ``prefix`` tokens share cache blocks (W6-like): the cascade
    kernel reads them once for the batch; timed beside the same step without it."""
    shared = prefix // BLOCK_SIZE
    own = -(-(prefix + suffix) // BLOCK_SIZE) - shared
    kv_cache = torch.randn(
        2, shared + batch * own, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
    )
    order = torch.randperm(batch * own).add(shared).tolist()
    tables = [list(range(shared)) + order[i * own : (i + 1) * own] for i in range(batch)]
    query = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    metadata = AttentionMetadata.build(
        [1] * batch, [prefix + suffix] * batch, tables, BLOCK_SIZE, "cuda"
    )
    scale = HEAD_DIM**-0.5
    expected = reference.paged_attention(query, kv_cache, metadata, scale)
    row = {"kernel": "decode-cascade", "batch": batch, "prefix": prefix, "suffix": suffix}
    for name, prefix_len in (("cascade", metadata.shared_prefix_len_cpu), ("plain", 0)):
        metadata.shared_prefix_len_cpu = prefix_len
        out = paged_attention(query, kv_cache, metadata, scale)
        row[f"{name}_rel_error"] = relative_error(out, expected)
        row[f"{name}_ms"] = triton.testing.do_bench(
            lambda: paged_attention(query, kv_cache, metadata, scale),
            warmup=25,
            rep=200,
            return_mode="median",
        )
    row["speedup"] = row["plain_ms"] / row["cascade_ms"]
    return row


def bench_prefill(batch: int, length: int) -> dict:
    query, kv_cache, metadata = paged_case([length] * batch, [length] * batch)
    scale = HEAD_DIM**-0.5
    out = paged_attention(query, kv_cache, metadata, scale)
    error = None
    if batch * length <= 8192:
        error = relative_error(out, reference.paged_attention(query, kv_cache, metadata, scale))
    ms = triton.testing.do_bench(
        lambda: paged_attention(query, kv_cache, metadata, scale),
        warmup=25,
        rep=200,
        return_mode="median",
    )
    # SDPA on the same work, contiguous and causal (it cannot read a paged cache).
    q = torch.randn(batch, HEADS, length, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    sdpa_ms = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        warmup=25,
        rep=200,
        return_mode="median",
    )
    flops = 4 * batch * HEADS * HEAD_DIM * length * length / 2  # causal half
    return {
        "kernel": "prefill",
        "batch": batch,
        "length": length,
        "ms": ms,
        "TFLOPs": flops / (ms / 1e3) / 1e12,
        "sdpa_ms": sdpa_ms,
        "sdpa_TFLOPs": flops / (sdpa_ms / 1e3) / 1e12,
        "share_of_sdpa": sdpa_ms / ms,
        "rel_error": error,
    }


def sweep_prefill() -> None:
    """Time the prefill kernel's launch configurations on two shapes; print a table."""
    scale = HEAD_DIM**-0.5
    cases = [paged_case([4096] * 8, [4096] * 8), paged_case([1024] * 16, [1024] * 16)]
    for block_m, block_n, warps, stages in (
        (64, 64, 4, 2),
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (64, 128, 4, 3),
        (64, 64, 4, 4),
        (128, 64, 8, 4),
    ):
        times = []
        for query, kv_cache, metadata in cases:
            out = torch.empty_like(query)
            try:
                run = functools.partial(
                    prefill_attention,
                    query,
                    kv_cache,
                    metadata,
                    scale,
                    None,
                    out,
                    block_m,
                    block_n,
                    warps,
                    stages,
                )
                times.append(triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median"))
            except Exception as err:  # a config may not fit in shared memory
                times.append(float("nan"))
                print(f"config {block_m, block_n, warps, stages} failed: {err}")
        print(
            f"prefill M{block_m} N{block_n} w{warps} s{stages}: "
            + "  ".join(f"{t:.3f} ms" for t in times)
        )


def sweep_decode() -> None:
    """Time the decode kernel's tile and launch settings, with the default and twice the
    default number of splits, at llama3-8b (group 4) and qwen3-0.6b (group 2) shapes:
    a bf16 cache, then an fp8 cache widened to bf16 and to fp16; print ms per case."""
    scale = HEAD_DIM**-0.5
    shapes = [(256, 512, HEADS), (32, 4096, HEADS), (256, 768, 16), (48, 1800, 16)]
    shapes.append((256, 1500, HEADS))  # W4-like: 256 requests at 1,000-2,000 tokens
    cases = []
    for batch, context, heads in shapes:
        query, kv_cache, metadata = paged_case([1] * batch, [context] * batch, heads=heads)
        name = f"{batch}x{context}/g{heads // KV_HEADS}"
        fp8 = kv_cache.to(torch.float8_e4m3fn)
        expected = reference.paged_attention(query, kv_cache, metadata, scale)
        expected_fp8 = reference.paged_attention(query, fp8, metadata, scale)
        cases.append((f"{name}-bf16", query, kv_cache, metadata, False, expected))
        cases.append((f"{name}-fp8-as-bf16", query, fp8, metadata, False, expected_fp8))
        cases.append((f"{name}-fp8-as-fp16", query, fp8, metadata, True, expected_fp8))
    print("decode sweep cases: " + "  ".join(c[0] for c in cases))
    # Stages: 2 is one K/V buffer a program (no overlap of its loads with its math), 3
    # two, 4 three.
    configs = [(64, 2, 2, 1), (64, 2, 3, 1), (64, 2, 3, 2), (64, 2, 4, 1), (64, 4, 3, 1)]
    configs += [(128, 4, 2, 1), (128, 4, 3, 1), (32, 2, 3, 1), (32, 2, 4, 1), (64, 1, 3, 1)]
    configs += [(64, 1, 4, 1), (32, 1, 4, 1)]
    configs = [(*c, None) for c in configs]
    # Register caps (Triton's maxnreg): more programs resident per multiprocessor.
    configs += [(64, 2, 3, 1, 168), (128, 4, 2, 1, 168), (128, 4, 3, 1, 168)]
    configs += [(128, 4, 3, 1, 128), (64, 4, 3, 1, 128)]
    for block_n, warps, stages, factor, cap in configs:
        times, worst = [], 0.0
        for _, query, kv_cache, metadata, fp16, expected in cases:
            out = torch.empty_like(query)
            metadata.num_kv_splits = factor * choose_num_kv_splits(
                metadata.num_decode, KV_HEADS, metadata.max_seq_len
            )
            run = functools.partial(decode_attention, query, kv_cache, metadata, scale, None, out)
            run = functools.partial(
                run,
                block_n=block_n,
                num_warps=warps,
                num_stages=stages,
                fp8_as_fp16=fp16,
                max_registers=cap,
            )
            try:
                times.append(triton.testing.do_bench(run, warmup=10, rep=60))
                run()
                worst = max(worst, relative_error(out, expected))
            except Exception as err:  # a config may not fit in shared memory
                times.append(float("nan"))
                print(f"config {block_n, warps, stages} failed: {str(err)[:200]}")
        print(
            f"decode N{block_n} w{warps} s{stages} splits x{factor} regs {cap or '-'}: "
            + "  ".join(f"{t:.4f}" for t in times)
            + f"  (worst relative error {worst:.1e})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--sweep-prefill", action="store_true")
    parser.add_argument("--sweep-decode", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.sweep_prefill or args.sweep_decode:
        if args.sweep_decode:
            sweep_decode()
        if args.sweep_prefill:
            sweep_prefill()
        return
    bandwidth = copy_rate()
    rows = [
        bench_decode(b, c, bandwidth)
        for b, c in ((1, 4096), (32, 4096), (64, 4096), (32, 8192), (128, 1024), (256, 512))
    ]
    rows += [
        bench_decode(b, c, bandwidth, fp8=True) for b, c in ((32, 4096), (256, 512), (256, 1500))
    ]
    rows += [bench_prefill(b, n) for b, n in ((1, 4096), (8, 4096), (16, 1024), (1, 512))]
    # W6's shares of a 2048-token prompt, 64 tokens into decoding.
    rows += [bench_cascade(256, p, 2112 - p) for p in (512, 1024, 1536, 1840)]
    # Extend: 512 new tokens on a 3584-token cached prefix, checked against the reference.
    query, kv_cache, metadata = paged_case([512, 512], [4096, 2048])
    scale = HEAD_DIM**-0.5
    extend_error = relative_error(
        paged_attention(query, kv_cache, metadata, scale),
        reference.paged_attention(query, kv_cache, metadata, scale),
    )
    fp8_cache = kv_cache.to(torch.float8_e4m3fn)
    extend_fp8_error = relative_error(
        paged_attention(query, fp8_cache, metadata, scale),
        reference.paged_attention(query, fp8_cache, metadata, scale),
    )
    result = {
        "workload": "kernels-attention",
        "card": torch.cuda.get_device_name(),
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/kernels_attention.py",
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "rows": rows,
        "extend_rel_error": extend_error,
        "extend_fp8_rel_error": extend_fp8_error,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-kernels-attention.json")
    for row in rows:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(
        f"extend rel error {extend_error:.2e} (fp8 cache {extend_fp8_error:.2e}); "
        f"card {result['card']}; copy {bandwidth / 1e12:.2f} TB/s"
    )


if __name__ == "__main__":
    main()
