"""How many tokens each request proposes per step, chosen from measured step times and
acceptance, and the counters of what was accepted.

The adaptive rule, per batch size: a step in which every decoding request drafts up to
k tokens yields E(k) = b * (1 + a + ... + a^k) tokens (a: the running requests' mean
per-position acceptance, each request's own decayed count, a shortfall of proposals
counting as a rejection) and takes T(b, k), the measured wall time between steps of that
kind at that batch size (plain steps, k = 0, are measured as they run: overlapped with
the host's work when the engine schedules ahead). The policy runs the k with the most
tokens per second, E(k) / T(b, k), among those it has measured (switching between plain
decoding and speculation only for a START_MARGIN gain), and now and then probes
a neighbour (k - 1 or k + 1) for a few steps to measure or refresh it: a probe that wins
moves the choice and the next probe follows at once; one that loses waits until what
it lost is PROBE_BUDGET of the time (and at least twice its last wait). A new batch size
next to a measured one (a batch draining request by request) starts from its choice;
the first one, if small, starts at num_speculative_tokens and probes plain decoding
soon; one further away starts without speculation and, once its plain steps are
measured, probes the nearest measured size's choice (speculation that paid at batch 2
is tried at batch 64, never assumed there), so speculation turns
itself off where it does not pay and back on where it does.

Clean steps understate what a mode costs: speculating requests finish at different steps,
so a batch refills one request at a time, each refill a slow mixed prefill step (a
refilling batch of 64 speculated at 0.67x of plain decoding's rate on an H200, chosen by
its clean steps). So each bucket also keeps, for plain and for speculating steps apart,
what all their steps made (tokens, seconds) against what the measured times and the
acceptance predicted for them, and values each mode at that realized share. (Both modes
pay prefill steps, so the share does not single out the refills speculation causes: at
64 both came out near 0.6 and the loss stayed; the README's W7 section has the runs.)
And while speculating, plain decoding is probed too (least recently measured first), so
its time cannot go stale.

Stopping is not for good: the acceptance counts keep decaying through plain steps (back
toward the prior), the stopped length is probed first, only a probe starts speculation
again, and where speculating paid at that batch size a probe may cost
PROBE_BUDGET_WHERE_PAID. Every proposer catches up on the steps it did not draft in
when drafting starts again (a draft model runs its own catch-up; an EAGLE head reads the
target's features from the feature cache), so plain steps run as they would without one,
and are measured that way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lanner.spec.config import SpeculativeConfig

# The acceptance rate is tracked per request as decayed counts with a prior of
# PRIOR_POSITIONS positions at PRIOR_RATE.
PRIOR_RATE = 0.8
PRIOR_POSITIONS = 2.0
DECAY = 0.95  # per step: about the last twenty steps count
# Step times: exponential moving average over clean steps (same kind as the step before,
# no prefill in it); a step more than OUTLIER times the average (a pause) is skipped.
TIME_SMOOTHING = 0.25
OUTLIER = 4.0
# A time last measured more than this many steps ago starts again from its next step
# (a probe's few steps would not move an old average far enough to judge the probe).
STALE_STEPS = 64
# A time new or restarted takes the least of its first FIRST_SAMPLES steps (then the
# moving average), and a probe is not abandoned on its first.
FIRST_SAMPLES = 3
PROBE_STEPS = 5  # steps a probe runs: the first is a transition (not measured)
FIRST_PROBE_WAIT = 16  # steps at the choice before its first probe
# A new bucket's plain steps before it probes the nearest bucket's choice: one
# transition, then enough measured steps to compare against.
FIRST_JUMP_WAIT = 4
MAX_PROBE_WAIT = 8192
# The first bucket of at most this many requests starts at num_speculative_tokens (where
# speculation usually pays); larger first buckets start without it.
SPECULATE_FIRST_UP_TO = 4
# A losing probe waits long enough that probing costs at most this share of the time:
# its lost tokens (its steps at its measured shortfall, plus one step of lost overlap
# each side) over the steps until the next.
PROBE_BUDGET = 0.01
# Where speculation has paid at this batch size (measured against plain steps), a probe
# after it stopped asks whether acceptance came back (bursts of rejections end), and
# may cost this share: it gained at least START_MARGIN - 1 when it paid.
PROBE_BUDGET_WHERE_PAID = 0.1
# A probe whose first measured step makes under this share of the choice's tokens per
# second ends there (a loss that large is not noise, and each losing step costs).
ABANDON_PROBE = 0.8
# Every REVIEW_STEPS steps the choice is compared with every length measured before, at
# the running requests' current acceptance (times do not go stale as acceptance does);
# one better by more than REVIEW_MARGIN takes over.
REVIEW_STEPS = 8
REVIEW_MARGIN = 1.02
# Speculation replaces plain decoding, or plain decoding speculation, only when it
# measures this much better.
START_MARGIN = 1.1
# The realized share of each mode's predicted tokens per second: over about the last
# REALIZED_STEPS steps of that mode at a bucket, used once it has seen REALIZED_MIN_STEPS
# (before, 1), kept within [1 / REALIZED_CAP, REALIZED_CAP]; a step counts at most
# REALIZED_OUTLIER times its predicted time (a pause is not the mode's cost).
REALIZED_STEPS = 256
REALIZED_MIN_STEPS = 48
REALIZED_CAP = 4.0
REALIZED_OUTLIER = 16.0


@dataclass
class RequestSpecState:
    """Per-request speculation state, kept on the engine's Request."""

    accepted: float = 0.0  # decayed accepted drafts
    positions: float = 0.0  # decayed positions tested (accepted + the first rejection)
    # The policy's step count when accepted / positions were last decayed.
    step: int = 0
    # The proposer's own state (e.g. how far a draft model's KV cache is computed).
    proposer: Any = None

    def acceptance_rate(self, step: int | None = None) -> float:
        """The decayed rate as of the policy's step ``step`` (default: the last update).
        The counts decay every step, drafted or not, so what a burst of rejections said
        fades back toward the prior while the request runs plain, and a probe's own
        drafts, not the burst, decide whether speculation starts again."""
        weight = DECAY ** max(0, step - self.step) if step is not None else 1.0
        return (weight * self.accepted + PRIOR_RATE * PRIOR_POSITIONS) / (
            weight * self.positions + PRIOR_POSITIONS
        )


@dataclass
class SpecDecodeStats:
    """Cumulative counters, as vLLM's spec_decode metrics count them."""

    num_drafts: int = 0  # verify steps of a request with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    # Steps the engine ran with speculation, and without it while it was enabled.
    num_speculative_steps: int = 0
    num_plain_steps: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify step of a speculating request: accepted drafts + 1."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def expected_tokens(rate: float, draft_length: int) -> float:
    """1 + rate + ... + rate^draft_length: a request's tokens from one step."""
    if not draft_length:  # every plain step asks
        return 1.0
    return sum(rate**i for i in range(draft_length + 1))


def batch_bucket(num_running: int) -> int:
    """Batch sizes measured together: exact up to 4, then steps of sqrt(2)."""
    return num_running if num_running <= 4 else round(2 * math.log2(num_running))


@dataclass
class _Realized:
    """What one mode's steps at a bucket made against what was predicted for them (the
    bucket's measured step time, the acceptance's expected tokens), decayed per step."""

    seconds: float = 0.0
    tokens: float = 0.0
    predicted_seconds: float = 0.0
    predicted_tokens: float = 0.0
    steps: float = 0.0

    def add(
        self, seconds: float, tokens: float, predicted_seconds: float, predicted_tokens: float
    ) -> None:
        keep = 1.0 - 1.0 / REALIZED_STEPS
        self.seconds = keep * self.seconds + min(seconds, REALIZED_OUTLIER * predicted_seconds)
        self.tokens = keep * self.tokens + tokens
        self.predicted_seconds = keep * self.predicted_seconds + predicted_seconds
        self.predicted_tokens = keep * self.predicted_tokens + predicted_tokens
        self.steps = keep * self.steps + 1.0

    def share(self) -> float:
        """Realized tokens per second over predicted ones (1 until enough steps)."""
        if self.steps < REALIZED_MIN_STEPS or self.seconds <= 0 or self.predicted_tokens <= 0:
            return 1.0
        share = (self.tokens / self.predicted_tokens) * (self.predicted_seconds / self.seconds)
        return min(max(share, 1.0 / REALIZED_CAP), REALIZED_CAP)


@dataclass
class _Bucket:
    """Measurements and the choice for one batch bucket."""

    choice: int
    seconds: dict[int, float] = field(default_factory=dict)  # k -> mean step time
    measured_at: dict[int, int] = field(default_factory=dict)  # k -> step count then
    samples: dict[int, int] = field(default_factory=dict)  # k -> steps since (re)started
    probe: int | None = None  # the draft length under probe
    probe_steps_left: int = 0
    steps_to_probe: int = FIRST_PROBE_WAIT
    probe_wait: int = FIRST_PROBE_WAIT
    steps_to_review: int = REVIEW_STEPS
    next_direction: int = 1  # the neighbour probed next: choice + 1 or choice - 1
    jump: int | None = None  # a draft length to probe first (the nearest bucket's choice)
    paid: bool = False  # a draft length measured START_MARGIN better than plain steps here
    # What plain (index 0) and speculating (1) steps here realized of their prediction.
    realized: tuple[_Realized, _Realized] = field(
        default_factory=lambda: (_Realized(), _Realized())
    )


class DraftLengthPolicy:
    """Decides each step's draft length from measured time and acceptance, and records
    how the drafts fared."""

    def __init__(
        self,
        config: SpeculativeConfig,
        step_cost: Callable[[int, int], float] | None = None,
    ) -> None:
        self.config = config
        self.max_tokens = config.num_speculative_tokens
        self.stats = SpecDecodeStats(num_accepted_tokens_per_pos=[0] * self.max_tokens)
        self.buckets: dict[int, _Bucket] = {}
        # Injected step times (tests): a step of (batch size, draft length) takes this
        # many seconds instead of what the clock says.
        self.step_cost = step_cost
        self.clock: Callable[[], float] = time.perf_counter
        self._last_done: float | None = None
        self._last_kind: tuple[int, int] | None = None
        self._steps = 0
        self._planned = 0  # the draft length of the step being scheduled
        self._last_rate = PRIOR_RATE  # what _rate() said last (steps between reuse it)
        # The running requests' speculation states (their acceptance), read when deciding.
        self._states: Callable[[], list[RequestSpecState]] = list
        # The bucket of the batch size looked up last: a batch's size seldom changes from
        # step to step, and each step looks its bucket up three times.
        self._last_bucket: tuple[int, _Bucket | None] = (-1, None)

    def enabled(self, num_running: int) -> bool:
        """False when the batch is large enough that no request speculates."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_running < limit

    # -- choosing ------------------------------------------------------------------------

    def plan(self, num_running: int) -> int:
        """The draft length for the next step of a batch of ``num_running`` requests, 0
        for none. Pure: ``begin_step`` commits it."""
        if not self.enabled(num_running) or num_running == 0:
            return 0
        if not self.config.adaptive_draft_length:
            return self.max_tokens
        bucket = self._bucket(num_running)
        if bucket.probe is not None:
            return bucket.probe
        if bucket.steps_to_probe <= 0:
            candidate = self._next_probe(bucket)
            if candidate is not None:
                return candidate
        return bucket.choice

    def begin_step(self, num_running: int, draft_length: int) -> None:
        """The engine schedules a step at ``draft_length`` (what ``plan`` said, or 0 when
        it cannot wait for the previous step): requests draft that many tokens, and the
        step counts toward the bucket's probes."""
        self._planned = draft_length
        enabled = self.enabled(num_running)
        if draft_length:
            self.stats.num_speculative_steps += 1
        elif enabled:
            self.stats.num_plain_steps += 1
        if not self.config.adaptive_draft_length or not enabled or num_running == 0:
            return
        bucket = self._bucket(num_running)
        if bucket.probe is None and draft_length != bucket.choice:
            bucket.probe = draft_length
            bucket.probe_steps_left = PROBE_STEPS
            bucket.jump = None
        if bucket.probe is not None:
            bucket.probe_steps_left -= 1
            if bucket.probe_steps_left <= 0:
                self._end_probe(bucket)
            return
        bucket.steps_to_probe -= 1
        bucket.steps_to_review -= 1
        if bucket.steps_to_review <= 0:
            bucket.steps_to_review = REVIEW_STEPS
            self._review(bucket)

    def _review(self, bucket: _Bucket) -> None:
        # Nothing but a probe starts speculation (its waits bound what it costs where
        # acceptance is really gone; a plain choice's rate only drifts to the prior).
        if bucket.choice == 0:
            return
        rate = self._rate()
        values = {k: self._value(bucket, k, rate) for k in bucket.seconds}
        choice_value = values.get(bucket.choice)
        best = max(values, key=lambda k: values[k] or 0.0, default=bucket.choice)
        best_value = values.get(best)
        # Nothing replaces a choice not measured yet (a first batch's configured length).
        if best == bucket.choice or best_value is None or choice_value is None:
            return
        if best_value > max(REVIEW_MARGIN, self._margin(bucket.choice, best)) * choice_value:
            self._switch(bucket, best, probe_next=False)

    @staticmethod
    def _switch(bucket: _Bucket, choice: int, probe_next: bool) -> None:
        """Make ``choice`` the bucket's choice; ``probe_next``: probe its neighbour at once
        (a winning probe keeps climbing). Stopping speculation keeps the draft length it
        stopped to probe first, after FIRST_PROBE_WAIT steps: a burst of rejections stops
        it, and only drafting measures acceptance again (plain steps leave it where the
        burst put it, so neither a review nor a probe of one draft would bring it back)."""
        if choice == 0 and bucket.choice:
            bucket.jump = bucket.choice
            probe_next = False
        bucket.choice = choice
        bucket.probe_wait = FIRST_PROBE_WAIT
        bucket.steps_to_probe = 0 if probe_next else FIRST_PROBE_WAIT

    def draft_length(self) -> int:
        """Drafts to schedule for each request about to decode in the step being
        scheduled (the caller caps them by the token budget and the request's remaining
        length)."""
        return self._planned

    def _bucket(self, num_running: int) -> _Bucket:
        last_running, last = self._last_bucket
        if last_running == num_running and last is not None:
            return last
        bucket = self._find_bucket(num_running)
        self._last_bucket = (num_running, bucket)
        return bucket

    def _find_bucket(self, num_running: int) -> _Bucket:
        key = batch_bucket(num_running)
        bucket = self.buckets.get(key)
        if bucket is None:
            nearest = min(self.buckets, key=lambda other: abs(other - key), default=None)
            inherited = self.buckets[nearest].choice if nearest is not None else 0
            if nearest is not None and abs(nearest - key) <= 1:
                # A neighbouring size (a batch draining one request at a time): its choice.
                bucket = _Bucket(inherited)
            elif inherited:
                bucket = _Bucket(0, jump=inherited, steps_to_probe=FIRST_JUMP_WAIT)
            elif nearest is None and num_running <= SPECULATE_FIRST_UP_TO:
                # The first small batch starts as configured, plain decoding probed soon:
                # a proposer with its own KV cache (a draft model, an EAGLE head) keeps
                # it in step only while it drafts, so a start without drafting would
                # judge it from stale caches.
                bucket = _Bucket(self.max_tokens, jump=0, steps_to_probe=FIRST_JUMP_WAIT)
            else:
                bucket = _Bucket(0)
            self.buckets[key] = bucket
        return bucket

    def _next_probe(self, bucket: _Bucket) -> int | None:
        """The nearest bucket's choice if not probed yet, else the neighbour of the choice
        to probe next (least recently measured first)."""
        if bucket.jump is not None and bucket.jump != bucket.choice:
            return bucket.jump
        if bucket.choice == 0:
            # From plain steps, the draft length measured best at today's acceptance, or
            # the configured one: a speculating step's fixed cost (no overlap, the
            # proposer's catch-up) can make one draft lose where more would win.
            rate = self._rate()
            values = {k: self._value(bucket, k, rate) or 0.0 for k in bucket.seconds if k}
            return max(values, key=lambda k: values[k]) if values else self.max_tokens
        step = bucket.next_direction
        # Plain decoding too: its time, measured once in a bucket's first few steps, would
        # otherwise never be refreshed while the choice speculates.
        candidates = {bucket.choice + step, bucket.choice - step, 0}
        candidates = {k for k in candidates if 0 <= k <= self.max_tokens and k != bucket.choice}
        if not candidates:
            return None
        return min(sorted(candidates), key=lambda k: bucket.measured_at.get(k, -1))

    def _rate(self) -> float:
        """The running requests' mean per-position acceptance."""
        states = self._states()
        rate = (
            sum(s.acceptance_rate(self._steps) for s in states) / len(states)
            if states
            else PRIOR_RATE
        )
        self._last_rate = rate
        return rate

    def _value(self, bucket: _Bucket, draft_length: int, rate: float) -> float | None:
        """Tokens per second a request makes at ``draft_length``: predicted from its clean
        steps' time and ``rate``, at the share of its predictions that mode realized."""
        seconds = bucket.seconds.get(draft_length)
        if seconds is None or seconds <= 0:
            return None
        share = bucket.realized[draft_length > 0].share()
        return expected_tokens(rate, draft_length) / seconds * share

    def _end_probe(self, bucket: _Bucket) -> None:
        probe = bucket.probe
        assert probe is not None
        ran = PROBE_STEPS - bucket.probe_steps_left
        bucket.probe = None
        rate = self._rate()
        probe_value = self._value(bucket, probe, rate)
        choice_value = self._value(bucket, bucket.choice, rate)
        if choice_value is None and probe_value is not None:
            # Inconclusive (the choice's steps were not measured: the batch changed, or
            # prefills ran in them): probe again after a few steps at the choice.
            bucket.jump = probe
            bucket.steps_to_probe = FIRST_JUMP_WAIT
            return
        bucket.next_direction = -bucket.next_direction
        measured = probe_value is not None and choice_value is not None
        if measured and (probe == 0) != (bucket.choice == 0):
            drafting, plain = (
                (choice_value, probe_value) if probe == 0 else (probe_value, choice_value)
            )
            bucket.paid = bucket.paid or drafting > START_MARGIN * plain
        if measured and probe_value > self._margin(bucket.choice, probe) * choice_value:
            bucket.next_direction = 1 if probe > bucket.choice else -1  # keep climbing
            self._switch(bucket, probe, probe_next=True)
        else:
            wait = 2 * bucket.probe_wait
            if measured:
                wait = max(
                    wait, self._budgeted_wait(bucket, probe, ran, probe_value / choice_value)
                )
            bucket.probe_wait = min(wait, MAX_PROBE_WAIT)
            bucket.steps_to_probe = bucket.probe_wait

    @staticmethod
    def _margin(choice: int, candidate: int) -> float:
        """How much more tokens per second ``candidate`` must measure to replace
        ``choice``. More between plain decoding and speculation, either way: starting
        to speculate, because its step times understate it (a speculating step loses
        the overlapped scheduling, and a batch whose requests finish at different steps
        runs its tail smaller); stopping, because a request's acceptance comes in bursts
        (code that repeats, then code that does not) and, once stopped, is no longer
        measured (on the CPU with injected step times, W7-like prompts at batch 1 spent
        a fifth of their steps plain where speculating paid 2x, without this)."""
        if (choice == 0) != (candidate == 0):
            return START_MARGIN
        return 1.0

    def _budgeted_wait(self, bucket: _Bucket, probe: int, ran: int, ratio: float) -> int:
        """Steps at the choice that make a probe like this one cost PROBE_BUDGET of the
        time: the tokens it lost (``ratio``: its tokens per second over the choice's), in
        steps of the choice."""
        if ratio >= 1.0:
            return 0
        # Each probe step lost that share of itself, in choice steps; two transitions.
        lost = ran * (1.0 - ratio) * bucket.seconds[probe] / bucket.seconds[bucket.choice] + 2.0
        budget = PROBE_BUDGET_WHERE_PAID if bucket.paid and bucket.choice == 0 else PROBE_BUDGET
        return math.ceil(lost / budget)

    # -- measuring -----------------------------------------------------------------------

    def step_done(
        self,
        num_running: int,
        draft_length: int,
        clean: bool,
        states: Callable[[], list[RequestSpecState]],
        num_tokens: int | None = None,
    ) -> None:
        """The engine read a step of a batch of ``num_running`` planned at
        ``draft_length``; ``clean``: every request in it decoded; ``states``: the running
        requests' states, for their acceptance; ``num_tokens``: the tokens it made (None:
        not counted toward what the mode realized). Measures the time since the previous
        step was read."""
        self._states = states
        if self.step_cost is not None:
            now = (self._last_done or 0.0) + self.step_cost(num_running, draft_length)
        else:
            now = self.clock()
        kind = (num_running, draft_length)
        previous_kind, self._last_kind = self._last_kind, kind if clean else None
        last, self._last_done = self._last_done, now
        self._steps += 1
        adaptive = self.config.adaptive_draft_length and self.enabled(num_running)
        if not adaptive or last is None or num_running == 0:
            return
        seconds = now - last
        bucket = self._bucket(num_running)
        mean = bucket.seconds.get(draft_length)
        if num_tokens is not None and mean is not None:
            # Every step, clean or not (a refill's prefill is part of what a mode costs).
            predicted = num_running * expected_tokens(self._last_rate, draft_length)
            bucket.realized[draft_length > 0].add(seconds, num_tokens, mean, predicted)
        if previous_kind != kind:
            return
        samples = bucket.samples.get(draft_length, 0)
        if mean is None or self._steps - bucket.measured_at[draft_length] > STALE_STEPS:
            bucket.seconds[draft_length], samples = seconds, 1
        elif samples < FIRST_SAMPLES:
            # A hiccup is slower, never faster: the least of the first few.
            bucket.seconds[draft_length], samples = min(mean, seconds), samples + 1
        elif seconds <= OUTLIER * mean:
            bucket.seconds[draft_length] = mean + TIME_SMOOTHING * (seconds - mean)
        else:
            return
        bucket.samples[draft_length] = samples
        bucket.measured_at[draft_length] = self._steps
        if bucket.probe == draft_length and draft_length != bucket.choice:
            rate = self._rate()
            probe_value = self._value(bucket, draft_length, rate)
            choice_value = self._value(bucket, bucket.choice, rate)
            if (
                probe_value is not None
                and choice_value is not None
                and samples >= 2
                and probe_value < ABANDON_PROBE * choice_value
            ):
                self._end_probe(bucket)

    def observe(
        self, state: RequestSpecState, num_requested: int, num_drafts: int, num_accepted: int
    ) -> None:
        """Record one verify step of a request: ``num_requested`` draft slots scheduled,
        ``num_drafts`` proposed, the first ``num_accepted`` of them accepted."""
        if num_requested <= 0:
            return
        # A slot left without a proposal gains nothing, as a rejection.
        tested = num_accepted + (1 if num_accepted < num_requested else 0)
        # Decayed once per step since the last update (once, when it drafted each step).
        weight = DECAY ** max(1, self._steps - state.step)
        state.accepted = weight * state.accepted + num_accepted
        state.positions = weight * state.positions + tested
        state.step = self._steps
        if num_drafts <= 0:
            return
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.num_accepted_tokens_per_pos[position] += 1
