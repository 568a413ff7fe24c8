"""SamplingParams: vLLM's defaults, normalization, and validation messages that name the fix."""

from __future__ import annotations

import pickle

import pytest

from lanner.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    params = SamplingParams()
    assert params.to_dict() == {
        "n": 1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "seed": None,
        "stop": [],
        "stop_token_ids": [],
        "ignore_eos": False,
        "max_tokens": 16,
        "min_tokens": 0,
        "logprobs": None,
        "prompt_logprobs": None,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "detokenize": True,
        "logit_bias": None,
        "allowed_token_ids": None,
        "bad_words": None,
        "bad_words_token_ids": None,
    }
    assert params.sampling_type is SamplingType.RANDOM
    assert not params.uses_penalties and not params.uses_truncation


def test_normalization() -> None:
    params = SamplingParams(stop="###", stop_token_ids=7, top_k=-1)
    assert params.stop == ["###"]
    assert params.stop_token_ids == [7]
    assert params.top_k == 0
    stops = ("a", "b")
    assert SamplingParams(stop=stops).stop == ["a", "b"]  # type: ignore[arg-type]
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("n", 0, "[1, 1024]"),
        ("n", 1.5, "[1, 1024]"),
        ("n", True, "[1, 1024]"),
        ("n", 2**70, "[1, 1024]"),
        ("seed", 2**64, "64-bit"),
        ("seed", -(2**70), "64-bit"),
        ("top_k", 2**64, ">= 1"),
        ("max_tokens", 2**64, "64-bit"),
        ("min_tokens", 2**63, "64-bit"),
        ("stop_token_ids", [2**64], "non-negative"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("temperature", float("inf"), ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, ">= 1"),
        ("top_k", 2.5, ">= 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.01, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("presence_penalty", -2.1, "[-2, 2]"),
        ("frequency_penalty", 3.0, "[-2, 2]"),
        ("max_tokens", 0, ">= 1"),
        ("min_tokens", -1, ">= 0"),
        ("logprobs", -1, f"[0, {MAX_LOGPROBS}]"),
        ("logprobs", MAX_LOGPROBS + 1, f"[0, {MAX_LOGPROBS}]"),
        ("prompt_logprobs", 100, f"[0, {MAX_LOGPROBS}]"),
        ("seed", 1.5, "integer"),
        ("seed", "42", "integer"),
        ("stop", "", "non-empty"),
        ("stop", ["ok", ""], "non-empty"),
        ("stop", [3], "non-empty"),
        ("stop_token_ids", [-1], "non-negative"),
    ],
)
def test_bad_value_names_field_value_and_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field), message
    assert repr(value) in message, message
    assert allowed in message, message


def test_top_p_message_reads_well() -> None:
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)


def test_logprobs_cap_says_why() -> None:
    with pytest.raises(ValueError, match="copied to the host"):
        SamplingParams(logprobs=21)
    assert SamplingParams(logprobs=0, prompt_logprobs=MAX_LOGPROBS).logprobs == 0


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_stop_strings_need_detokenize() -> None:
    with pytest.raises(ValueError, match="detokenize=True"):
        SamplingParams(stop="x", detokenize=False)
    SamplingParams(stop_token_ids=[3], detokenize=False)


def test_unknown_parameter_constructor_and_from_dict() -> None:
    for build in (lambda: SamplingParams(foo=1), lambda: SamplingParams.from_dict({"foo": 1})):
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        assert message.startswith("unknown sampling parameter 'foo'; valid ones are: n, ")
        assert "top_p" in message and "detokenize" in message
    with pytest.raises(ValueError, match="did you mean 'temperature'"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_from_dict_validates_values() -> None:
    params = SamplingParams.from_dict({"temperature": 0.0, "stop": "\n", "max_tokens": None})
    assert params.is_greedy and params.stop == ["\n"] and params.max_tokens is None
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_dict({"temperature": -1})


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        SamplingParams(2)  # type: ignore[misc]


def test_greedy_and_sampling_type() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).sampling_type is SamplingType.GREEDY
    assert not SamplingParams(temperature=0.01).is_greedy
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(top_k=5).uses_truncation
    assert SamplingParams(repetition_penalty=1.2).uses_penalties


def test_clone_copies_lists_and_revalidates() -> None:
    params = SamplingParams(stop=["a"], stop_token_ids=[1], temperature=0.5)
    copy = params.clone(max_tokens=5)
    assert copy.max_tokens == 5 and copy.temperature == 0.5
    copy.stop.append("b")  # type: ignore[union-attr]
    assert params.stop == ["a"]
    with pytest.raises(ValueError, match="top_p"):
        params.clone(top_p=2.0)
    with pytest.raises(ValueError, match="unknown sampling parameter 'bogus'"):
        params.clone(bogus=1)


def test_child_gives_each_sequence_its_own_seed() -> None:
    seeded = SamplingParams(n=3, seed=10)
    children = [seeded.child(i) for i in range(3)]
    assert [c.n for c in children] == [1, 1, 1]
    assert [c.seed for c in children] == [10, 11, 12]
    assert SamplingParams(n=2).child(1).seed is None


def test_pickle_round_trip() -> None:
    params = SamplingParams(n=2, stop=["x"], seed=1, logprobs=3)
    assert pickle.loads(pickle.dumps(params)) == params
