"""The adaptive draft length under injected step times: it climbs to the draft length with
the most tokens per second where speculation pays, stays off (probing rarely) where it
does not, follows a change of acceptance, and counts what was drafted and accepted."""

from __future__ import annotations

import random
from collections.abc import Callable

from lanner.spec.config import SpeculativeConfig
from lanner.spec.policy import (
    DraftLengthPolicy,
    RequestSpecState,
    batch_bucket,
    expected_tokens,
)


def config(k: int = 6, **extra) -> SpeculativeConfig:
    return SpeculativeConfig(method="ngram", num_speculative_tokens=k, **extra)


def drive(
    policy: DraftLengthPolicy,
    num_running: int,
    steps: int,
    rate: Callable[[int], float],
    seed: int = 0,
    states: list[RequestSpecState] | None = None,
) -> tuple[list[int], float, float]:
    """Run ``steps`` decode steps of a batch whose drafts are each accepted with
    probability ``rate(step)``; returns the draft lengths, the simulated seconds and
    the tokens made."""
    rng = random.Random(seed)
    states = states if states is not None else [RequestSpecState() for _ in range(num_running)]
    lengths, seconds, tokens = [], 0.0, 0.0
    assert policy.step_cost is not None
    for step in range(steps):
        k = policy.plan(num_running)
        policy.begin_step(num_running, k)
        made = 0
        for state in states:
            accepted = 0
            while accepted < k and rng.random() < rate(step):
                accepted += 1
            if k:
                policy.observe(state, k, k, accepted)
            made += accepted + 1
        tokens += made
        seconds += policy.step_cost(num_running, k)
        policy.step_done(num_running, k, True, lambda: states, made)
        lengths.append(k)
    return lengths, seconds, tokens


def test_climbs_to_the_best_length_where_speculation_pays() -> None:
    # Batch 1: a verify step of k drafts costs 1 + 0.1 k plain steps; acceptance 0.9.
    policy = DraftLengthPolicy(config(6), step_cost=lambda b, k: 1.0 + 0.1 * k)
    lengths, seconds, tokens = drive(policy, 1, 400, lambda _: 0.9)
    best = max(range(7), key=lambda k: expected_tokens(0.9, k) / (1 + 0.1 * k))
    assert best == 6
    assert lengths[-100:].count(best) >= 95  # rare probes of 5
    assert lengths.index(6) < 60  # each winning probe is followed by the next at once
    # Over the whole run, close to always running the best length.
    ideal = expected_tokens(0.9, best) / (1 + 0.1 * best)
    assert tokens / seconds > 0.9 * ideal


def test_stays_off_where_speculation_does_not_pay() -> None:
    # Batch 64: every draft row costs as much as a plain step's row; acceptance 0.6.
    policy = DraftLengthPolicy(config(4), step_cost=lambda b, k: 1.0 + 0.9 * k)
    lengths, seconds, tokens = drive(policy, 64, 2000, lambda _: 0.6)
    assert policy.buckets[batch_bucket(64)].choice == 0
    # Probes back off: well under 2 % of the steps speculate, and the run keeps > 97 %
    # of the plain rate (64 tokens a second).
    assert sum(1 for k in lengths if k) < 0.02 * len(lengths)
    assert tokens / seconds > 0.97 * 64
    assert policy.stats.num_plain_steps > 0.97 * len(lengths)


def test_follows_a_change_in_acceptance() -> None:
    # Cheap drafts: worth it while drafts are accepted, not after they stop being.
    policy = DraftLengthPolicy(config(4), step_cost=lambda b, k: 1.0 + 0.3 * k)
    lengths, _, _ = drive(policy, 2, 600, lambda step: 0.95 if step < 300 else 0.0)
    assert lengths[250:300].count(4) >= 45
    assert lengths[-100:].count(0) >= 95


def test_a_new_batch_size_starts_from_its_neighbour_or_tries_the_nearest_choice() -> None:
    policy = DraftLengthPolicy(config(4), step_cost=lambda b, k: 1.0 + 0.05 * k)
    drive(policy, 4, 200, lambda _: 0.9)
    assert policy.buckets[4].choice == 4
    assert policy.plan(3) == 4  # a neighbouring bucket: its choice at once
    lengths, _, _ = drive(policy, 12, 40, lambda _: 0.9)
    # Further away: plain first (its steps measured), then the nearest choice, which wins.
    assert lengths[:4] == [0] * 4 and lengths[4] == 4
    assert lengths[-20:] == [4] * 20 and policy.buckets[batch_bucket(12)].choice == 4


def test_what_paid_at_a_small_batch_is_not_assumed_at_a_large_one() -> None:
    """Speculation pays at batch 2 (cheap verify rows) and loses at batch 64 (each draft
    row costs a plain row): the large batch keeps > 97 % of plain decoding's
    rate even in a short run, the try of the small batch's choice included."""

    def cost(batch: int, k: int) -> float:
        return 1.0 + (0.02 if batch <= 2 else 1.0) * k

    policy = DraftLengthPolicy(config(6), step_cost=cost)
    drive(policy, 2, 300, lambda _: 0.9)
    assert policy.buckets[2].choice == 6
    lengths, seconds, tokens = drive(policy, 64, 300, lambda _: 0.8)
    assert policy.buckets[batch_bucket(64)].choice == 0
    assert lengths[:4] == [0] * 4 and lengths[4] == 6  # the try, abandoned at once
    assert tokens / seconds > 0.97 * 64


def test_fixed_length_and_disable_by_batch_size() -> None:
    fixed = DraftLengthPolicy(config(3, adaptive_draft_length=False))
    assert fixed.plan(100) == 3
    limited = DraftLengthPolicy(config(3, adaptive_draft_length=False, disable_by_batch_size=8))
    assert limited.enabled(7) and not limited.enabled(8)
    assert limited.plan(7) == 3 and limited.plan(8) == 0
    limited.begin_step(8, 0)
    assert limited.draft_length() == 0


def test_counters_and_shortfalls() -> None:
    policy = DraftLengthPolicy(config(4, adaptive_draft_length=False))
    state = RequestSpecState()
    for _ in range(10):
        policy.observe(state, 4, 4, 4)
    high = state.acceptance_rate()
    for _ in range(60):
        policy.observe(state, 4, 0, 0)  # asked for 4, nothing proposed: no gain
    assert state.acceptance_rate() < 0.2 < 0.9 < high
    stats = policy.stats
    # Steps without a proposal are no drafts in vLLM's counters.
    assert stats.num_drafts == 10 and stats.num_draft_tokens == 40
    assert stats.num_accepted_tokens == 40 and stats.num_accepted_tokens_per_pos == [10] * 4
    assert stats.mean_acceptance_length == 5.0


def test_probes_that_lose_cost_at_most_their_budget() -> None:
    # Batch 256: a k = 1 step costs twice a plain one for 1.9 tokens a request (5 % short
    # of plain decoding). Each losing probe waits until its lost time, transitions
    # included, is PROBE_BUDGET of the time since: over 1000 steps the probes start
    # three times (the doubling waits alone would start six), and the run keeps 99 %.
    policy = DraftLengthPolicy(config(1), step_cost=lambda b, k: 1.0 + 1.0 * k)
    lengths, seconds, tokens = drive(policy, 256, 1000, lambda _: 0.9)
    starts = sum(
        1 for before, now in zip([0, *lengths[:-1]], lengths, strict=True) if now and not before
    )
    assert starts <= 3, starts
    assert policy.buckets[batch_bucket(256)].choice == 0
    assert tokens / seconds > 0.99 * 256


def test_a_first_small_batch_starts_speculating_and_tries_plain_soon() -> None:
    # Batch 2, the first the policy sees: it drafts num_speculative_tokens from the first
    # step (a proposer with its own cache stays in step), probes plain decoding after a
    # few steps and keeps whichever makes more tokens a second.
    cheap = DraftLengthPolicy(config(4), step_cost=lambda b, k: 1.0 + 0.05 * k)
    lengths, _, _ = drive(cheap, 2, 60, lambda _: 0.8)
    assert lengths[0] == 4 and 0 in lengths[:12]
    assert cheap.buckets[batch_bucket(2)].choice == 4
    costly = DraftLengthPolicy(config(4), step_cost=lambda b, k: 1.0 + 2.0 * k)
    lengths, _, _ = drive(costly, 2, 60, lambda _: 0.3)
    assert lengths[0] == 4 and lengths[-20:] == [0] * 20
    # A first batch of more than SPECULATE_FIRST_UP_TO starts without speculation.
    large = DraftLengthPolicy(config(4), step_cost=lambda b, k: 1.0 + 0.05 * k)
    assert drive(large, 8, 3, lambda _: 0.8)[0] == [0, 0, 0]


def test_speculation_must_beat_plain_decoding_by_a_margin() -> None:
    # Batch 16, k = 1 at acceptance 0.9 (1.9 tokens a step): 5 % more tokens a second than
    # plain decoding is within what step times understate, so it stays plain; 20 % wins.
    def run(gain: float) -> int:
        cost = expected_tokens(0.9, 1) / gain
        policy = DraftLengthPolicy(config(1), step_cost=lambda b, k: 1.0 if k == 0 else cost)
        drive(policy, 16, 400, lambda _: 0.9)
        return policy.buckets[batch_bucket(16)].choice

    assert run(1.05) == 0
    assert run(1.2) == 1


def test_remembers_where_speculation_paid_after_acceptance_goes() -> None:
    # Batch 1 pays (cheap drafts, high acceptance); batch 64 does not.
    def cost(batch: int, k: int) -> float:
        return 1.0 + (0.05 if batch == 1 else 1.0) * k

    policy = DraftLengthPolicy(config(4), step_cost=cost)
    drive(policy, 1, 100, lambda _: 0.9)
    assert policy.buckets[1].choice == 4 and policy.buckets[1].paid
    # Acceptance gone: plain steps, and batch 1 still knows speculating paid there.
    drive(policy, 1, 100, lambda _: 0.0, seed=1)
    assert policy.buckets[1].choice == 0 and policy.buckets[1].paid
    drive(policy, 64, 200, lambda _: 0.9)
    bucket = policy.buckets[batch_bucket(64)]
    assert bucket.choice == 0 and not bucket.paid


def test_values_each_mode_at_what_all_its_steps_realized() -> None:
    """Clean steps say speculating pays (k = 4 at acceptance 0.8: 1.9x), but speculating
    requests finish at different steps and the batch refills one at a time: every 4th
    speculating step is a mixed prefill step costing 16 plain steps, every 64th plain
    one. Over every step speculating makes 40 tokens a unit of time, plain decoding 52:
    the rule settles on plain decoding and the run keeps > 97 % of its rate."""
    policy = DraftLengthPolicy(config(4))
    now = [0.0]
    policy.clock = lambda: now[0]
    states = [RequestSpecState() for _ in range(64)]
    rng = random.Random(0)
    counts = {False: 0, True: 0}  # steps run plain and speculating
    tokens = 0
    for _ in range(4000):
        k = policy.plan(64)
        policy.begin_step(64, k)
        counts[k > 0] += 1
        mixed = counts[True] % 4 == 0 if k else counts[False] % 64 == 0
        made = 0
        for state in states:
            accepted = 0
            while accepted < k and rng.random() < 0.8:
                accepted += 1
            if k:
                policy.observe(state, k, k, accepted)
            made += accepted + 1
        tokens += made
        now[0] += 16.0 if mixed else 1.0 + 0.2 * k
        policy.step_done(64, k, not mixed, lambda: states, made)
    assert policy.buckets[batch_bucket(64)].choice == 0
    plain_rate = 64 * 64 / (63 + 16)
    assert tokens / now[0] > 0.97 * plain_rate, tokens / now[0] / plain_rate


def test_plain_decoding_is_probed_again_while_speculating() -> None:
    """A batch's first plain steps ran slow (3 units instead of 1: say, the host was busy),
    so drafting 6 (6.1 units for 5.2 tokens at acceptance 0.9) looked better and won. Its
    one neighbour, 5, loses; only a probe of plain decoding finds it back at 1 unit, and
    plain decoding takes over."""

    def cost(plain: float):  # noqa: ANN202
        return lambda batch, k: plain if k == 0 else 5.5 + 0.1 * k

    policy = DraftLengthPolicy(config(6), step_cost=cost(3.0))
    states = [RequestSpecState() for _ in range(16)]
    assert drive(policy, 16, 16, lambda _: 0.9, states=states)[0] == [0] * 16
    policy.step_cost = cost(1.0)
    lengths, _, _ = drive(policy, 16, 3000, lambda _: 0.9, states=states)
    assert lengths[:5] == [6] * 5  # the probe of 6 won against the slow plain steps
    assert policy.buckets[batch_bucket(16)].choice == 0
    assert lengths[-500:].count(0) > 480
