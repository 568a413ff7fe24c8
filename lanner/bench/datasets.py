"""Benchmark request sets: random, fixed, shared-prefix, multi-tenant and ShareGPT-format
prompts, each as token ids with the number of output tokens wanted. Everything is seeded."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("random", "fixed", "prefix", "tenants", "sharegpt")


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None  # the ids as text, for endpoints that take text (chat)

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def parse_range(text: str | None) -> tuple[int, int] | None:
    """'A:B' -> (A, B), both ends included; None stays None."""
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep:
        raise ValueError(f"a length range is written A:B, got {text!r}")
    bounds = int(low), int(high)
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"length range {text!r} needs 1 <= A <= B")
    return bounds


def _lengths(rng: random.Random, count: int, fixed: int, span: tuple[int, int] | None) -> list[int]:
    if span is None:
        if fixed < 1:
            raise ValueError(f"lengths must be at least 1, got {fixed}")
        return [fixed] * count
    return [rng.randint(*span) for _ in range(count)]


def _token_ids(rng: random.Random, count: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(count)]


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
    input_range: tuple[int, int] | None = None,
    output_range: tuple[int, int] | None = None,
) -> list[BenchRequest]:
    """Uniform random token ids; each length fixed, or uniform over an inclusive range."""
    rng = random.Random(seed)
    inputs = _lengths(rng, num_prompts, input_len, input_range)
    outputs = _lengths(rng, num_prompts, output_len, output_range)
    return [
        BenchRequest(_token_ids(rng, n_in, vocab_size), n_out)
        for n_in, n_out in zip(inputs, outputs, strict=True)
    ]


def fixed_requests(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """One random prompt repeated: every request is the same."""
    prompt = _token_ids(random.Random(seed), input_len, vocab_size)
    return [BenchRequest(list(prompt), output_len) for _ in range(num_prompts)]


def prefix_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    prefix_share: float,
    seed: int = 0,
) -> list[BenchRequest]:
    """The first `prefix_share` of every prompt is one shared prefix; the rest is random."""
    if not 0.0 <= prefix_share <= 1.0:
        raise ValueError(f"--prefix-share must be in [0, 1], got {prefix_share}")
    rng = random.Random(seed)
    shared = int(round(input_len * prefix_share))
    prefix = _token_ids(rng, shared, vocab_size)
    return [
        BenchRequest(prefix + _token_ids(rng, input_len - shared, vocab_size), output_len)
        for _ in range(num_prompts)
    ]


def tenant_requests(
    num_prompts: int,
    num_tenants: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """Workload W9: each tenant has its own system prompt of `prefix_len` random tokens;
    each request picks a tenant uniformly at random and adds a user turn of `input_len`
    random tokens."""
    if num_tenants < 1 or prefix_len < 0 or input_len < 1:
        raise ValueError(
            f"the tenants dataset needs --num-tenants >= 1, --tenant-prefix-len >= 0 and "
            f"--input-len >= 1, got {num_tenants}, {prefix_len}, {input_len}"
        )
    rng = random.Random(seed)
    prefixes = [_token_ids(rng, prefix_len, vocab_size) for _ in range(num_tenants)]
    return [
        BenchRequest(
            prefixes[rng.randrange(num_tenants)] + _token_ids(rng, input_len, vocab_size),
            output_len,
        )
        for _ in range(num_prompts)
    ]


def sharegpt_requests(
    path: str | Path,
    tokenizer: Any,
    num_prompts: int,
    seed: int = 0,
    max_len: int | None = None,
    output_len: int | None = None,
) -> list[BenchRequest]:
    """A ShareGPT-format JSON list: the first human turn of each conversation is the prompt,
    and the token count of the gpt turn after it the output length (or `output_len`).
    Conversations are shuffled with the seed; too short or too long ones are skipped."""
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a ShareGPT file holds a JSON list of conversations")
    random.Random(seed).shuffle(entries)
    requests: list[BenchRequest] = []
    for entry in entries:
        turns = entry.get("conversations") or entry.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt_ids = tokenizer.encode(turns[0]["value"])
        wanted = output_len or len(tokenizer.encode(turns[1]["value"], add_special_tokens=False))
        if not prompt_ids or wanted < 1:
            continue
        if max_len is not None and len(prompt_ids) + wanted > max_len:
            continue
        requests.append(BenchRequest(prompt_ids, wanted))
        if len(requests) == num_prompts:
            break
    if len(requests) < num_prompts:
        raise ValueError(
            f"{path}: only {len(requests)} usable conversations for {num_prompts} prompts"
        )
    return requests


def add_dataset_args(parser: Any, default_input: int = 128, default_output: int = 128) -> None:
    parser.add_argument("--dataset-name", choices=DATASETS, default="random",
                        help="where prompts come from")  # fmt: skip
    parser.add_argument("--dataset-path", default=None,
                        help="ShareGPT-format JSON file (default: none)")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    parser.add_argument("--input-len", type=int, default=default_input, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=default_output, help="output tokens")
    parser.add_argument("--input-len-range", default=None, help="A:B, uniform, both included "
                        "(default: --input-len for all)")  # fmt: skip
    parser.add_argument("--output-len-range", default=None, help="A:B, uniform, both included "
                        "(default: --output-len for all)")  # fmt: skip
    parser.add_argument(
        "--prefix-share", type=float, default=0.5, help="prefix dataset: shared share of a prompt"
    )
    parser.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="override ShareGPT output lengths (default: the replies' own)",
    )
    parser.add_argument("--num-tenants", type=int, default=16,
                        help="tenants dataset: tenants, each with a system prompt")  # fmt: skip
    parser.add_argument("--tenant-prefix-len", type=int, default=400,
                        help="tenants dataset: tokens of each system prompt (then "
                        "--input-len tokens of user turn)")  # fmt: skip


def build_requests(args: Any, vocab_size: int, tokenizer: Any = None) -> list[BenchRequest]:
    """The request set the parsed flags describe."""
    name = args.dataset_name
    if args.dataset_path is not None and name == "random" and args.input_len_range is None:
        name = "sharegpt"
    seed = args.seed if args.seed is not None else 0
    if name == "random":
        return random_requests(
            args.num_prompts,
            args.input_len,
            args.output_len,
            vocab_size,
            seed,
            parse_range(args.input_len_range),
            parse_range(args.output_len_range),
        )
    if name == "fixed":
        return fixed_requests(args.num_prompts, args.input_len, args.output_len, vocab_size, seed)
    if name == "prefix":
        return prefix_requests(
            args.num_prompts, args.input_len, args.output_len, vocab_size, args.prefix_share, seed
        )
    if name == "tenants":
        return tenant_requests(
            args.num_prompts,
            args.num_tenants,
            args.tenant_prefix_len,
            args.input_len,
            args.output_len,
            vocab_size,
            seed,
        )
    if args.dataset_path is None:
        raise ValueError("the sharegpt dataset needs --dataset-path")
    if tokenizer is None:
        raise ValueError("the sharegpt dataset needs a tokenizer (--tokenizer)")
    return sharegpt_requests(
        args.dataset_path,
        tokenizer,
        args.num_prompts,
        seed,
        getattr(args, "max_model_len", None),
        args.sharegpt_output_len,
    )
