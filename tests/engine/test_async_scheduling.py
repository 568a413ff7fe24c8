"""Overlapped scheduling (step N+1 launched before step N is read) must give exactly the
outputs of the synchronous engine, under batching, preemption, stops, n > 1 and caching."""

from __future__ import annotations

from pathlib import Path

import pytest

from lanner import SamplingParams
from tests.engine.test_llm import assert_pool_full, make_llm, mixed_requests, summary


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("blocks", [None, 40])
def test_async_equals_sync(llama_dir: Path, caching: bool, blocks: int | None) -> None:
    """Mixed sampling settings (penalties make some steps wait, the rest run ahead),
    with and without a cache so small that requests are preempted."""
    prompts, params = mixed_requests(48, seed=4)
    options = dict(enable_prefix_caching=caching, num_gpu_blocks_override=blocks, max_model_len=128)
    sync = make_llm(llama_dir, async_scheduling=False, **options).generate(prompts, params)
    llm = make_llm(llama_dir, async_scheduling=True, **options)
    overlapped = llm.generate(prompts, params)
    for a, b in zip(sync, overlapped, strict=True):
        assert summary(a) == summary(b)
        assert [c.text for c in a.outputs] == [c.text for c in b.outputs]
    if blocks:
        assert llm.engine.core.scheduler.num_preemptions > 0
    assert_pool_full(llm)


def test_async_stops_exactly_where_sync_stops(llama_dir: Path) -> None:
    """EOS-like stop tokens and stop strings are read a step late; the extra token the
    device computed must not leak into the output."""
    prompt = {"prompt_token_ids": [5, 9, 2, 7]}
    free = (
        make_llm(llama_dir, async_scheduling=False)
        .generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
        .outputs[0]
    )
    stop_token = free.token_ids[6]
    stop_text = free.text[len(free.text) // 3 : len(free.text) // 3 + 2]
    cases = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop=[stop_text], ignore_eos=True),
        SamplingParams(
            temperature=0.9, seed=3, max_tokens=12, min_tokens=5, stop_token_ids=[stop_token]
        ),
    ]
    for params in cases:
        sync = make_llm(llama_dir, async_scheduling=False).generate(prompt, params)[0]
        llm = make_llm(llama_dir, async_scheduling=True)
        overlapped = llm.generate(prompt, params)[0]
        assert summary(overlapped) == summary(sync)
        assert overlapped.outputs[0].text == sync.outputs[0].text
        assert_pool_full(llm)


def test_abort_while_a_step_is_in_flight(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, async_scheduling=True)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    for i in range(4):
        llm.engine.add_request(f"r{i}", {"prompt_token_ids": list(range(1, 20))}, params)
    for _ in range(3):
        llm.engine.step()
    llm.engine.abort_request(["r0", "r2"])
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_pool_full(llm)
