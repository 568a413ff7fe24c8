"""The rejection sampler: checks each request's proposed tokens against the target's logits
in one pass on the device, so that what comes out is distributed exactly as the target's
own samples (Leviathan et al. 2023; Chen et al. 2023).

A request with k drafts d_1..d_k brings k + 1 rows of target logits: row j predicts the
token after d_j (row 0 the token after its last accepted one). Each row is processed as
the plain sampler would process it at that position (penalties counting the drafts before
it, min_tokens, temperature, top-k / top-p / min-p, the seed's step), and then:

- A draft without a distribution (n-gram lookup, a greedy draft model: q is a point mass)
  is accepted when the target's own sample at its row, with that row's noise, equals it;
  the first row whose sample differs gives that sample. This is the rule accept with
  probability p(d), else draw from p without d, with the randomness coupled to the plain
  sampler's: a seeded request gets the very tokens it gets without speculation (greedy
  rows: accept while the argmax matches).
- A draft drawn from a distribution q (a sampling draft model) is accepted with
  probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
  norm(max(0, p - q)). When every draft is accepted, the last row's own sample is the
  bonus token.

Every draw is seeded per request and position (salted apart), so a seeded request's
tokens depend only on its own logits, drafts and seed, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lanner.kernels.accept_drafts import accept_drafts, draft_and_target_grids
from lanner.kernels.transfer import to_device
from lanner.runner.model_runner import DeviceDrafts
from lanner.runner.sampler import (
    Sampler,
    SamplingRow,
    TokenLogprobs,
    VerifyOutput,
    apply_grammar_bitmasks,
    apply_min_tokens,
    apply_penalties,
    apply_token_constraints,
    apply_top_k_top_p_min_p,
    column,
    decode_seed,
    exponential_draws,
    greedy_tokens,
    pack_logprobs,
    race,
    sample,
    unpack_logprob_row,
)

# Seeds of the acceptance draws and of the residual draws, kept apart from the target's
# sampling noise (which the bonus token and point-mass drafts use, unsalted) and from the
# draft model's (DRAFT_SEED_SALT).
ACCEPT_SEED_SALT = 0x5BD1E995
RESIDUAL_SEED_SALT = 0x27D4EB2F
DRAFT_SEED_SALT = 0x165667B1


@dataclass
class DeviceVerify:
    """A verification still on the device, its host copy under way."""

    token_ids: torch.Tensor  # [R, max_k + 1] int64: each request's new tokens, -1 past them
    num_tokens: torch.Tensor  # [R] int64: accepted drafts + 1
    host: torch.Tensor  # [R, max_k + 2]: num_tokens, then token_ids
    host_logprobs: torch.Tensor | None  # [E, 3 + 2 * top] packed rows, one per logits row
    ready: torch.cuda.Event | None
    rows: list[SamplingRow]  # one per request
    first_rows: list[int]  # each request's first logits row

    def collect(self) -> VerifyOutput:
        """Wait for the host copy (the step's one device sync) and unpack it."""
        if self.ready is not None:
            self.ready.synchronize()
        packed = self.host.tolist()
        logprob_rows = self.host_logprobs.tolist() if self.host_logprobs is not None else None
        tokens: list[list[int]] = []
        logprobs: list[list[TokenLogprobs] | None] = []
        for values, row, first in zip(packed, self.rows, self.first_rows, strict=True):
            count = int(values[0])
            tokens.append([int(t) for t in values[1 : 1 + count]])
            wanted = row.params.logprobs
            if wanted is None or logprob_rows is None:
                logprobs.append(None)
                continue
            infos = [unpack_logprob_row(logprob_rows[first + j]) for j in range(count)]
            for info in infos:
                info.top = info.top[:wanted]
            logprobs.append(infos)
        return VerifyOutput(tokens, logprobs)


class RejectionSampler(Sampler):
    """The target's sampler when speculation is on: ``launch`` samples rows without drafts
    as ``Sampler`` does; ``verify`` checks rows with drafts (and takes rows without any,
    as requests with zero drafts, in the same pass)."""

    @staticmethod
    def accept(passes: torch.Tensor) -> torch.Tensor:
        """The acceptance decision from each draft's test (its row's sample equals it, or
        its draw under p/q): kept apart so that a test can put a wrong rule here and see
        the statistical test fail."""
        return passes

    def verify(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        drafts: Sequence[Sequence[int]],
        device_drafts: DeviceDrafts | None = None,
        draft_rows: Sequence[int | None] = (),
    ) -> DeviceVerify:
        """Verify every request's drafts; launch only, the host copy under way.

        ``logits`` holds len(drafts[i]) + 1 consecutive rows per request i, in order.
        ``drafts[i]`` are request i's proposed tokens on the host; where they are still
        on the device (a draft model's), they are row ``draft_rows[i]`` of
        ``device_drafts`` and ``drafts[i]`` may hold placeholders (their number is what
        counts, unless the request reads its output history: penalties, bad words).
        ``device_drafts.probs``: the distribution each draft was drawn from (None, or a
        greedy request: point masses).
        """
        counts = [len(d) for d in drafts]
        num_requests = len(rows)
        max_k = max(counts, default=0)
        first_rows = [0] * num_requests
        num_logit_rows = 0
        for i, count in enumerate(counts):
            first_rows[i] = num_logit_rows
            num_logit_rows += count + 1
        if logits.dim() != 2 or logits.shape[0] != num_logit_rows:
            raise ValueError(
                f"verify needs one logits row per request plus one per draft token "
                f"({num_logit_rows}), got shape {tuple(logits.shape)}"
            )
        device = logits.device
        wants_logprobs = any(r.params.logprobs is not None for r in rows)
        num_top = max((r.params.logprobs or 0 for r in rows), default=0)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if wants_logprobs else None
        expanded: list[SamplingRow] = []
        if _plain_argmax(rows, counts):
            # Greedy rows that no processing changes: every row's sample is its argmax.
            targets = greedy_tokens(logits)
        else:
            for row, proposed in zip(rows, drafts, strict=True):
                expanded.append(row)
                expanded += [
                    SamplingRow(
                        row.params,
                        row.prompt_token_ids,
                        row.output_token_ids,
                        row.eos_token_ids,
                        list(proposed[:j]),
                        token_bitmask=(
                            row.token_bitmask.row(j) if row.token_bitmask is not None else None
                        ),
                    )
                    for j in range(1, len(proposed) + 1)
                ]
            # The plain sampler's processing, in its order, for every row; a grammar's
            # bitmask at each draft's row (a draft it refuses cannot be accepted).
            logits = apply_token_constraints(logits, expanded)
            logits = apply_grammar_bitmasks(logits, expanded)
            logits = apply_min_tokens(apply_penalties(logits, expanded), expanded)
            # The plain sampler's draw at every row: exactly what each position would
            # sample without speculation.
            targets = sample(logits, expanded)

        # Each request's first row, draft count and row of the drafts tensor, staged with
        # the host's drafts (if any) in one copy.
        host_drafts = [i for i in range(num_requests) if counts[i] and _row(draft_rows, i) is None]
        source_rows = [_row(draft_rows, i) for i in range(num_requests)]
        num_device_rows = device_drafts.token_ids.shape[0] if device_drafts is not None else 0
        for position, i in enumerate(host_drafts):
            source_rows[i] = num_device_rows + position
        staged = first_rows + counts + [0 if r is None else r for r in source_rows]
        for i in host_drafts:
            staged += list(drafts[i]) + [-1] * (max_k - counts[i])
        meta = to_device(staged, torch.long, device)
        draft_source = meta[3 * num_requests :].view(len(host_drafts), max_k)
        if device_drafts is not None:
            device_tokens = device_drafts.token_ids
            if device_tokens.shape[1] < max_k:
                raise ValueError(
                    f"device drafts hold {device_tokens.shape[1]} tokens a row, fewer than "
                    f"the {max_k} a request verifies"
                )
            draft_source = (
                torch.cat([device_tokens[:, :max_k], draft_source])
                if host_drafts
                else device_tokens
            )
        meta = meta[: 3 * num_requests]

        decisions = residual = None
        draft_probs = device_drafts.probs if device_drafts is not None else None
        sampled_drafts = [
            i
            for i in range(num_requests)
            if draft_probs is not None
            and counts[i]
            and _row(draft_rows, i) is not None
            and not rows[i].params.is_greedy
        ]
        custom_rule = type(self).accept is not _POINT_MASS_RULE
        if sampled_drafts or custom_rule:
            decisions = torch.full((num_requests, max_k), -1, dtype=torch.int8, device=device)
            residual = torch.full((num_requests, max_k), -1, dtype=torch.long, device=device)
        if custom_rule:
            # A replaced rule (a test's) decides every draft, from the same tests.
            assert decisions is not None
            draft_grid, target_grid = draft_and_target_grids(targets, meta, draft_source, max_k)
            in_range = torch.arange(max_k, device=device).unsqueeze(0) < meta[
                num_requests : 2 * num_requests
            ].unsqueeze(1)
            chosen = self.accept(target_grid[:, :max_k] == draft_grid) & in_range
            decisions.copy_(torch.where(in_range, chosen.to(torch.int8), -1))
            residual.copy_(target_grid[:, :max_k])
        if sampled_drafts:
            assert decisions is not None and residual is not None and draft_probs is not None
            draft_grid, _ = draft_and_target_grids(targets, meta, draft_source, max_k)
            passes, resampled = self._check_sampled_drafts(
                logits,
                expanded,
                first_rows,
                counts,
                sampled_drafts,
                [draft_rows[i] for i in sampled_drafts],  # type: ignore[misc]
                draft_grid,
                draft_probs,
            )
            flat = to_device(
                [i * max_k + j for i in sampled_drafts for j in range(counts[i])],
                torch.long,
                device,
            )
            decisions.view(-1)[flat] = self.accept(passes).to(torch.int8)
            residual.view(-1)[flat] = resampled
        packed = accept_drafts(targets, meta, draft_source, max_k, decisions, residual)
        logprob_source = None
        if raw_logprobs is not None:
            # Each row's own token: the accepted draft there, or the final token.
            row_tokens = [
                i * (max_k + 2) + 1 + j for i in range(num_requests) for j in range(counts[i] + 1)
            ]
            chosen_tokens = packed.view(-1)[to_device(row_tokens, torch.long, device)]
            logprob_source = pack_logprobs(raw_logprobs, chosen_tokens.clamp(min=0), num_top)
        return _start_copy(
            DeviceVerify(
                packed[:, 1:],
                packed[:, 0],
                packed,
                logprob_source,
                None,
                list(rows),
                first_rows,
            )
        )

    @staticmethod
    def _check_sampled_drafts(
        logits: torch.Tensor,
        expanded: list[SamplingRow],
        first_rows: list[int],
        counts: list[int],
        requests: list[int],
        probs_rows: list[int],
        draft_grid: torch.Tensor,
        draft_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the drafts drawn from a distribution q: whether each is accepted (with
        probability min(1, p/q)), and a draw from norm(max(0, p - q)) at each position,
        used where the first rejection falls. Flat over (request, draft), in order."""
        device = logits.device
        width = draft_probs.shape[1]
        row_index = [first_rows[i] + j for i in requests for j in range(counts[i])]
        probs_index = [
            r * width + j
            for i, r in zip(requests, probs_rows, strict=True)
            for j in range(counts[i])
        ]
        rows = [expanded[r] for r in row_index]
        index = to_device(row_index, torch.long, device)
        # p: the target's distribution at each draft's row, as the plain sampler draws.
        scaled = logits.index_select(0, index).float() / column(
            [r.params.temperature for r in rows], device
        )
        if any(r.params.uses_truncation for r in rows):
            scaled = apply_top_k_top_p_min_p(scaled, rows)
        p = torch.softmax(scaled, dim=-1)
        q = draft_probs.reshape(-1, draft_probs.shape[-1])[
            to_device(probs_index, torch.long, device)
        ].float()
        token = draft_grid[
            to_device([i for i in requests for _ in range(counts[i])], torch.long, device),
            to_device([j for i in requests for j in range(counts[i])], torch.long, device),
        ].unsqueeze(1)
        p_token = p.gather(1, token).squeeze(1)
        q_token = q.gather(1, token).squeeze(1)
        # u < p/q with u = exp(-E), E ~ Exp(1): E > log q - log p (never when p = 0).
        steps = [r.num_outputs for r in rows]
        accept_draws = exponential_draws(
            _salted_seeds(rows, steps, ACCEPT_SEED_SALT), 1, device
        ).squeeze(1)
        accept = accept_draws > (q_token.log() - p_token.log())
        residual = (p - q).clamp_(min=0.0)
        # p <= q everywhere means p == q: then no draft is rejected and this is unused.
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(empty, p, residual)
        resampled = race(
            residual.log(), [1.0] * len(rows), _salted_seeds(rows, steps, RESIDUAL_SEED_SALT)
        )
        return accept, resampled


# The rule accept() is by default: a replaced one makes verify hand it every draft's test.
_POINT_MASS_RULE = RejectionSampler.accept


def _plain_argmax(rows: Sequence[SamplingRow], counts: list[int]) -> bool:
    """Whether every row's sample is the argmax of its raw logits: greedy requests whose
    logits no constraint, grammar, penalty or pending min_tokens changes at any verified
    row."""
    return all(
        r.params.is_greedy
        and not r.params.uses_token_constraints
        and not r.params.uses_penalties
        and r.token_bitmask is None
        and len(r.output_token_ids) >= r.params.min_tokens
        for r in rows
    )


def _row(draft_rows: Sequence[int | None], index: int) -> int | None:
    return draft_rows[index] if index < len(draft_rows) else None


def _salted_seeds(rows: list[SamplingRow], steps: list[int], salt: int) -> list[int | None]:
    return [
        None if r.params.seed is None else decode_seed(r.params.seed ^ salt, step)
        for r, step in zip(rows, steps, strict=True)
    ]


def _start_copy(result: DeviceVerify) -> DeviceVerify:
    """Start the copies to the host: pinned buffers and an event on CUDA."""
    if not result.host.is_cuda:
        return result
    host = torch.empty(result.host.shape, dtype=result.host.dtype, pin_memory=True)
    host.copy_(result.host, non_blocking=True)
    result.host = host
    if result.host_logprobs is not None:
        packed = torch.empty(result.host_logprobs.shape, dtype=torch.float64, pin_memory=True)
        packed.copy_(result.host_logprobs, non_blocking=True)
        result.host_logprobs = packed
    result.ready = torch.cuda.Event()
    result.ready.record()
    return result
