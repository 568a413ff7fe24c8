"""The engine's front half (OutputProcessor via LLMEngine/LLM): bad input is refused
before anything is queued, stop tokens leave the text, aborts take ids, and a lost
request fails loudly instead of spinning."""

from __future__ import annotations

from pathlib import Path

import pytest

from lanner import LLM, SamplingParams
from lanner.engine.request import FinishReason, Request
from tests.engine.test_llm import assert_pool_full, make_llm


@pytest.fixture(scope="module")
def llm(tiny_model_dirs: dict[str, Path]) -> LLM:
    return make_llm(tiny_model_dirs["llama"])


def run_all(llm: LLM) -> list:
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    return outputs


@pytest.mark.parametrize(
    ("request_id", "priority", "message"),
    [(7, 0, "request_id must be a str"), ("a", "high", "priority must be an int"),
     ("a", 1.5, "priority must be an int"), ("a", True, "priority must be an int")],
)  # fmt: skip
def test_bad_request_id_or_priority_queues_nothing(
    llm: LLM, request_id: object, priority: object, message: str
) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(request_id, {"prompt_token_ids": [1, 2]}, params, priority)  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.core.scheduler.requests and not llm.engine.core.scheduler.waiting
    llm.engine.add_request("ok", {"prompt_token_ids": [1, 2]}, params, priority=3)
    assert len(run_all(llm)[-1].outputs[0].token_ids) == 3
    assert_pool_full(llm)


@pytest.mark.parametrize(
    ("params", "priority", "message"),
    [
        ([SamplingParams(), "not params", SamplingParams()], None, "prompt 1: sampling params"),
        (SamplingParams(), [0, "x", 0], "prompt 1: priority must be an int"),
    ],
)
def test_generate_validates_everything_before_queueing(
    llm: LLM, params: object, priority: object, message: str
) -> None:
    prompts = [{"prompt_token_ids": [1, 2, 3]}] * 3
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params, priority=priority)  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.core.scheduler.requests
    assert_pool_full(llm)


def test_stop_token_text_is_left_out(llm: LLM) -> None:
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    stop_token = tokens[3]
    cut = tokens.index(stop_token) + 1
    tokenizer = llm.get_tokenizer()
    for include in (False, True):
        out = llm.generate(
            prompt,
            SamplingParams(
                temperature=0,
                max_tokens=12,
                stop_token_ids=[stop_token],
                include_stop_str_in_output=include,
            ),
        )[0].outputs[0]
        assert out.token_ids == tokens[:cut]  # the stop token stays in token_ids
        kept = tokens[:cut] if include else tokens[: cut - 1]
        assert out.text == tokenizer.decode(kept, clean_up_tokenization_spaces=False)
        assert out.released_text == out.text
    # EOS too: text made of everything before it
    eos = llm.engine.tokenizer.eos_token_id
    llm.engine.add_request(
        "eos", {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=3, stop_token_ids=[])
    )
    out = run_all(llm)[-1].outputs[0]
    if out.token_ids[-1] == eos:
        assert "<|endoftext|>" not in out.text


def test_abort_request_takes_a_single_id(llm: LLM) -> None:
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    for request_id in ("12", "1", "2"):
        llm.engine.add_request(request_id, {"prompt_token_ids": [1, 2, 3]}, params)
    llm.engine.step()
    llm.engine.abort_request("12")  # not "1" and "2"
    assert set(llm.engine.processor.states) == {"1", "2"}
    finished = {o.request_id for o in run_all(llm) if o.finished}
    assert finished == {"1", "2"}
    assert_pool_full(llm)


@pytest.mark.parametrize("others_running", [False, True])
def test_step_raises_when_the_core_lost_requests(llm: LLM, others_running: bool) -> None:
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    llm.engine.add_request("lost", {"prompt_token_ids": [1, 2, 3]}, params)
    if others_running:
        llm.engine.add_request("busy", {"prompt_token_ids": [4, 5, 6]}, params)
        llm.engine.step()
    llm.engine.core.abort_requests(["lost#0"])  # behind the front end's back
    with pytest.raises(RuntimeError, match=r"\['lost'\] are unknown to the engine core"):
        for _ in range(100):
            llm.engine.step()
    assert set(llm.engine.processor.states) == ({"busy"} if others_running else set())
    llm.engine.abort_request("busy")
    assert_pool_full(llm)


def test_scheduler_refuses_bad_priority_without_a_trace(llm: LLM) -> None:
    scheduler = llm.engine.core.scheduler
    good = Request("fine", [1, 2], SamplingParams(), priority=0)
    bad = Request("odd", [1, 2], SamplingParams(), priority="2")  # type: ignore[arg-type]
    scheduler.add_request(good)
    with pytest.raises(ValueError, match="priority must be an int"):
        scheduler.add_request(bad)
    assert list(scheduler.requests) == ["fine"] and scheduler.waiting == [good]
    scheduler.finish_request("fine", FinishReason.ABORT)
    assert_pool_full(llm)
