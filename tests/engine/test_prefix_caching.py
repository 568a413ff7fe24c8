"""Prefix caching end to end: outputs never change with caching on, and hits are
exactly the whole blocks a workload shares."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lanner import LLM, SamplingParams
from lanner.engine.request import Request
from lanner.engine.scheduler import Scheduler, SchedulerConfig
from lanner.memory.kv_cache_manager import KVCacheManager
from lanner.memory.prefix_cache import PrefixCacheStats
from tests.engine.test_llm import assert_pool_full, make_llm, mixed_requests, summary

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


def stats(llm: LLM) -> PrefixCacheStats:
    result = llm.engine.core.kv_manager.prefix_cache_stats
    assert result is not None
    return result


def assert_same_logprobs(got: list | None, want: list | None) -> None:
    """Same tokens and ranks; values equal up to float noise (batches differ in shape)."""
    assert (got is None) == (want is None)
    for got_position, want_position in zip(got or [], want or [], strict=True):
        if want_position is None:
            assert got_position is None
            continue
        assert got_position.keys() == want_position.keys()
        for token, logprob in want_position.items():
            assert got_position[token].rank == logprob.rank
            assert got_position[token].logprob == pytest.approx(logprob.logprob, abs=1e-4)


def shared_prefix_prompts(count: int, prefix_len: int = 33, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    prefix = [rng.randrange(384) for _ in range(prefix_len)]
    return [
        {"prompt_token_ids": prefix + [rng.randrange(384) for _ in range(rng.randint(1, 9))]}
        for _ in range(count)
    ]


def test_shared_prefix_hits_whole_blocks_and_keeps_outputs(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts(5)
    off = make_llm(llama_dir, enable_prefix_caching=False)
    expected = [summary(out) for out in off.generate(prompts, GREEDY)]
    assert off.engine.core.kv_manager.prefix_cache is None
    llm = make_llm(llama_dir)
    first = llm.generate(prompts[0], GREEDY)[0]
    assert stats(llm).hit_tokens == 0
    assert stats(llm).queried_tokens == len(prompts[0]["prompt_token_ids"])
    rest = llm.generate(prompts[1:], GREEDY)
    # 33 shared tokens with block_size 4: 8 whole blocks, 32 tokens, for each later request.
    assert stats(llm).hit_tokens == 4 * 32
    assert stats(llm).queried_tokens == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert 0 < stats(llm).hit_rate < 1
    assert [summary(out) for out in [first, *rest]] == expected
    assert_pool_full(llm)
    assert_pool_full(off)


def test_one_batch_with_small_budget_matches_caching_off(llama_dir: Path) -> None:
    # A budget of 16 tokens admits the batch over several steps, so later requests
    # find blocks that earlier ones computed in the same run.
    prompts = shared_prefix_prompts(8, prefix_len=30, seed=1)
    off = make_llm(llama_dir, enable_prefix_caching=False, max_num_batched_tokens=16)
    on = make_llm(llama_dir, max_num_batched_tokens=16)
    assert [summary(o) for o in on.generate(prompts, GREEDY)] == [
        summary(o) for o in off.generate(prompts, GREEDY)
    ]
    assert stats(on).hit_tokens > 0
    assert_pool_full(on)


def test_multi_turn_conversation_reuses_the_previous_turn(llama_dir: Path) -> None:
    turn1 = {"prompt_token_ids": list(range(40, 63))}  # 23 tokens
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    on, off = make_llm(llama_dir), make_llm(llama_dir, enable_prefix_caching=False)
    out1 = on.generate(turn1, params)[0]
    assert summary(out1) == summary(off.generate(turn1, params)[0])
    reply = out1.outputs[0].token_ids
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + reply + [7, 8, 9, 10, 11]}
    before = stats(on).hit_tokens
    out2 = on.generate(turn2, params)[0]
    assert summary(out2) == summary(off.generate(turn2, params)[0])
    # Turn 1 computed K/V for its prompt and all but its last reply token: 23 + 10 - 1
    # = 32 tokens, 8 whole blocks, all of which turn 2 starts on.
    assert stats(on).hit_tokens - before == 32
    assert_pool_full(on)


def test_n_samples_hit_the_cache_and_match_caching_off(llama_dir: Path) -> None:
    prompt = {"prompt_token_ids": list(range(10, 40))}  # 30 tokens: 7 whole blocks
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    on, off = make_llm(llama_dir), make_llm(llama_dir, enable_prefix_caching=False)
    assert summary(on.generate(prompt, params)[0]) == summary(off.generate(prompt, params)[0])
    assert stats(on).hit_tokens == 3 * 28  # the three later samples share the prompt
    assert_pool_full(on)
    assert_pool_full(off)


def test_preemption_and_eviction_keep_outputs(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts(12, prefix_len=21, seed=2)
    prompts += mixed_requests(12, seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    off = make_llm(llama_dir, enable_prefix_caching=False)
    expected = [summary(o) for o in off.generate(prompts, params)]
    on = make_llm(llama_dir, num_gpu_blocks_override=40, max_model_len=128)
    assert [summary(o) for o in on.generate(prompts, params)] == expected
    assert on.engine.core.scheduler.num_preemptions > 0
    assert stats(on).evicted_blocks > 0
    assert_pool_full(on)


def test_mixed_sampling_batch_matches_caching_off(llama_dir: Path) -> None:
    # Every sampling setting, prompt logprobs included (those positions must run, so
    # such requests may not start on cached blocks they still owe logprobs for).
    prompts, params = mixed_requests(24, seed=9)
    prompts = [
        {"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8] + p["prompt_token_ids"]} for p in prompts
    ]
    off = make_llm(llama_dir, enable_prefix_caching=False, max_num_batched_tokens=32)
    on = make_llm(llama_dir, max_num_batched_tokens=32)
    for got, want in zip(on.generate(prompts, params), off.generate(prompts, params), strict=True):
        assert summary(got) == summary(want)
        assert_same_logprobs(got.prompt_logprobs, want.prompt_logprobs)
    assert stats(on).hit_tokens > 0
    assert_pool_full(on)


def test_aborts_leave_the_cache_consistent(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts(6, prefix_len=25, seed=3)
    on, off = make_llm(llama_dir), make_llm(llama_dir, enable_prefix_caching=False)
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        on.engine.add_request(f"a{index}", prompt, long)
    for _ in range(3):
        on.engine.step()
    on.engine.abort_request(["a0", "a2", "a4"])
    on.engine.step()
    on.engine.abort_request(["a1", "a3", "a5"])
    manager = on.engine.core.kv_manager
    assert not manager.block_tables
    assert manager.num_free_blocks + manager.num_cached_blocks == manager.pool.num_blocks
    # What the aborted requests cached serves the next ones without changing them.
    before = stats(on).hit_tokens
    got = [summary(o) for o in on.generate(prompts, GREEDY)]
    assert got == [summary(o) for o in off.generate(prompts, GREEDY)]
    assert stats(on).hit_tokens - before >= 6 * 24
    assert_pool_full(on)


def test_reset_prefix_cache_and_switching_it_off(llama_dir: Path) -> None:
    llm = make_llm(llama_dir)
    llm.generate(shared_prefix_prompts(2), GREEDY)
    assert llm.engine.core.kv_manager.num_cached_blocks > 0
    assert llm.reset_prefix_cache()
    assert llm.engine.core.kv_manager.num_cached_blocks == 0
    off = make_llm(llama_dir, enable_prefix_caching=False)
    assert off.engine.core.config.cache.enable_prefix_caching is False
    assert off.engine.core.kv_manager.prefix_cache_stats is None
    assert off.reset_prefix_cache()


def test_reset_while_running_keeps_blocks_in_use(llama_dir: Path) -> None:
    llm = make_llm(llama_dir)
    llm.engine.add_request("r", {"prompt_token_ids": list(range(1, 30))}, GREEDY)
    llm.engine.step()
    manager = llm.engine.core.kv_manager
    assert manager.num_cached_blocks == 7
    assert not llm.reset_prefix_cache()  # the running request holds them
    assert manager.num_cached_blocks == 7
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_pool_full(llm)


def test_lpm_admits_the_longest_cached_prefix_first() -> None:
    manager = KVCacheManager(32, 4)
    config = SchedulerConfig(max_model_len=128, max_num_seqs=1, policy="lpm")
    scheduler = Scheduler(config, manager)
    cached = list(range(100, 116))  # 4 whole blocks
    manager.allocate_slots("seed", 16)
    manager.cache_full_blocks("seed", 16, lambda s, e: cached[s:e])
    manager.free("seed")
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    requests = [
        Request("none", [1, 2, 3, 4, 5, 6], params, arrival_time=1.0),
        Request("short", cached[:8] + [9, 9], params, arrival_time=2.0),
        Request("long", cached + [9], params, arrival_time=3.0),
        Request("short-later", cached[:8] + [8, 8], params, arrival_time=4.0),
    ]
    for request in requests:
        scheduler.add_request(request)
    order = []
    while scheduler.num_unfinished:
        out = scheduler.schedule()
        scheduler.update_after_step(out)
        for scheduled in out.scheduled:
            order.append(scheduled.request.request_id)
            scheduled.request.output_token_ids.append(1)
            scheduler.finish_request(
                scheduled.request.request_id, *scheduler.check_stop(scheduled.request)
            )
    assert order == ["long", "short", "short-later", "none"]


def test_lpm_engine_keeps_outputs(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts(6, seed=4) + shared_prefix_prompts(6, seed=6)
    lpm = make_llm(llama_dir, scheduling_policy="lpm", max_num_batched_tokens=16)
    fcfs = make_llm(llama_dir, enable_prefix_caching=False)
    assert [summary(o) for o in lpm.generate(prompts, GREEDY)] == [
        summary(o) for o in fcfs.generate(prompts, GREEDY)
    ]
    assert stats(lpm).hit_tokens > 0
    assert_pool_full(lpm)


def test_unknown_policy_names_lpm() -> None:
    with pytest.raises(ValueError, match="lpm"):
        SchedulerConfig(max_model_len=8, policy="longest")
