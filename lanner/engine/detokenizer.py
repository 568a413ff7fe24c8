"""Turns a request's output tokens into text incrementally and finds its stop strings."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from lanner.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the output so the first output token reads as a
# continuation (SentencePiece drops a leading space when a word starts the text).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes of an unfinished character


class IncrementalDetokenizer:
    """Decodes one sequence's output a few tokens at a time, as vLLM does when streaming.

    Byte-level BPE can split one character over several tokens, and decoding a lone
    token then gives U+FFFD. So the decoder keeps a small window of ids: ``prefix``
    marks where the last emitted text began, ``read`` where it ended. Each new token
    decodes ``ids[prefix:]`` and ``ids[prefix:read]``; the difference is the new text,
    less any U+FFFD at its end, held back until the character is finished.

    ``text`` is the whole output text so far (cut at a stop string). The deltas that
    ``add_tokens`` returns can trail it: text that could be the start of a stop string
    is only released once it cannot be, or when the sequence finishes. The deltas,
    concatenated, always equal ``text`` once ``add_tokens(..., finished=True)`` (or
    ``finish()``) has run.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []  # every output token accepted (none after a stop)
        self.text = ""
        self.stop_reason: str | None = None  # the stop string that ended the output
        self._emitted = 0  # characters of `text` already returned as deltas
        # The decode window: ids[prefix:read] is already text, ids[read:] not yet.
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(self._ids).endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: its last bytes would merge with the
            # output's first, so decode the output on its own (as a full decode would).
            self._ids = []
        self._prefix = 0
        self._read = len(self._ids)
        # Characters of decode(ids[prefix:]) past ids[prefix:read]'s text already released
        # while the window still ends in an unfinished character.
        self._released_in_window = 0
        self._stops: list[str] = list(params.stop or []) if params.detokenize else []
        self._max_stop_len = max((len(s) for s in self._stops), default=0)

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add_tokens(self, new_ids: Sequence[int], finished: bool = False) -> str:
        """Accept new output tokens; return the newly releasable text.

        ``finished`` says the sequence ends here (EOS, max_tokens, abort): text held back
        for an unfinished character or a possible stop string is released too. Tokens
        after a stop string are ignored.
        """
        for token_id in new_ids:
            if self.stopped:
                break
            self.token_ids.append(token_id)
            if self.params.detokenize:
                self._ids.append(token_id)
                self._append_text(self._decode_step(force=False))
        if finished and self.params.detokenize and not self.stopped:
            self._append_text(self._decode_step(force=True))
        return self._release(everything=finished or self.stopped)

    def finish(self) -> str:
        """The text still held back, now that the sequence has ended."""
        return self.add_tokens([], finished=True)

    # -- internals ---------------------------------------------------------------------

    def _decode_step(self, force: bool) -> str:
        """The text the ids after ``read`` add, as far as it is final.

        A trailing U+FFFD may be the first bytes of a character the next token finishes,
        so it is held back (unless ``force``: the sequence ended, and a full decode
        would show it too). Complete characters before it go out at once.
        """
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        start = len(prefix_text) + self._released_in_window
        if new_text.endswith(REPLACEMENT_CHAR) and not force:
            # Bytes before an unfinished character decode the same whatever follows.
            final_end = len(new_text.rstrip(REPLACEMENT_CHAR))
            delta = new_text[start:final_end]
            self._released_in_window += len(delta)
            return delta
        if len(new_text) <= start:
            return ""  # e.g. a skipped special token: nothing new to say yet
        # The text just released becomes the next window's prefix; ids before it are no
        # longer needed, so the window stays a few tokens long however long the output.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._released_in_window = 0
        return new_text[start:]

    def _append_text(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        if self._stops and len(self.token_ids) >= self.params.min_tokens:
            self._find_stop(len(delta))

    def _find_stop(self, delta_len: int) -> None:
        # A new match ends inside the delta, so it starts at most max_len - 1 before it.
        start = max(0, len(self.text) - delta_len - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (position, -length, stop): earliest wins
        for stop in self._stops:
            position = self.text.find(stop, start)
            if position >= 0 and (best is None or (position, -len(stop)) < best[:2]):
                best = (position, -len(stop), stop)
        if best is None:
            return
        position, _, stop = best
        end = position + len(stop) if self.params.include_stop_str_in_output else position
        self.text = self.text[:end]
        self.stop_reason = stop

    def _release(self, everything: bool) -> str:
        end = len(self.text)
        if not everything and not self.params.include_stop_str_in_output:
            end -= self._stop_prefix_len()
        end = max(end, self._emitted)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of ``text`` that begins some stop string: a match
        that may still complete, so it must not be streamed before we know."""
        for length in range(min(self._max_stop_len - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def _decode(self, ids: list[int]) -> str:
        return decode_tokens(
            self.tokenizer,
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )


def decode_tokens(
    tokenizer: Any,
    ids: list[int],
    skip_special_tokens: bool = True,
    spaces_between_special_tokens: bool = True,
) -> str:
    """Decode ids the way the detokenizer does, with no clean-up of spaces.

    HF's clean-up (" ." -> ".") looks across token boundaries, so text decoded piece by
    piece would not add up to the whole; it is off here for every tokenizer.

    ``spaces_between_special_tokens`` only affects slow (Python) tokenizers: fast ones
    decode in Rust, which has no such option (vLLM's fast path ignores it as well).
    """
    if getattr(tokenizer, "is_fast", False):
        if _decodes_in_rust_only(type(tokenizer)):
            # What tokenizer.decode would run, without its Python wrapping (a third of a
            # small model's CPU step at 32 sequences went to it).
            return tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
    tokens = tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
    if isinstance(tokens, str):
        tokens = [tokens]
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    pieces: list[str] = []
    run: list[str] = []  # ordinary tokens between two special ones
    for token in tokens:
        if token is None:
            continue  # an id outside the vocabulary (padded logits)
        if token in special:
            if run:
                pieces.append(tokenizer.convert_tokens_to_string(run))
                run = []
            pieces.append(token)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.convert_tokens_to_string(run))
    return (" " if spaces_between_special_tokens else "").join(pieces)


@functools.cache
def _decodes_in_rust_only(tokenizer_class: type) -> bool:
    """True when the class decodes exactly as transformers' Rust-backed base does (its
    decode and _decode not overridden), so the backend's decode gives the same text."""
    if getattr(tokenizer_class, "decodes_in_rust_only", False):
        return True  # model/tokenizer_cache.py's stand-in: its backend is transformers'
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return (
        issubclass(tokenizer_class, TokenizersBackend)
        and tokenizer_class.decode is PreTrainedTokenizerBase.decode
        and tokenizer_class._decode is TokenizersBackend._decode
    )


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token's text for logprob listings: special tokens kept, partial characters
    shown as U+FFFD (as a full decode would), unknown ids as ''."""
    return decode_tokens(tokenizer, [token_id], skip_special_tokens=False)
