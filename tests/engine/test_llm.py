"""The offline LLM end to end on a tiny model: batching, preemption and sampling never
change a request's output, and every KV block comes back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.engine.outputs import RequestOutput


def make_llm(model_dir: Path, **options) -> LLM:
    options.setdefault("max_num_seqs", 64)
    options.setdefault("max_num_batched_tokens", 96)
    return LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, **options)


def assert_pool_full(llm: LLM) -> None:
    """Every block is free or kept only by the prefix cache; a cache reset frees them all."""
    manager = llm.engine.core.kv_manager
    pool = manager.pool
    assert not manager.block_tables
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free_blocks + manager.num_cached_blocks == pool.num_blocks
    assert llm.reset_prefix_cache()
    assert pool.num_free_blocks == pool.num_blocks


def mixed_requests(count: int, seed: int = 0) -> tuple[list[dict], list[SamplingParams]]:
    """Prompts of varied lengths with every sampling setting in the mix."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(count):
        prompts.append(
            {"prompt_token_ids": [rng.randrange(384) for _ in range(rng.randint(1, 40))]}
        )
        kind = i % 8
        common = dict(max_tokens=rng.randint(1, 24), ignore_eos=True)
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, **common))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.8, seed=i, **common))
        elif kind == 2:
            params.append(SamplingParams(temperature=1.0, top_k=5, seed=i, **common))
        elif kind == 3:
            params.append(SamplingParams(temperature=0.7, top_p=0.8, seed=i, logprobs=3, **common))
        elif kind == 4:
            params.append(SamplingParams(temperature=1.2, min_p=0.1, seed=i, **common))
        elif kind == 5:
            params.append(
                SamplingParams(
                    temperature=0.0,
                    repetition_penalty=1.3,
                    presence_penalty=0.5,
                    frequency_penalty=0.4,
                    **common,
                )
            )
        elif kind == 6:
            params.append(SamplingParams(n=3, temperature=0.9, seed=i, **common))
        else:
            params.append(SamplingParams(temperature=0.0, prompt_logprobs=2, logprobs=1, **common))
    return prompts, params


def summary(output: RequestOutput) -> list:
    return [(c.token_ids, c.finish_reason) for c in output.outputs]


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def alone_outputs(llama_dir: Path) -> list[RequestOutput]:
    llm = make_llm(llama_dir)
    prompts, params = mixed_requests(64)
    return [llm.generate(p, s)[0] for p, s in zip(prompts, params, strict=True)]


def test_batch_of_64_equals_each_request_alone(
    llama_dir: Path, alone_outputs: list[RequestOutput]
) -> None:
    llm = make_llm(llama_dir)
    prompts, params = mixed_requests(64)
    batched = llm.generate(prompts, params)
    for alone, together in zip(alone_outputs, batched, strict=True):
        assert summary(together) == summary(alone)
        if together.prompt_logprobs is not None:
            assert together.prompt_logprobs[0] is None
            assert len(together.prompt_logprobs) == len(together.prompt_token_ids)
    assert_pool_full(llm)


def test_preemption_keeps_outputs(llama_dir: Path, alone_outputs: list[RequestOutput]) -> None:
    # 40 blocks of 4 tokens: far fewer than 64 requests need at once.
    llm = make_llm(llama_dir, num_gpu_blocks_override=40, max_model_len=128)
    prompts, params = mixed_requests(64)
    batched = llm.generate(prompts, params)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for alone, together in zip(alone_outputs, batched, strict=True):
        assert summary(together) == summary(alone)
    assert_pool_full(llm)


def test_seeded_sampling_is_reproducible_across_batches(llama_dir: Path) -> None:
    llm = make_llm(llama_dir)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    target = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    alone = llm.generate(target, params)[0]
    others, other_params = mixed_requests(10, seed=3)
    mixed = llm.generate(
        [*others[:5], target, *others[5:]], [*other_params[:5], params, *other_params[5:]]
    )
    assert mixed[5].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = llm.generate(
        target, SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    )[0]
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
    assert_pool_full(llm)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_n_samples_share_prompt_blocks(llama_dir: Path, enable_prefix_caching: bool) -> None:
    # With caching on the samples find the prompt in the prefix cache; off, they
    # take the first sample's blocks directly.
    llm = make_llm(
        llama_dir, max_num_batched_tokens=64, enable_prefix_caching=enable_prefix_caching
    )
    core = llm.engine.core
    prompt = {"prompt_token_ids": list(range(10, 40))}  # 30 tokens: 7 full blocks of 4
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    llm.engine.add_request("shared", prompt, params)
    shared_seen = 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        tables = [t for rid, t in core.kv_manager.block_tables.items() if rid.startswith("shared")]
        if len(tables) == 4:
            common = set(tables[0]).intersection(*tables[1:])
            shared_seen = max(shared_seen, len(common))
            # four samples, plus the prefix cache's own reference on cached blocks
            cache = core.kv_manager.prefix_cache
            assert all(
                core.kv_manager.pool.ref_count(b) == 4 + bool(cache and cache.is_cached(b))
                for b in common
            )
    assert shared_seen == 7
    outputs = llm.generate(prompt, params)[0].outputs
    assert len({tuple(c.token_ids) for c in outputs}) > 1  # the samples differ
    assert_pool_full(llm)


def test_stop_strings_stop_tokens_and_lengths(llama_dir: Path) -> None:
    llm = make_llm(llama_dir)
    prompt = {"prompt_token_ids": [1, 2, 3, 4]}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = free.outputs[0].text
    tokens = free.outputs[0].token_ids
    assert free.outputs[0].finish_reason == "length" and len(tokens) == 20
    # stop token: the 5th generated token ends the output (and is kept, as vLLM does)
    stopped = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tokens[4]])
    )[0].outputs[0]
    first = tokens.index(tokens[4])
    assert stopped.token_ids == tokens[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == tokens[4]
    # stop string taken from the middle of the greedy text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
        assert out.outputs[0].text == text[: text.index(stop)]
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
        kept = llm.generate(
            prompt,
            SamplingParams(
                temperature=0, max_tokens=20, stop=[stop], include_stop_str_in_output=True
            ),
        )[0]
        assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]
    # min_tokens holds off a stop token
    held = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=20, min_tokens=10, stop_token_ids=[tokens[0]]),
    )[0].outputs[0]
    assert len(held.token_ids) >= 10
    assert_pool_full(llm)


def test_max_model_len_ends_generation(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, max_model_len=32)
    out = llm.generate(
        {"prompt_token_ids": list(range(30))},
        SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
    )[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"
    assert_pool_full(llm)


def test_priority_policy_preempts_lowest_priority(llama_dir: Path) -> None:
    llm = make_llm(
        llama_dir, scheduling_policy="priority", num_gpu_blocks_override=24, max_model_len=64
    )
    prompts = [{"prompt_token_ids": list(range(i, i + 20))} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outputs = llm.generate(prompts, params, priority=[5, 0, 5, 0, 5, 0])
    reference = make_llm(llama_dir)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert (
            out.outputs[0].token_ids == reference.generate(prompt, params)[0].outputs[0].token_ids
        )
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert_pool_full(llm)


def test_abort_frees_everything(llama_dir: Path) -> None:
    llm = make_llm(llama_dir)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    for i in range(5):
        llm.engine.add_request(f"r{i}", {"prompt_token_ids": list(range(1, 30))}, params)
    llm.engine.step()
    llm.engine.step()
    llm.engine.abort_request(["r1", "r3"])
    llm.engine.step()
    llm.engine.abort_request(["r0", "r2", "r4"])
    assert_pool_full(llm)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ({"prompt_token_ids": []}, SamplingParams(), "empty"),
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": list(range(300))}, SamplingParams(), "max_model_len"),
        ({"prompt_token_ids": [1, 999999]}, SamplingParams(), "outside the vocabulary"),
        ({"prompt_token_ids": [-1]}, SamplingParams(), "outside the vocabulary"),
        ({"tokens": [1]}, SamplingParams(), "unknown prompt fields"),
    ],
)
def test_bad_prompt_is_rejected_and_engine_keeps_serving(
    llama_dir: Path, prompt, params, message: str
) -> None:
    llm = make_llm(llama_dir, max_model_len=256)
    llm.engine.add_request(
        "good", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=5, ignore_eos=True)
    )
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", prompt, params)
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    assert outputs[-1].request_id == "good" and len(outputs[-1].outputs[0].token_ids) == 5
    assert_pool_full(llm)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(nonsense=1), "nonsense"),
    ],
)
def test_bad_sampling_params_say_what_to_change(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_unknown_engine_option(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine option 'max_num_seq'"):
        LLM(str(llama_dir), max_num_seq=4)


def test_chat_uses_template(llama_dir: Path) -> None:
    llm = make_llm(llama_dir)
    out = llm.chat(
        [{"role": "user", "content": "hello"}],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
    )[0]
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(out.prompt_token_ids) == "<|user|>hello<|end|><|assistant|>"
    assert len(out.outputs[0].token_ids) == 4


def test_fp8_kv_cache_holds_more_tokens_and_stays_close(llama_dir: Path) -> None:
    """kv_cache_dtype="fp8": the same cache bytes hold 4x the float32 tokens, and prompt
    logprobs (every position read back through the cache) stay near full precision's."""
    budget = 1 << 20
    full = make_llm(llama_dir, kv_cache_memory_bytes=budget)
    fp8 = make_llm(llama_dir, kv_cache_memory_bytes=budget, kv_cache_dtype="fp8")
    assert fp8.engine.core.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    blocks = full.engine.core.num_kv_blocks
    assert 4 * blocks <= fp8.engine.core.num_kv_blocks < 4 * (blocks + 1)
    prompts, _ = mixed_requests(8, seed=3)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    diffs = []
    for a, b in zip(full.generate(prompts, params), fp8.generate(prompts, params), strict=True):
        for token, lp_a, lp_b in zip(
            a.prompt_token_ids[1:], a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True
        ):
            diffs.append(abs(lp_a[token].logprob - lp_b[token].logprob))
    # e4m3 keeps 3 mantissa bits of every K/V element: visible, but small on average
    # (measured on this model: mean 0.04, worst 0.21 nats over 151 positions).
    assert 0 < sum(diffs) / len(diffs) < 0.1
    assert max(diffs) < 0.5
    assert_pool_full(fp8)


def test_unknown_kv_cache_dtype_says_what_is_valid(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or one of"):
        make_llm(llama_dir, kv_cache_dtype="int4")
