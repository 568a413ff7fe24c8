"""Batched sampling on the logits' device: penalties, temperature, top-k/p, min-p, logprobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lanner.kernels import ops
from lanner.kernels.sampling import (
    exponential_noise,
    exponential_race,
    exponential_race_reference,
)
from lanner.kernels.transfer import tensor_to_device, to_device

if TYPE_CHECKING:
    # Only for annotations: the sampler reads params' fields and never builds them, so the
    # runner does not import the engine layer at run time; the runner builds the graphs.
    from lanner.runner.sampling_graphs import SamplingGraphs
    from lanner.sampling_params import SamplingParams

_MASK_64 = (1 << 64) - 1


@dataclass
class TokenBitmasks:
    """One step's grammar bitmasks on the host, shared by all its rows: xgrammar's int32
    words (bit j of word w for token 32 * w + j), one row per position sampled under a
    grammar; pinned on CUDA, so that the step's one copy to the device is queued."""

    words: torch.Tensor  # [capacity, ceil(vocab / 32)] int32; the first num_rows are filled
    num_rows: int
    # Recorded after the copy to the device was queued: the host may refill the buffer
    # once it has passed. None before the first copy and on the CPU.
    copied: torch.cuda.Event | None = None


@dataclass(slots=True)  # not frozen: a step makes one a row, and frozen ones init slower
class BitmaskRows:
    """A sampling row's bitmasks: rows ``start`` to ``start + count`` of its step's."""

    bitmasks: TokenBitmasks
    start: int
    count: int

    def row(self, offset: int) -> BitmaskRows:
        """The bitmask after ``offset`` of the row's drafts."""
        return BitmaskRows(self.bitmasks, self.start + offset, 1)

    def words(self) -> torch.Tensor:
        """The words of these rows (a view of the step's buffer)."""
        return self.bitmasks.words[self.start : self.start + self.count]


@dataclass
class SamplingRow:
    """One row of logits to sample from, with what its request has seen so far."""

    params: SamplingParams
    prompt_token_ids: list[int]
    # Tokens generated so far: for penalties, min_tokens, and the seeded generator's step.
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]  # the model's EOS ids, masked until min_tokens is reached
    # Speculative decoding: proposed tokens that precede this row's position (row j of a
    # verified run sees the first j drafts as outputs: penalties count them, min_tokens
    # and the seeded generator's step include them). Placeholders where only their
    # number matters (no penalties).
    draft_token_ids: Sequence[int] = ()
    # Structured outputs: the grammar's next-token bitmasks, rows of its step's buffer,
    # one per position sampled (1 + its drafts: the verifier gives each draft's row its
    # own); None when the request has no grammar.
    token_bitmask: BitmaskRows | None = None
    # Trailing entries of output_token_ids that precede nothing here: a deferred sampling's
    # row holds its request's live list, which by then ends in the placeholder of the
    # token this row samples. Counted off rather than copied: at W10's W3 on the H200 the
    # copies took 0.3 ms a step, and young collections (which traverse young lists whole)
    # 0.56 ms a step more than the free run's. Never set with drafts: a step that
    # verifies them is not deferred.
    num_pending: int = 0

    @property
    def num_generated(self) -> int:
        """The generated tokens before this row's position (its drafts not counted)."""
        return len(self.output_token_ids) - self.num_pending

    @property
    def num_outputs(self) -> int:
        """Outputs before this row's position: the generated ones plus its drafts."""
        return self.num_generated + len(self.draft_token_ids)

    def outputs(self) -> list[int]:
        """The tokens penalties count as generated before this row's position."""
        generated = self.output_token_ids
        if self.num_pending:
            generated = generated[: self.num_generated]
        if not self.draft_token_ids:
            return generated
        return [*generated, *self.draft_token_ids]


@dataclass
class TokenLogprobs:
    """Logprob info for one sampled (or prompt) position, from the raw logits."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely: 1 + the number of tokens with a strictly greater logprob
    top: list[tuple[int, float]]  # the top-k (token id, logprob), most likely first


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row, on the host
    logprobs: list[TokenLogprobs | None]  # per row; None when params.logprobs is None


@dataclass
class VerifyOutput:
    """What a verification of proposed tokens gives (lanner.spec's rejection sampler), per
    request: its new tokens (accepted drafts, then one target token) and their logprobs
    when asked for."""

    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]


@dataclass
class DeviceSample:
    """A sampling result still on the device, its host copy under way."""

    token_ids: torch.Tensor  # [B] int64 on the device: next steps may read it there
    host: torch.Tensor  # token ids, or the packed logprob rows, copying to the host
    ready: torch.cuda.Event | None  # recorded after the copy; None on the CPU
    rows: list[SamplingRow]
    packed: bool
    collected: bool = False  # (a sampling graph reuses its host buffer once it is)

    def collect(self) -> SamplerOutput:
        """Wait for the host copy (the step's one device sync) and unpack it."""
        if self.ready is not None:
            self.ready.synchronize()
        self.collected = True
        if not self.packed:
            return SamplerOutput(self.host.tolist(), [None] * len(self.rows))
        return _unpack(self.host.tolist(), self.rows)


class Sampler:
    """Picks one token per row of logits ``[B, V]``; the only host sync is the final copy."""

    # Set by the runner once its decode graphs are captured: steps whose rows need only
    # the race sample from a graph's logits in one replay (runner/sampling_graphs.py).
    graphs: SamplingGraphs | None = None

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        return self.launch(logits, rows).collect()

    def launch(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        wait_for_bitmasks: Callable[[], None] | None = None,
    ) -> DeviceSample:
        """Sample on the device and start the copy to the host without waiting for it.
        ``wait_for_bitmasks`` (when the rows' grammar bitmasks may still be filling) is
        called just before they are read: the rest of the host's work for the step is
        done by then, while the fill runs."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"the sampler needs logits of shape [num_rows, vocab] with one row per "
                f"SamplingRow, got shape {tuple(logits.shape)} for {len(rows)} rows"
            )
        # The logits stay in the model's dtype: the race widens them to float32 in
        # registers (a [256, 151936] float32 copy cost 120 µs a step on the H100), and
        # the processing below computes in float32 wherever it changes them.
        # vLLM returns logprobs of the model's raw distribution, before any processing.
        num_top = max((r.params.logprobs or 0 for r in rows), default=0)
        wants_logprobs = any(r.params.logprobs is not None for r in rows)
        if self.graphs is not None and not wants_logprobs:
            captured = self.graphs.launch(logits, rows, wait_for_bitmasks)
            if captured is not None:
                return captured
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if wants_logprobs else None

        masks = prepare_grammar_masks(rows, logits.device)
        logits = apply_token_constraints(logits, rows)
        logits = apply_penalties(logits, rows)
        logits = apply_min_tokens(logits, rows)
        # The grammar masks come last (a masked -inf stays -inf through the penalties
        # and min_tokens, so the order changes nothing): the fill has until then.
        token_ids = sample(logits, rows, masks=masks, wait_for_bitmasks=wait_for_bitmasks)

        if raw_logprobs is None:
            return copy_to_host(token_ids, token_ids, rows)
        packed = pack_logprobs(raw_logprobs, token_ids, num_top)
        return copy_to_host(token_ids, packed, rows, packed=True)


def copy_to_host(
    token_ids: torch.Tensor, result: torch.Tensor, rows: list[SamplingRow], packed: bool = False
) -> DeviceSample:
    """A sampling's ``DeviceSample``: ``result`` (the token ids, or their packed logprob
    rows) starts its copy to a pinned host buffer; off CUDA it is the host's already."""
    if not result.is_cuda:
        return DeviceSample(token_ids, result, None, rows, packed)
    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
    host.copy_(result, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return DeviceSample(token_ids, host, ready, rows, packed)


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: list[int], num_top: int
) -> list[TokenLogprobs]:
    """Logprobs of the prompt's own tokens, one per position.

    ``logits[i]`` is the model's prediction after prompt position i; ``next_token_ids[i]``
    the prompt token that actually followed.
    """
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(
            f"prompt_logprobs needs logits of shape [num_positions, vocab] with one row per "
            f"next token, got shape {tuple(logits.shape)} for {len(next_token_ids)} tokens"
        )
    if not next_token_ids:
        return []
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = to_device(next_token_ids, torch.long, logits.device)
    packed = pack_logprobs(raw_logprobs, targets, num_top)
    return [unpack_logprob_row(values) for values in packed.tolist()]


def decode_seed(seed: int, step: int) -> int:
    """The generator seed for a seeded request's ``step``-th output token.

    Stateless (a function of the request's seed and its output length only), so a row
    draws the same noise whatever else is in the batch, and again when recomputed after
    preemption. splitmix64's finalizer spreads nearby (seed, step) pairs far apart.
    """
    x = (seed * 0x9E3779B97F4A7C15 + step) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


# -- logits processing: each step takes [B, V] logits and returns them (float32 if changed) --


def apply_token_constraints(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logit_bias (added), allowed_token_ids (all others to -inf) and bad words (a bad
    sequence's last token to -inf where the output ends with the rest of it).

    Each row's change depends on that row alone, so batch invariance holds. Token ids past
    the logits (a tokenizer larger than the head) are skipped: they cannot be sampled.
    """
    constrained = [i for i, r in enumerate(rows) if r.params.uses_token_constraints]
    if not constrained:
        return logits
    vocab_size = logits.shape[1]
    device = logits.device
    bias_rows: list[int] = []
    bias_tokens: list[int] = []
    bias_values: list[float] = []
    barred_rows: list[int] = []
    barred_tokens: list[int] = []
    allowed_rows: list[int] = []
    allowed_tokens: list[int] = []
    for i in constrained:
        params = rows[i].params
        for token_id, bias in (params.logit_bias or {}).items():
            if token_id < vocab_size:
                bias_rows.append(i)
                bias_tokens.append(token_id)
                bias_values.append(float(bias))
        for token_id in set(params.allowed_token_ids or ()):
            if token_id < vocab_size:
                allowed_rows.append(i)
                allowed_tokens.append(token_id)
        for token_id in _barred_by_bad_words(rows[i]):
            if token_id < vocab_size:
                barred_rows.append(i)
                barred_tokens.append(token_id)
    # A float32 copy: edited in place below, while the caller's logits stay as they were.
    logits = logits.to(torch.float32, copy=True)

    def index(values: list[int]) -> torch.Tensor:
        return to_device(values, torch.long, device)

    if bias_rows:
        biases = to_device(bias_values, torch.float32, device)
        logits.index_put_((index(bias_rows), index(bias_tokens)), biases, accumulate=True)
    if allowed_rows:
        keep = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        keep[index(allowed_rows), index(allowed_tokens)] = True
        keep[index(sorted(set(range(len(rows))) - set(allowed_rows)))] = True  # unlimited rows
        logits.masked_fill_(~keep, float("-inf"))
    if barred_rows:
        logits[index(barred_rows), index(barred_tokens)] = float("-inf")
    return logits


def apply_grammar_bitmasks(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Rows under a grammar keep only the tokens their bitmask allows (the rest -inf), in
    one kernel launch over those rows; the caller's logits stay as they were. Each row
    here samples one position: its bitmask's first row applies. The step's bitmasks go
    to the device in one queued copy of their filled rows (no per-row slices)."""
    masks = prepare_grammar_masks(rows, logits.device)
    return logits if masks is None else masks.apply(logits)


@dataclass(slots=True)
class GrammarMasks:
    """A step's rows under a grammar, ready to mask once their bitmasks are filled: the
    logits rows and the bitmask rows each applies, and each logits row's bitmask row (-1:
    none; what the race reads when it masks as it samples), on the device."""

    bitmasks: TokenBitmasks
    rows: torch.Tensor
    bitmask_rows: torch.Tensor
    row_sources: torch.Tensor

    def copy_bitmasks(self, device: torch.device) -> torch.Tensor:
        """The filled bitmasks on ``device``: one copy, queued (a plain copy would wait
        for the model's step to finish)."""
        bitmasks = self.bitmasks
        words = tensor_to_device(bitmasks.words[: bitmasks.num_rows], device)
        if device.type == "cuda":
            bitmasks.copied = torch.cuda.Event()
            bitmasks.copied.record()
        return words

    def apply(self, logits: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """``apply_grammar_bitmasks``' device part: the filled bitmasks' copy (unless
        ``words`` holds it) and the masking, on a copy of ``logits``."""
        if words is None:
            words = self.copy_bitmasks(logits.device)
        logits = logits.clone()
        ops.apply_token_bitmask(logits, words, self.rows, self.bitmask_rows)
        return logits


def prepare_grammar_masks(rows: list[SamplingRow], device: torch.device) -> GrammarMasks | None:
    """``apply_grammar_bitmasks``' host part, which reads no bitmask (so it runs while
    they fill): None when no row has a grammar."""
    masked = [i for i, r in enumerate(rows) if r.token_bitmask is not None]
    if not masked:
        return None
    bitmasks = rows[masked[0]].token_bitmask.bitmasks  # type: ignore[union-attr]
    starts = []
    for i in masked:
        source = rows[i].token_bitmask
        assert source is not None
        if source.bitmasks is not bitmasks:
            raise ValueError("the rows' grammar bitmasks must come from one step's buffer")
        starts.append(source.start)
    count = len(masked)
    if (
        count == len(rows)
        and masked[-1] == count - 1
        and starts == list(range(starts[0], starts[0] + count))
    ):
        # Every row, in order, on consecutive bitmask rows (a step launched ahead): slices
        # of a counting tensor already there, not an index built and copied each step.
        numbers = _counting(starts[0] + count, device)
        sources = numbers[starts[0] : starts[0] + count]
        return GrammarMasks(bitmasks, numbers[:count], sources, sources)
    row_sources = [-1] * len(rows)
    for i, start in zip(masked, starts, strict=True):
        row_sources[i] = start
    index = to_device(masked + starts + row_sources, torch.long, device)
    return GrammarMasks(bitmasks, index[:count], index[count : 2 * count], index[2 * count :])


_counting_tensors: dict[torch.device, torch.Tensor] = {}


def _counting(size: int, device: torch.device) -> torch.Tensor:
    """0, 1, ... (int64 on ``device``), at least ``size`` of them: made once per device
    (grown when asked for more)."""
    numbers = _counting_tensors.get(device)
    if numbers is None or numbers.numel() < size:
        numbers = torch.arange(max(size, 1024), dtype=torch.long, device=device)
        _counting_tensors[device] = numbers
    return numbers


def _barred_by_bad_words(row: SamplingRow) -> set[int]:
    """Tokens this row may not pick now: a one-token bad word always, a longer one's last
    token when the output so far ends with the rest of it."""
    barred: set[int] = set()
    output = row.outputs()
    for sequence in row.params.bad_words_token_ids or ():
        *head, last = sequence
        if not head or (len(output) >= len(head) and output[len(output) - len(head) :] == head):
            barred.add(last)
    return barred


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (over prompt + output), frequency and presence (over output) penalties.

    Repetition divides positive logits by the penalty and multiplies negative ones (CTRL,
    as HF does), so a seen token always becomes less likely. Frequency subtracts
    penalty x count, presence subtracts penalty once per seen token (OpenAI's definition).
    """
    use_repetition = any(r.params.repetition_penalty != 1.0 for r in rows)
    use_additive = any(
        r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows
    )
    if not (use_repetition or use_additive):
        return logits
    vocab_size = logits.shape[1]
    device = logits.device
    if use_repetition:
        seen = _token_counts([r.prompt_token_ids + r.outputs() for r in rows], vocab_size, device)
        penalty = column([r.params.repetition_penalty for r in rows], device)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen > 0, penalized, logits)
    if use_additive:
        counts = _token_counts([r.outputs() for r in rows], vocab_size, device)
        frequency = column([r.params.frequency_penalty for r in rows], device)
        presence = column([r.params.presence_penalty for r in rows], device)
        logits = logits - frequency * counts - presence * (counts > 0).float()
    return logits


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Until a row has ``min_tokens`` outputs, it cannot pick EOS or a stop token."""
    vocab_size = logits.shape[1]
    row_index: list[int] = []
    token_index: list[int] = []
    for i, row in enumerate(rows):
        if row.num_outputs >= row.params.min_tokens:
            continue
        blocked = set(row.eos_token_ids) | set(row.params.stop_token_ids or ())
        # Ids past the logits (a tokenizer larger than the padded head) cannot be sampled.
        blocked = {t for t in blocked if 0 <= t < vocab_size}
        row_index += [i] * len(blocked)
        token_index += sorted(blocked)
    if not row_index:
        return logits
    logits = logits.clone()
    device = logits.device
    logits[to_device(row_index, torch.long, device), to_device(token_index, torch.long, device)] = (
        float("-inf")
    )
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Set to -inf every token that top_k, top_p or min_p rules out (for each row).

    min_p keeps tokens with probability >= min_p x the top probability, a cut in logit
    space that needs only the row max. top_k and top_p share one descending sort: top_k
    keeps the first k, top_p the shortest prefix whose mass reaches top_p (measured after
    min_p and top_k). The most likely token always survives.
    """
    device = logits.device
    vocab_size = logits.shape[1]
    if any(r.params.min_p > 0.0 for r in rows):
        min_p = column([r.params.min_p for r in rows], device)
        threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p)
        logits = logits.masked_fill(logits < threshold, float("-inf"))

    use_top_k = any(0 < r.params.top_k < vocab_size for r in rows)
    use_top_p = any(r.params.top_p < 1.0 for r in rows)
    if not (use_top_k or use_top_p):
        return logits
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab_size, device=device).unsqueeze(0)
    if use_top_k:
        top_k = [r.params.top_k if r.params.top_k > 0 else vocab_size for r in rows]
        keep_count = to_device(top_k, torch.long, device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(positions >= keep_count, float("-inf"))
    if use_top_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        top_p = column([r.params.top_p for r in rows], device)
        # Rows at top_p == 1 are left alone: rounding can push the running mass to 1.0
        # before the tail, which would cut tokens a no-op setting must keep.
        cut = (mass_before >= top_p) & (top_p < 1.0) & (positions > 0)
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


def sample(
    logits: torch.Tensor,
    rows: list[SamplingRow],
    seed_salt: int = 0,
    masks: GrammarMasks | None = None,
    wait_for_bitmasks: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One token id per row (int64 on the logits' device) from penalized logits.

    Greedy rows take the argmax. The others race: argmax_i(logits_i / T - log E_i) with
    E_i ~ Exp(1) is a draw from softmax(logits / T) (the exponential race in log space: no
    softmax, no cumsum, no sync). Rows with top-k/top-p/min-p race over their logits with the
    cut tokens at -inf. Every sampled row goes through the same arithmetic whatever shares
    its batch, so a seeded row's token depends only on its logits, seed and step.
    ``seed_salt`` gives a seeded row an independent stream (a draft model's proposals must
    not reuse the target's noise). ``masks``: the rows' grammar bitmasks, read once the
    rows' host-side inputs (temperatures, seeds) are ready, after ``wait_for_bitmasks``
    (their fill may still run); on CUDA the race reads them itself unless a row is cut
    (top-k/p and min-p must see the masked logits), which saves a copy of the logits
    and a launch.
    """
    greedy = [r.params.is_greedy for r in rows]
    if all(greedy):
        if masks is None:
            return greedy_tokens(logits)
        words = _filled_bitmasks(masks, logits.device, wait_for_bitmasks)
        if logits.is_cuda:
            # Temperature 0 throughout: the sampled variant, one compile fewer at start.
            greedy_rows = [0.0] * len(rows)
            return race(logits, greedy_rows, [None] * len(rows), (words, masks.row_sources))
        return greedy_tokens(masks.apply(logits, words))
    temperatures, seeds = race_inputs(rows, greedy, seed_salt)
    truncated = [i for i, r in enumerate(rows) if r.params.uses_truncation and not greedy[i]]
    if masks is not None:
        words = _filled_bitmasks(masks, logits.device, wait_for_bitmasks)
        if logits.is_cuda and not truncated:
            return race(logits, temperatures, seeds, (words, masks.row_sources))
        logits = masks.apply(logits, words)
    if not truncated:
        return race(logits, temperatures, seeds)

    # The cut is decided on the temperature-scaled logits, but only the -inf mask is kept:
    # the race divides by T itself, the same way for every row.
    index = to_device(truncated, torch.long, logits.device)
    cut_logits = logits.index_select(0, index)
    cut_temperatures = [temperatures[i] for i in truncated]
    scaled = cut_logits / column(cut_temperatures, logits.device)
    cut = torch.isneginf(apply_top_k_top_p_min_p(scaled, [rows[i] for i in truncated]))
    cut_ids = race(
        cut_logits.masked_fill_(cut, float("-inf")), cut_temperatures, [seeds[i] for i in truncated]
    )
    if len(truncated) == len(rows):
        return cut_ids
    # The first race's picks for the truncated rows are overwritten: one launch over all
    # rows is cheaper than gathering the others.
    return race(logits, temperatures, seeds).index_copy_(0, index, cut_ids)


def race_inputs(
    rows: list[SamplingRow], greedy: list[bool], seed_salt: int = 0
) -> tuple[list[float], list[int | None]]:
    """The race's temperature (0 tells it a row is greedy) and ``decode_seed`` (None: a
    fresh one) of each row."""
    temperatures = [0.0 if g else r.params.temperature for r, g in zip(rows, greedy, strict=True)]
    seeds = [
        None
        if g or r.params.seed is None
        else decode_seed(r.params.seed ^ seed_salt, r.num_outputs)
        for r, g in zip(rows, greedy, strict=True)
    ]
    return temperatures, seeds


def _filled_bitmasks(
    masks: GrammarMasks, device: torch.device, wait_for_bitmasks: Callable[[], None] | None
) -> torch.Tensor:
    if wait_for_bitmasks is not None:
        wait_for_bitmasks()
    return masks.copy_bitmasks(device)


# -- helpers ------------------------------------------------------------------------------


def precompile_sampling(vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Launch the race's kernels, all greedy and sampled, and sampled with a grammar's
    bitmask, once over one row of logits of the model's dtype: under
    kernels.parallel_compile they compile (their variants do not depend on the number of
    rows)."""
    logits = torch.empty((1, vocab_size), dtype=dtype, device=device)
    temperatures = torch.ones(1, dtype=torch.float32, device=device)
    seeds = torch.zeros(1, dtype=torch.int64, device=device)
    exponential_race(logits, None, None)
    exponential_race(logits, temperatures, seeds)
    # With a grammar's bitmask (no row masked here), sampled only (greedy rows under a
    # grammar take it at temperature 0): the sampling graphs capture this variant.
    bitmask = torch.zeros((1, -(-vocab_size // 32)), dtype=torch.int32, device=device)
    no_rows = torch.full((1,), -1, dtype=torch.int64, device=device)
    exponential_race(logits, temperatures, seeds, bitmask, no_rows)


# Vocabularies up to this size take torch.argmax on CUDA, larger ones the race's chunked
# argmax. On the H200 (benchmarks/host_costs.py, 20261202-022822-host-costs.json) argmax
# cost 9-13 µs of host time a call against the race's 55-90 µs (two Triton launches), and
# 5-10 µs of device time against 2-4 µs up to 32,768 columns, but 27 µs against 2.4 µs at
# 128,256 (one row): where the vocabulary is small the host's saving wins.
ARGMAX_MAX_VOCAB = 32768


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (int64 [B]), ties to the lowest column: on CUDA torch.argmax for
    vocabularies up to ARGMAX_MAX_VOCAB, else the race's all-greedy kernel (a chunked
    argmax: torch's single-row argmax over a 128k vocabulary took 37 µs on the H100). On
    the CPU max's indices, the first maximum's as argmax's, took 247 µs where argmax took
    416 µs (32 rows of the demo model's 8,192 logits, one thread)."""
    if logits.is_cuda:
        if logits.shape[1] <= ARGMAX_MAX_VOCAB:
            return logits.argmax(-1)
        return exponential_race(logits, None, None)
    return logits.max(-1).indices


def race(
    logits: torch.Tensor,
    temperatures: list[float],
    seeds: list[int | None],
    bitmasks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The exponential race over each row (temperature 0: argmax). A row's Exp(1) noise comes
    from its ``decode_seed`` where given, else from torch's global generator. On CUDA the
    fused Triton kernel draws it in registers, and reads ``bitmasks`` (the words and each
    row's bitmask row, as ``exponential_race`` takes them) where given; elsewhere the torch
    reference runs (its callers mask the logits first)."""
    device = logits.device
    temperature_tensor = to_device(temperatures, torch.float32, device)
    if logits.is_cuda:
        seed_tensor = to_device(kernel_seeds(seeds), torch.int64, device)
        return exponential_race(logits, temperature_tensor, seed_tensor, *(bitmasks or ()))
    if bitmasks is not None:
        raise ValueError("off CUDA the race takes logits masked already")
    noise = exponential_draws(seeds, logits.shape[1], device)
    return exponential_race_reference(logits, temperature_tensor, noise)


def exponential_draws(seeds: list[int | None], width: int, device: torch.device) -> torch.Tensor:
    """[len(seeds), width] float32 Exp(1) draws, all > 0: row i is a pure function of
    ``seeds[i]`` where given (the draws ``race`` makes for that seed), else fresh."""
    if device.type == "cuda":
        return exponential_noise(kernel_seeds(seeds), width, device)
    noise = torch.empty((len(seeds), width), dtype=torch.float32, device=device).exponential_()
    for i, seed in enumerate(seeds):
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            noise[i].exponential_(generator=generator)
    # exponential_ may return exactly 0, whose log would win the race.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def kernel_seeds(seeds: list[int | None]) -> list[int]:
    # Unseeded rows take their seed from torch's (CPU) generator: no device sync.
    fresh = torch.randint(0, 1 << 62, (len(seeds),)).tolist()
    # Triton reads the seeds as int64: decode_seed's top bit is dropped.
    return [fresh[i] if seed is None else seed >> 1 for i, seed in enumerate(seeds)]


def column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device).unsqueeze(1)


def _token_counts(
    token_lists: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[len(token_lists), vocab_size] float32: how often each token occurs in each list."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    # Pad with vocab_size, an extra column that is dropped: scatter needs equal lengths.
    padded = [tokens + [vocab_size] * (width - len(tokens)) for tokens in token_lists]
    index = to_device(padded, torch.long, device).clamp_(0, vocab_size)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :vocab_size]


def pack_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> torch.Tensor:
    """[B, 3 + 2 * num_top] float64: id, logprob, rank, top ids, top logprobs.

    One tensor so the host gets everything in one copy; float64 holds both the int ids
    and the float32 logprobs exactly.
    """
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    rank = (raw_logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    top = raw_logprobs.topk(min(num_top, raw_logprobs.shape[1]), dim=-1)
    return torch.cat(
        [
            token_ids.unsqueeze(1).double(),
            chosen.double(),
            rank.double(),
            top.indices.double(),
            top.values.double(),
        ],
        dim=1,
    )


def unpack_logprob_row(values: list[float]) -> TokenLogprobs:
    num_top = (len(values) - 3) // 2
    top_ids, top_logprobs = values[3 : 3 + num_top], values[3 + num_top :]
    return TokenLogprobs(
        token_id=int(values[0]),
        logprob=values[1],
        rank=int(values[2]),
        top=[(int(t), lp) for t, lp in zip(top_ids, top_logprobs, strict=True)],
    )


def _unpack(packed: list[list[float]], rows: list[SamplingRow]) -> SamplerOutput:
    token_ids: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    for values, row in zip(packed, rows, strict=True):
        token_ids.append(int(values[0]))
        wanted = row.params.logprobs
        if wanted is None:
            logprobs.append(None)
            continue
        info = unpack_logprob_row(values)
        info.top = info.top[:wanted]
        logprobs.append(info)
    return SamplerOutput(token_ids, logprobs)
