"""IncrementalDetokenizer on a real byte-level BPE: split characters, stop strings, specials."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lanner.engine.detokenizer import (
    IncrementalDetokenizer,
    decode_token,
    decode_tokens,
)
from lanner.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "héllo wörld 日本語 😀 hello world",
    "The café serves crème brûlée; naïve façade. Ünïcödé everywhere!",
    "def main():\n    print('hello')  # 日本語のコメント\n",
    "emoji: 😀😃😄 🚀 ✨ — dashes – and “quotes”",
] * 10
TEXTS = [
    "héllo wörld 日本語 😀",
    "The café serves crème brûlée 🚀✨",
    "日本語のコメント😀😃😄",
    "plain ascii text, nothing special",
    "mixed 😀a日b🚀c",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # Few merges on purpose, so most non-ASCII characters span several tokens.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def stream(
    tokenizer: Any,
    ids: list[int],
    prompt: list[int] | None = None,
    chunk: int = 1,
    **params: Any,
) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [], SamplingParams(**params))
    deltas = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.finish())
    return deltas, detok


def test_characters_really_span_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("日本語 😀")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_add_up_to_the_full_decode(
    tokenizer: PreTrainedTokenizerFast, text: str, chunk: int
) -> None:
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Say something: ")
    deltas, detok = stream(tokenizer, ids, prompt=prompt, chunk=chunk)
    assert "".join(deltas) == text == detok.text == tokenizer.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert detok.token_ids == ids and not detok.stopped
    assert deltas[-1] == ""  # valid text: nothing was left to flush


def test_each_character_streams_as_soon_as_it_is_complete(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = tokenizer.encode("日本")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for count, token_id in enumerate(ids, start=1):
        detok.add_tokens([token_id])
        assert detok.text == tokenizer.decode(ids[:count]).rstrip("\ufffd")


def test_prompt_context_does_not_leak_into_output(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = tokenizer.encode("héllo")
    ids = tokenizer.encode(" wörld")
    deltas, detok = stream(tokenizer, ids, prompt=prompt)
    assert detok.text == " wörld"


def test_prompt_ending_inside_a_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("日本語x")
    split = next(i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i]))
    prompt, output = ids[:split], ids[split:]
    deltas, detok = stream(tokenizer, output, prompt=prompt)
    assert "".join(deltas) == detok.text == tokenizer.decode(output)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    ids = (
        tokenizer.encode("<|im_start|>héllo")
        + tokenizer.convert_tokens_to_ids(["<|im_end|>"])
        + tokenizer.encode("日本<|endoftext|>")
    )
    deltas, detok = stream(tokenizer, ids, skip_special_tokens=skip)
    expected = "héllo日本" if skip else "<|im_start|>héllo<|im_end|>日本<|endoftext|>"
    assert "".join(deltas) == detok.text == expected
    assert expected == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        ("日本", False, "héllo wörld "),
        ("日本", True, "héllo wörld 日本"),
        ("ld 日", False, "héllo wör"),  # spans ASCII and a split character
        ("ld 日", True, "héllo wörld 日"),
        ("ö", False, "héllo w"),
        ("😀", True, "héllo wörld 日本語 😀"),
        ("nowhere", False, "héllo wörld 日本語 😀 tail"),
    ],
)
def test_stop_strings_across_token_boundaries(
    tokenizer: PreTrainedTokenizerFast, stop: str, include: bool, expected: str
) -> None:
    ids = tokenizer.encode("héllo wörld 日本語 😀 tail")
    deltas, detok = stream(tokenizer, ids, stop=[stop], include_stop_str_in_output=include)
    assert detok.text == expected
    assert "".join(deltas) == expected
    assert detok.stopped == (stop in expected or not include and stop != "nowhere")
    if detok.stopped:
        assert detok.stop_reason == stop
        # tokens after the one that completed the stop string are not taken
        assert len(detok.token_ids) < len(ids)
        assert stop in tokenizer.decode(detok.token_ids)
        assert stop not in tokenizer.decode(detok.token_ids[:-1])


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("one two three")
    _, detok = stream(tokenizer, ids, stop=["three", "two", "wo"])
    assert detok.text == "one " and detok.stop_reason == "two"


def test_stop_prefix_is_held_back_while_undecided(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="STOP"))
    released = ""
    for token_id in tokenizer.encode("a ST"):
        released += detok.add_tokens([token_id])
    assert released == "a " and detok.text == "a ST"
    for token_id in tokenizer.encode("OP!"):
        released += detok.add_tokens([token_id])
    assert released == "a " and detok.text == "a " and detok.stop_reason == "STOP"

    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="STOP"))
    released = "".join(detok.add_tokens([t]) for t in tokenizer.encode("a STAR"))
    assert released == "a STAR"  # "STA" stopped being a possible start at "R"


def test_held_back_stop_prefix_flushes_on_finish(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="STOP"))
    released = detok.add_tokens(tokenizer.encode("end ST"))
    assert released == "end "
    assert detok.add_tokens([], finished=True) == "ST"
    assert detok.text == "end ST" and not detok.stopped


def test_stop_strings_wait_for_min_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("ab ab ab ab")
    _, detok = stream(tokenizer, ids, stop="ab")
    assert detok.text == "" and detok.stop_reason == "ab"
    # The first "ab" comes before min_tokens; the check starts with the token that
    # reaches it, and finds the second "ab" there.
    min_tokens = len(tokenizer.encode("ab ab"))
    _, detok = stream(tokenizer, ids, stop="ab", min_tokens=min_tokens)
    assert detok.text == "ab " and detok.stop_reason == "ab"
    assert len(detok.token_ids) == min_tokens


def test_incomplete_character_is_flushed_at_finish(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("日本")
    partial = ids[:-1]  # the last character is cut
    deltas, detok = stream(tokenizer, partial)
    assert "".join(deltas) == tokenizer.decode(partial)
    assert deltas[-1].endswith("\ufffd")


def test_detokenize_false_only_records_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("héllo")
    deltas, detok = stream(tokenizer, ids, detokenize=False, stop_token_ids=[0])
    assert deltas == [""] * (len(ids) + 1) and detok.text == ""
    assert detok.token_ids == ids


def test_decode_token(tokenizer: PreTrainedTokenizerFast) -> None:
    (im_end,) = tokenizer.convert_tokens_to_ids(["<|im_end|>"])
    assert decode_token(tokenizer, im_end) == "<|im_end|>"
    (h,) = tokenizer.encode("h")
    assert decode_token(tokenizer, h) == "h"
    split = [i for i in tokenizer.encode("日") if len(tokenizer.decode([i])) == 1]
    assert decode_token(tokenizer, split[0]) == "\ufffd"
    assert decode_token(tokenizer, 10**6) == ""


class SlowTokenizer:
    """The slow-tokenizer surface the detokenizer uses: tokens are characters."""

    is_fast = False
    all_special_tokens = ["<s>", "</s>"]

    def __init__(self) -> None:
        self.vocab = ["<s>", "</s>", *"abc "]

    def get_added_vocab(self) -> dict[str, int]:
        return {}

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list:
        tokens = [self.vocab[i] if i < len(self.vocab) else None for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.all_special_tokens]
        return tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


@pytest.mark.parametrize(
    ("skip", "spaces", "expected"),
    [(True, True, "abca"), (False, True, "<s> abc </s> a"), (False, False, "<s>abc</s>a")],
)
def test_spaces_between_special_tokens_on_slow_tokenizers(
    skip: bool, spaces: bool, expected: str
) -> None:
    slow = SlowTokenizer()
    ids = [0, 2, 3, 4, 1, 2]
    assert decode_tokens(slow, ids, skip, spaces) == expected
    deltas, detok = stream(
        slow, ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces
    )
    assert "".join(deltas) == detok.text == expected


# -- properties ---------------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_token_sequence_streams_to_the_full_decode(
    tokenizer: PreTrainedTokenizerFast, data: st.DataObject
) -> None:
    vocab_size = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab_size - 1), max_size=40), label="ids")
    chunk = data.draw(st.integers(1, 4), label="chunk")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    # Any prompt, too: its tail is decoded as context, even when it ends mid-character.
    prompt = data.draw(st.lists(st.integers(0, vocab_size - 1), max_size=8), label="prompt")
    deltas, detok = stream(tokenizer, ids, prompt=prompt, chunk=chunk, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
    # U+FFFD only ever reaches the stream when the bytes really are invalid
    if "\ufffd" not in tokenizer.decode(ids, skip_special_tokens=skip):
        assert not any("\ufffd" in delta for delta in deltas)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_stop_string_cuts_at_its_first_occurrence(
    tokenizer: PreTrainedTokenizerFast, data: st.DataObject
) -> None:
    text = data.draw(st.text(alphabet="ab éö日本😀", min_size=1, max_size=30), label="text")
    start = data.draw(st.integers(0, len(text) - 1), label="start")
    stop = text[start : start + data.draw(st.integers(1, 4), label="length")]
    include = data.draw(st.booleans(), label="include")
    ids = tokenizer.encode(text)
    deltas, detok = stream(tokenizer, ids, stop=stop, include_stop_str_in_output=include)
    first = text.find(stop)
    expected = text[: first + len(stop)] if include else text[:first]
    assert detok.text == expected and "".join(deltas) == expected
    assert detok.stop_reason == stop
