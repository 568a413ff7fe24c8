"""GPU check and timing of the elementwise Triton kernels (RMSNorm, SiLU-and-mul, and the
fused q/k-norm + rotary + KV-cache store) against their pure-torch references at llama3-8b
shapes, and of the sampler's fused exponential race against the unfused torch sequence it
replaced, at W3's decode batch over qwen3-0.6b's vocabulary.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/kernels_elementwise.py --commit $(git rev-parse HEAD)
Each kernel is checked against reference.py at every size and dtype, then timed with
triton.testing.do_bench (launched from Python) and do_bench_cudagraph (replayed from a
CUDA graph, which also proves the kernel is capturable). The floor is bytes moved divided
by the measured device copy bandwidth. Writes one JSON to benchmarks/results/ (and $OUT
when set); exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing

from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import reference
from lanner.kernels.activation import silu_and_mul
from lanner.kernels.qkv_prepare import qkv_prepare
from lanner.kernels.rms_norm import fused_add_rms_norm, rms_norm
from lanner.kernels.sampling import exponential_noise, exponential_race
from lanner.runner.sampler import SamplingRow, sample
from lanner.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

# llama3-8b (benchmarks/shapes/llama3-8b/config.json)
HIDDEN = 4096
INTERMEDIATE = 14336
NUM_HEADS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
MAX_POSITIONS = 8192
BLOCK_SIZE = 16
EPS = 1e-5

# The sampler at W3's decode batch: qwen3-0.6b's vocabulary (benchmarks/shapes/qwen3-0.6b),
# float32 logits, every row unseeded at temperature 0.6.
SAMPLER_ROWS = 256
SAMPLER_VOCAB = 151936
SAMPLER_TEMPERATURE = 0.6

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


@dataclass
class Case:
    """One kernel at one shape: how to run it, its reference, and the bytes it must move."""

    name: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes_moved: int
    # Compares kernel and reference outputs; returns (ok, max abs error, share not bit-equal).
    compare: Callable[[], tuple[bool, float, float]]


def compare_outputs(actual, expected) -> tuple[bool, float, float]:
    if isinstance(expected, torch.Tensor):
        actual, expected = (actual,), (expected,)
    ok, max_error, unequal, total = True, 0.0, 0, 0
    for got, want in zip(actual, expected, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            return False, float("inf"), 1.0
        ok &= torch.allclose(got.float(), want.float(), **TOLERANCE[want.dtype])
        max_error = max(max_error, (got.float() - want.float()).abs().max().item())
        unequal += (got != want).sum().item()
        total += want.numel()
    return bool(ok), max_error, unequal / max(total, 1)


def output_case(name: str, kernel, ref, bytes_moved: int) -> Case:
    return Case(name, kernel, ref, bytes_moved, lambda: compare_outputs(kernel(), ref()))


def qkv_views(tokens: int, dtype: torch.dtype):
    qkv = torch.randn(tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda")
    q, k, v = qkv.to(dtype).split(
        [NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1
    )
    return (
        q.view(tokens, NUM_HEADS, HEAD_DIM),
        k.view(tokens, NUM_KV_HEADS, HEAD_DIM),
        v.view(tokens, NUM_KV_HEADS, HEAD_DIM),
    )


def rope_cache() -> torch.Tensor:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM))
    freqs = torch.outer(torch.arange(MAX_POSITIONS, device="cuda", dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def build_cases(tokens: int, dtype: torch.dtype) -> list[Case]:
    size = torch.finfo(dtype).bits // 8
    x = torch.randn(tokens, HIDDEN, device="cuda").to(dtype)
    residual = (torch.randn(tokens, HIDDEN, device="cuda") * 4).to(dtype)
    weight = torch.randn(HIDDEN, device="cuda").to(dtype)
    head_weight = torch.randn(HEAD_DIM, device="cuda").to(dtype)
    q, k, v = qkv_views(tokens, dtype)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), device="cuda")
    cache = rope_cache()
    gate_up = (torch.randn(tokens, 2 * INTERMEDIATE, device="cuda") * 3).to(dtype)
    q_bytes, k_bytes = q.numel() * size, k.numel() * size
    rope_bytes = tokens * (HEAD_DIM * 4 + 8)  # each token's cos|sin row and its position

    cases = [
        output_case(
            "rms_norm",
            lambda: rms_norm(x, weight, EPS),
            lambda: reference.rms_norm(x, weight, EPS),
            2 * x.numel() * size + HIDDEN * size,
        ),
        output_case(
            "fused_add_rms_norm",
            lambda: fused_add_rms_norm(x, residual, weight, EPS),
            lambda: reference.fused_add_rms_norm(x, residual, weight, EPS),
            4 * x.numel() * size + HIDDEN * size,
        ),
        output_case(
            "qk_norm(q view)",
            lambda: rms_norm(q, head_weight, EPS),
            lambda: reference.rms_norm(q, head_weight, EPS),
            2 * q_bytes + HEAD_DIM * size,
        ),
        output_case(
            "silu_and_mul",
            lambda: silu_and_mul(gate_up),
            lambda: reference.silu_and_mul(gate_up),
            3 * tokens * INTERMEDIATE * size,
        ),
    ]

    # q/k norm + rotary + KV store in one launch: scattered slots over twice the blocks
    # needed, every 7th token padding (-1).
    num_blocks = 2 * triton.cdiv(tokens, BLOCK_SIZE) + 1
    cache_shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kv_cache = torch.zeros(cache_shape, device="cuda", dtype=dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    padding = torch.arange(tokens, device="cuda") % 7 == 6
    slot_mapping = torch.where(padding, -1, slots)
    valid_tokens = tokens - int(padding.sum().item())

    def reference_prepare(target_cache: torch.Tensor) -> torch.Tensor:
        rq = reference.apply_rotary(reference.rms_norm(q, head_weight, EPS), positions, cache)
        rk = reference.apply_rotary(reference.rms_norm(k, head_weight, EPS), positions, cache)
        reference.store_kv_cache(rk, v, target_cache, slot_mapping)
        return rq

    def compare_prepare() -> tuple[bool, float, float]:
        kernel_cache = torch.zeros_like(kv_cache)
        expected_cache = torch.zeros_like(kv_cache)
        out = qkv_prepare(
            q, k, v, positions, cache, kernel_cache, slot_mapping, head_weight, head_weight, EPS
        )
        q_ok, q_error, q_unequal = compare_outputs(out, reference_prepare(expected_cache))
        c_ok, c_error, c_unequal = compare_outputs(kernel_cache, expected_cache)
        return q_ok and c_ok, max(q_error, c_error), max(q_unequal, c_unequal)

    cases.append(
        Case(
            "qkv_prepare(views, qk-norm)",
            lambda: qkv_prepare(
                q, k, v, positions, cache, kv_cache, slot_mapping, head_weight, head_weight, EPS
            ),
            lambda: reference_prepare(kv_cache),
            # read q, k, v and the rope rows; write q and (valid tokens') K/V into the cache
            2 * q_bytes
            + k_bytes
            + k_bytes
            + rope_bytes
            + 2 * valid_tokens * NUM_KV_HEADS * HEAD_DIM * size,
            compare_prepare,
        )
    )
    return cases


def sampler_case() -> tuple[Case, Callable[[], object]]:
    """The fused race (reference: the unfused softmax, [B, V] noise, divide and argmax it
    replaced), and the runner's whole sample() with its host-side preparation. bytes_moved
    is the logits read once: the race writes nothing of size V."""
    logits = torch.randn(SAMPLER_ROWS, SAMPLER_VOCAB, device="cuda") * 3
    temperatures = torch.full((SAMPLER_ROWS,), SAMPLER_TEMPERATURE, device="cuda")
    seed_list = list(range(SAMPLER_ROWS))
    seeds = torch.tensor(seed_list, device="cuda")
    rows = [
        SamplingRow(SamplingParams(temperature=SAMPLER_TEMPERATURE), [1], [], (0,))
        for _ in range(SAMPLER_ROWS)
    ]

    def unfused() -> torch.Tensor:
        probs = torch.softmax(logits / SAMPLER_TEMPERATURE, dim=-1)
        noise = exponential_noise(seed_list, SAMPLER_VOCAB, logits.device)
        return (probs / noise).argmax(dim=-1)

    def compare() -> tuple[bool, float, float]:
        """Against torch's argmax of the same formula over the same noise: Triton's log and
        torch's may differ in the last bit, so a pick may differ only at a near-tie."""
        chosen = exponential_race(logits, temperatures, seeds)
        noise = exponential_noise(seed_list, SAMPLER_VOCAB, logits.device)
        scores = logits / SAMPLER_TEMPERATURE - noise.log()
        best = scores.max(dim=-1).values
        shortfall = best - scores.gather(1, chosen.unsqueeze(1)).squeeze(1)
        ok = bool((shortfall <= 1e-5 * best.abs().clamp(min=1.0)).all())
        differs = (chosen != scores.argmax(dim=-1)).float().mean().item()
        return ok, shortfall.max().item(), differs

    case = Case(
        f"sampler(T={SAMPLER_TEMPERATURE})",
        lambda: exponential_race(logits, temperatures, seeds),
        unfused,
        logits.numel() * logits.element_size(),
        compare,
    )
    return case, lambda: sample(logits, rows)


def time_case(case: Case, bandwidth: float) -> dict:
    ok, max_error, unequal = case.compare()
    eager_ms = triton.testing.do_bench(case.kernel, return_mode="median")
    reference_ms = triton.testing.do_bench(case.reference, return_mode="median")
    try:
        graph_ms = triton.testing.do_bench_cudagraph(case.kernel, return_mode="median")
        graph_error = None
    except Exception as error:  # a kernel that syncs or allocates badly fails capture
        graph_ms, graph_error = None, repr(error)
    floor_ms = case.bytes_moved / bandwidth * 1e3
    best_ms = min(t for t in (eager_ms, graph_ms) if t is not None)
    return {
        "kernel": case.name,
        "ok": ok and graph_error is None,
        "max_abs_error": max_error,
        "share_not_bit_equal": unequal,
        "bytes_moved": case.bytes_moved,
        "triton_us": eager_ms * 1e3,
        "triton_graph_us": None if graph_ms is None else graph_ms * 1e3,
        "reference_us": reference_ms * 1e3,
        "floor_us": floor_ms * 1e3,
        "GBps": case.bytes_moved / (best_ms * 1e-3) / 1e9,
        "share_of_copy_bandwidth": floor_ms / best_ms,
        "speedup_over_reference": reference_ms / eager_ms,
        "graph_capture_error": graph_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--tokens", default="1,64,4096", help="comma-separated token counts")
    parser.add_argument(
        "--dtypes", default="bfloat16,float16,float32", help="comma-separated torch dtypes"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for tokens in (int(t) for t in args.tokens.split(",")):
            for case in build_cases(tokens, dtype):
                row = {"dtype": dtype_name, "tokens": tokens, **time_case(case, bandwidth)}
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    case, runner_sample = sampler_case()
    row = {"dtype": "float32", "tokens": SAMPLER_ROWS, **time_case(case, bandwidth)}
    row["vocab"] = SAMPLER_VOCAB
    row["sample_fn_us"] = triton.testing.do_bench(runner_sample, return_mode="median") * 1e3
    rows.append(row)
    print_row(row, header=len(rows) == 1)
    print(f"sampler: sample() with host preparation {row['sample_fn_us']:.1f} us", flush=True)

    result = {
        "workload": "kernels-elementwise",
        "model": "llama3-8b",
        "card": card,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/kernels_elementwise.py "
        + " ".join(sys.argv[1:]),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "timing": (
            "medians: triton_us/reference_us from do_bench (L2 flushed, Python launch included),"
            " triton_graph_us from do_bench_cudagraph (L2 not flushed: small shapes may beat"
            " the HBM floor); GBps and share use the faster of the two triton timings."
            " The sampler row (tokens = rows, vocab 151936): triton = the fused race,"
            " reference = the unfused torch sequence, bytes = the logits read once,"
            " sample_fn_us = the runner's sample() with its host preparation (do_bench)"
        ),
        "rows": rows,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    save_copies(result, RESULTS, f"{stamp}-kernels-elementwise.json")
    failed = [f"{r['kernel']} {r['dtype']} x{r['tokens']}" for r in rows if not r["ok"]]
    print(f"card: {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("all checks passed" if not failed else f"FAILED: {failed}")
    sys.exit(1 if failed else 0)


def print_row(row: dict, header: bool) -> None:
    columns = (
        ("kernel", 24, "{}"),
        ("dtype", 10, "{}"),
        ("tokens", 7, "{}"),
        ("ok", 6, "{}"),
        ("max_abs_error", 11, "{:.2e}"),
        ("triton_us", 10, "{:.2f}"),
        ("triton_graph_us", 10, "{:.2f}"),
        ("reference_us", 10, "{:.2f}"),
        ("floor_us", 9, "{:.2f}"),
        ("GBps", 8, "{:.0f}"),
        ("share_of_copy_bandwidth", 8, "{:.2f}"),
    )
    if header:
        names = {"max_abs_error": "max_err", "triton_graph_us": "graph_us"}
        names |= {"reference_us": "torch_us", "share_of_copy_bandwidth": "share"}
        print("".join(f"{names.get(name, name):>{width}}" for name, width, _ in columns))
    cells = []
    for name, width, fmt in columns:
        value = row[name]
        cells.append(f"{'-' if value is None else fmt.format(value):>{width}}")
    print("".join(cells), flush=True)


if __name__ == "__main__":
    main()
