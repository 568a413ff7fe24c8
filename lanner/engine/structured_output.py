"""Structured outputs with xgrammar: each request's constraint (a JSON schema, any JSON
object, a regex, a choice or an EBNF grammar) compiled off the engine loop and cached by
its text, and the per-request matchers that give each step's token bitmask and take the
tokens the request accepted.

xgrammar is imported on the first constrained request, in the compiling thread: a server
that never sees one pays nothing for it. A request whose grammar is still compiling waits
in the scheduler's queue (``RequestGrammar.ready``), never the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lanner.runner.cpu_threads import available_cores
from lanner.runner.sampler import BitmaskRows, TokenBitmasks
from lanner.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# JSON's free whitespace, capped per run: a weak model can otherwise spend its whole
# budget on tabs between two tokens (seen with the demo model).
MAX_JSON_WHITESPACE = 32
# Steps with fewer constrained rows fill on the loop's thread (see start_fill).
THREAD_FILL_ROWS = 8
_REGEX_SPECIAL = frozenset("\\.^$*+?{}[]|()/")
# xgrammar prefixes its errors with a time stamp and its own source file and line.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*")


# Most threads xgrammar's batch fill gets. W10's rows (its JSON schema, a 151k vocabulary)
# took 110-300 µs each on the 2-core CPU machine, 256 rows 36-87 ms on one thread
# (benchmarks/structured_host_step.py): 16 threads bring that near the device's step.
MAX_FILL_THREADS = 16


def _cgroup_cpu_limit() -> int | None:
    """The container's CPU quota in whole cores (cgroup v2 ``cpu.max``), if it sets one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))


def fill_threads() -> int:
    """Threads for xgrammar's batch fill: the cores this process may use but one, which
    the engine loop keeps (it schedules the next step meanwhile). xgrammar's own "auto"
    takes half the machine's cores, which a container's cpuset or quota may not give."""
    cores = available_cores()
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, limit)
    return max(1, min(cores - 1, MAX_FILL_THREADS))


def _clean(err: Exception) -> str:
    return _XGRAMMAR_PREFIX.sub("", str(err).strip()).splitlines()[0][:500]


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as err:
        raise ValueError(
            f"structured outputs need xgrammar (pip install 'lanner[structured]'): {err}"
        ) from err
    return xgrammar


def _regex_literal(text: str) -> str:
    """``text`` as a regex matching only itself (xgrammar warns on re.escape's escaped
    spaces and other characters that need none)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _grammar(params: StructuredOutputsParams) -> Any:
    """The constraint as an xgrammar Grammar (no tokenizer needed: a syntax check)."""
    xgr = _xgrammar()
    kind = params.kind
    if kind == "json":
        schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
        return xgr.Grammar.from_json_schema(
            schema,
            any_whitespace=not params.disable_any_whitespace,
            max_whitespace_cnt=None if params.disable_any_whitespace else MAX_JSON_WHITESPACE,
        )
    if kind == "json_object":
        # OpenAI's json_object mode: a JSON object (not any JSON value).
        return xgr.Grammar.from_json_schema(
            '{"type": "object"}', max_whitespace_cnt=MAX_JSON_WHITESPACE
        )
    if kind == "regex":
        return xgr.Grammar.from_regex(params.regex)
    if kind == "choice":
        return xgr.Grammar.from_regex("|".join(_regex_literal(c) for c in params.choice or []))
    return xgr.Grammar.from_ebnf(params.grammar)


def validate_structured_outputs(params: StructuredOutputsParams) -> None:
    """Raise ValueError naming the field when the constraint does not parse: an invalid
    schema, regex or grammar fails here, before the request is queued."""
    if params.kind == "json" and isinstance(params.json, str):
        try:
            json.loads(params.json)
        except ValueError as err:
            raise ValueError(f"structured_outputs.json is not valid JSON: {err}") from None
    try:
        _grammar(params)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"structured_outputs.{params.kind} is invalid: {_clean(err)}") from None


class RequestGrammar:
    """One request's constraint: its compiled grammar (a future while compiling) and the
    matcher that follows the request's output."""

    def __init__(self, compiled: Future) -> None:
        self._compiled = compiled
        self._matcher: Any = None
        self.error: str | None = None
        # Only a stop token ends a grammar: the matcher is asked after one alone (one
        # call fewer a row and step; 256 rows made each call count).
        self._stop_token_ids: frozenset[int] = frozenset()
        self._terminated = False

    @property
    def ready(self) -> bool:
        """Compiled (or failed: then ``error`` says why, and the request must end)."""
        if self._matcher is not None or self.error is not None:
            return True
        if not self._compiled.done():
            return False
        try:
            xgr = _xgrammar()
            # Matchers take back any number of tokens (speculative drafts are walked
            # and rolled back).
            matcher = xgr.GrammarMatcher(self._compiled.result())
            self._stop_token_ids = frozenset(matcher.stop_token_ids)
            self._matcher = matcher
        except Exception as err:  # noqa: BLE001 - the request ends with this message
            self.error = _clean(err)
        return True

    def wait(self, timeout_s: float) -> None:
        """Block up to ``timeout_s`` for the compile to finish."""
        with contextlib.suppress(TimeoutError):
            self._compiled.exception(timeout=timeout_s)

    @property
    def matcher(self) -> Any:
        assert self._matcher is not None, "the grammar is not compiled yet"
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False when the grammar refuses it."""
        accepted = bool(self.matcher.accept_token(token_id))
        if accepted and token_id in self._stop_token_ids:
            self._terminated = bool(self._matcher.is_terminated())
        return accepted

    @property
    def is_terminated(self) -> bool:
        """The grammar has ended (``accept`` gave it a stop token): the request is done."""
        return self._terminated


class StructuredOutputManager:
    """Compiles constraints for one engine (its tokenizer and vocabulary) on a thread of
    its own, each distinct constraint once; fills each step's bitmasks into one reused
    host buffer (pinned when the engine runs on CUDA), on a second thread when asked."""

    def __init__(
        self,
        tokenizer_source: str,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        pin_memory: bool = False,
    ) -> None:
        self.tokenizer_source = tokenizer_source
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.pin_memory = pin_memory
        self._threads = ThreadPoolExecutor(1, thread_name_prefix="lanner-grammar")
        self._compiled: dict[str, Future] = {}
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._batch_matcher: Any = None
        # Bitmask fills run here while the engine loop goes on (xgrammar drops the GIL).
        self._fill_thread = ThreadPoolExecutor(1, thread_name_prefix="lanner-grammar-fill")
        self._filling: Future | None = None
        # Two buffers, used in turn: a step's copy to the device may still be queued
        # while the next step's bitmasks are filled. Each holds its last step's view.
        self._buffers: list[TokenBitmasks | None] = [None, None]
        self._next_buffer = 0

    def grammar_for(self, params: StructuredOutputsParams) -> RequestGrammar:
        key = json.dumps(params.to_dict(), sort_keys=True)
        future = self._compiled.get(key)
        if future is None:
            future = self._threads.submit(self._compile, params)
            self._compiled[key] = future
        return RequestGrammar(future)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        return compiler.compile_grammar(_grammar(params))

    def use_vocabulary(self, tokens: list[bytes]) -> None:
        """Compile against these token strings instead of the model's tokenizer: for a
        model that ships none (the benchmarks' random-weight shapes)."""
        xgr = _xgrammar()
        info = xgr.TokenizerInfo(
            tokens, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
        )
        with self._compiler_lock:
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)

    def _get_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                xgr = _xgrammar()
                from lanner.model.tokenizer import load_tokenizer
                from lanner.model.tokenizer_cache import transformers_tokenizer

                # xgrammar reads transformers' own tokenizer (not the cache's stand-in).
                tokenizer = transformers_tokenizer(load_tokenizer(self.tokenizer_source))
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
                )
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
            return self._compiler

    def fill_bitmasks(
        self, grammars: list[RequestGrammar], drafts: list[list[int]]
    ) -> list[BitmaskRows]:
        """Each grammar's next-token bitmasks (bit i: token i allowed), filled now: one
        row for the next token and one after each of its request's drafts, all rows of
        one step's buffer. The first rows fill on the CPU threads of xgrammar's batch
        matcher; the draft rows by walking each matcher through its drafts and back. A
        row after a draft the grammar refuses allows everything: that draft cannot be
        accepted, so what follows it is never used."""
        self.wait_for_fill()
        rows, fill = self._prepare(grammars, drafts)
        fill()
        return rows

    def start_fill(self, grammars: list[RequestGrammar]) -> list[BitmaskRows]:
        """``fill_bitmasks`` without drafts, on the fill thread: the rows returned are
        filled once ``wait_for_fill`` returns. The matchers must not change meanwhile."""
        no_drafts: list[list[int]] = [[] for _ in grammars]
        if len(grammars) < THREAD_FILL_ROWS:
            # A few rows fill faster than the hand-over to the thread takes (W10's batch 1
            # ran at 3.4x the free TPOT with it).
            return self.fill_bitmasks(grammars, no_drafts)
        self.wait_for_fill()
        rows, fill = self._prepare(grammars, no_drafts)
        started = threading.Event()

        def run() -> None:
            started.set()
            fill()

        self._filling = self._fill_thread.submit(run)
        # Until the fill thread holds the GIL: it keeps it into xgrammar's fill, which
        # lets go of it. Without this wait the loop's thread kept the GIL (it lets go
        # only when it blocks, or after sys.getswitchinterval(), 5 ms), and the fill
        # began only once the loop waited for it: no overlap (benchmarks/
        # structured_host_step.py, one row: 3.5 ms a step against 0.4 ms of fill).
        started.wait()
        return rows

    def wait_for_fill(self) -> None:
        """Block until the fill ``start_fill`` began is done (raising its error, if any)."""
        if self._filling is not None:
            filling, self._filling = self._filling, None
            filling.result()

    def _prepare(
        self, grammars: list[RequestGrammar], drafts: list[list[int]]
    ) -> tuple[list[BitmaskRows], Callable[[], None]]:
        """The step's rows in the next buffer, and the call that fills them."""
        xgr = _xgrammar()
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher(fill_threads())
        offsets = [0]
        for tokens in drafts:
            offsets.append(offsets[-1] + len(tokens) + 1)
        index = self._next_buffer
        self._next_buffer = 1 - index
        last = self._buffers[index]
        if last is not None and last.copied is not None:
            last.copied.synchronize()  # its step's copy was queued long ago: passed by now
        words = last.words if last is not None and last.words.shape[0] >= offsets[-1] else None
        if words is None:
            capacity = max(64, 1 << (offsets[-1] - 1).bit_length())
            words = xgr.allocate_token_bitmask(capacity, self.vocab_size)
            if self.pin_memory:
                words = words.pin_memory()
        bitmasks = TokenBitmasks(words, offsets[-1])
        self._buffers[index] = bitmasks
        matchers = [g.matcher for g in grammars]
        rows = [
            BitmaskRows(bitmasks, start, end - start)
            for start, end in zip(offsets, offsets[1:], strict=False)
        ]

        def fill() -> None:
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, words, offsets[:-1])
            for matcher, tokens, offset in zip(matchers, drafts, offsets, strict=False):
                if tokens:
                    self._fill_after_drafts(matcher, tokens, words, offset)

        return rows, fill

    @staticmethod
    def _fill_after_drafts(
        matcher: Any, tokens: list[int], words: torch.Tensor, offset: int
    ) -> None:
        words[offset + 1 : offset + 1 + len(tokens)] = -1  # all allowed: never used
        walked = 0
        for token in tokens:
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
            walked += 1
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(words, offset + walked)
        if walked:
            matcher.rollback(walked)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._fill_thread.shutdown(wait=True, cancel_futures=True)
