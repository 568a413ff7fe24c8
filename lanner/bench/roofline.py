"""The floor of a workload on its card: bytes every decode step must read over the
measured copy bandwidth, and FLOPs over the measured bf16 matmul rate. A run's GPU
utilization is that floor over the time it took.

Ceilings are measured once per card (a 1 GiB device copy, an 8192^3 bf16 matmul, the
median of repeats timed with CUDA events) and cached in ~/.cache/lanner/ceilings.json,
keyed by card name; `lanner bench ceilings` measures again."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPU_NOTE = "roofline omitted: no GPU (ceilings and floors are measured per CUDA card)"
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def ceilings_path() -> Path:
    override = os.environ.get("LANNER_CEILINGS_PATH")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "lanner" / "ceilings.json"


def _median_ms(fn: Any, repeats: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_rate(repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / (copy_ms / 1e3)


def _matmul_rate(repeats: int, n: int = 8192) -> float:
    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    matmul_ms = _median_ms(lambda: a @ b, repeats)
    return 2 * n**3 / (matmul_ms / 1e3)


def measure_ceilings(repeats: int = 20) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and the bf16 matmul rate."""
    import torch

    bandwidth = copy_rate(repeats)
    flops = _matmul_rate(repeats)
    torch.cuda.empty_cache()
    return {
        "card": torch.cuda.get_device_name(),
        "copy_bytes_per_s": bandwidth,
        "bf16_matmul_flops_per_s": flops,
        "method": f"median of {repeats}: 1 GiB device copy (read+written), 8192^3 bf16 matmul",
    }


def card_ceilings(refresh: bool = False) -> dict[str, Any]:
    """This card's ceilings, from the cache unless absent or `refresh`."""
    import torch

    card = torch.cuda.get_device_name()
    path = ceilings_path()
    cache: dict[str, Any] = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if refresh or card not in cache:
        cache[card] = measure_ceilings()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2) + "\n")
    return cache[card]


@dataclass(frozen=True)
class ModelShape:
    """What the floor needs of a decoder: its matmul weights and its KV cache per token."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int = 2
    # Bytes of the matmul weights as loaded (quantized ones with their scales); None: every
    # matmul parameter at dtype_bytes.
    matmul_weight_bytes: int | None = None

    @classmethod
    def from_config(cls, config: Any, dtype: str | None = None) -> ModelShape:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        # "auto" runs bf16 on a GPU, whatever the checkpoint was saved in.
        dtype_bytes = _DTYPE_BYTES.get(dtype or "auto", 2)
        return cls(
            layers=get("num_hidden_layers"),
            hidden=hidden,
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            intermediate=get("intermediate_size"),
            vocab=get("vocab_size"),
            tied=bool(get("tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: str | None = None) -> ModelShape:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()), dtype)

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies through: the layers' projections and the LM head
        (the input embedding is a row lookup, so it is left out)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q + kv + o + mlp) + self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        if self.matmul_weight_bytes is not None:
            return self.matmul_weight_bytes
        return self.matmul_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def attention_flops(self, context: float) -> float:
        """QK^T and PV for one query token attending to `context` tokens."""
        return 4.0 * self.layers * self.heads * self.head_dim * context


def workload_floor(
    shape: ModelShape,
    requests: Sequence[tuple[int, int]],
    batch_size: int,
) -> dict[str, float]:
    """Bytes and FLOPs a run of (input_len, output_len) requests cannot avoid, with at most
    `batch_size` requests decoding in one step."""
    total_output = sum(out for _, out in requests)
    decode_steps = max(
        max((out for _, out in requests), default=0),
        -(-total_output // max(1, min(batch_size, len(requests)))),
    )
    kv_read = 0.0
    flops = 0.0
    for prompt, out in requests:
        # Decode token t (t = 1..out-1) reads the KV of prompt + t tokens.
        decode_tokens = max(0, out - 1)
        contexts = decode_tokens * prompt + decode_tokens * (decode_tokens + 1) / 2
        kv_read += contexts * shape.kv_bytes_per_token
        tokens = prompt + decode_tokens
        flops += 2.0 * shape.matmul_params * tokens
        flops += shape.attention_flops(prompt * (prompt + 1) / 2 + contexts)
    return {
        "decode_steps": float(decode_steps),
        "bytes": decode_steps * shape.weight_bytes + kv_read,
        "flops": flops,
    }


def utilization(
    floor: dict[str, float], seconds: float, ceilings: dict[str, Any]
) -> dict[str, Any]:
    """The run's floor against its measured time: the bandwidth share when moving bytes
    dominates the floor (decode), the FLOP share when arithmetic does (prefill)."""
    memory_s = floor["bytes"] / ceilings["copy_bytes_per_s"]
    compute_s = floor["flops"] / ceilings["bf16_matmul_flops_per_s"]
    bound = "bandwidth" if memory_s >= compute_s else "compute"
    return {
        "card": ceilings["card"],
        "copy_bytes_per_s": ceilings["copy_bytes_per_s"],
        "bf16_matmul_flops_per_s": ceilings["bf16_matmul_flops_per_s"],
        "floor_bytes": floor["bytes"],
        "floor_flops": floor["flops"],
        "memory_floor_s": memory_s,
        "compute_floor_s": compute_s,
        "measured_s": seconds,
        "bandwidth_share": memory_s / seconds if seconds > 0 else float("nan"),
        "flop_share": compute_s / seconds if seconds > 0 else float("nan"),
        "bound": bound,
        "gpu_utilization": max(memory_s, compute_s) / seconds if seconds > 0 else float("nan"),
    }


def roofline_section(
    shape: ModelShape | None, floor_fn: Any, seconds: float, device: str | None = None
) -> dict[str, Any]:
    """The JSON `roofline` entry: a note on CPU (or without a model shape), else the
    utilization of `floor_fn()` over `seconds` on this card."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return {"note": CPU_NOTE}
    if shape is None:
        return {"note": "roofline omitted: the model's config.json is not known here"}
    return utilization(floor_fn(shape), seconds, card_ceilings())


def format_roofline(section: dict[str, Any]) -> str:
    if "note" in section:
        return section["note"]
    return (
        f"GPU utilization {section['gpu_utilization'] * 100:.1f}% ({section['bound']}-bound) | "
        f"bandwidth share {section['bandwidth_share'] * 100:.1f}% of "
        f"{section['copy_bytes_per_s'] / 1e12:.2f} TB/s | "
        f"FLOP share {section['flop_share'] * 100:.1f}% of "
        f"{section['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s | "
        f"floor {max(section['memory_floor_s'], section['compute_floor_s']):.3f} s "
        f"vs {section['measured_s']:.3f} s"
    )


def run_ceilings(args: Any) -> int:
    import torch

    if not torch.cuda.is_available():
        print(CPU_NOTE)
        return 0
    ceilings = card_ceilings(refresh=True)
    print(
        f"{ceilings['card']}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceilings['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s "
        f"(cached in {ceilings_path()})"
    )
    return 0
