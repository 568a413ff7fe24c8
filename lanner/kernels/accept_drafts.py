"""Speculative verification's acceptance in one launch: from the target's sample at every
verified row and each request's drafts, the tokens each request keeps (its accepted
drafts, then the target's token at the first rejection or after the last draft), written
as one [requests, 2 + max_k] int64 tensor the host copies at once. The pure-torch
reference of the same rule sits beside it (the CPU's path, and the kernel's oracle).

A draft is accepted when its decision says so: by default the point-mass rule (the
target's sample at the draft's row equals the draft), or, where ``decisions`` holds 0 or
1, that value (drafts drawn from a distribution, tested with min(1, p/q) by the caller).
Where such a decided draft is the first rejection, the token kept there is the caller's
``residual`` draw instead of the target's sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start


# The batch's size and longest draft change from step to step: specializing on them (1,
# multiples of 16) would compile a new variant mid-run whenever they did.
@triton.jit(do_not_specialize=["drafts_stride", "num_requests", "max_k"])
def _accept_drafts_kernel(
    targets_ptr,
    meta_ptr,
    drafts_ptr,
    drafts_stride,
    decisions_ptr,
    residual_ptr,
    out_ptr,
    num_requests,
    max_k,
    BLOCK: tl.constexpr,
    HAS_DECISIONS: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per request: meta holds [first logits row | draft count | draft row]
    of every request, each a run of num_requests int64."""
    pdl_start(PDL)
    request = tl.program_id(0)
    first = tl.load(meta_ptr + request)
    count = tl.load(meta_ptr + num_requests + request)
    draft_row = tl.load(meta_ptr + 2 * num_requests + request)
    lanes = tl.arange(0, BLOCK)
    has_draft = lanes < count
    drafts = tl.load(drafts_ptr + draft_row * drafts_stride + lanes, mask=has_draft, other=-1)
    # Row first + j predicts the token after draft j (row first: after the known tokens).
    targets = tl.load(targets_ptr + first + lanes, mask=lanes <= count, other=-1)
    passes = has_draft & (drafts == targets)
    if HAS_DECISIONS:
        decided = tl.load(decisions_ptr + request * max_k + lanes, mask=has_draft, other=-1)
        passes = tl.where(decided >= 0, decided > 0, passes) & has_draft
    # The first lane that fails: lanes past the drafts always do (BLOCK > max_k).
    num_accepted = tl.min(tl.where(passes, BLOCK, lanes), 0)
    final = tl.sum(tl.where(lanes == num_accepted, targets, 0), 0)
    if HAS_DECISIONS:
        rejected = num_accepted < count
        at = request * max_k + num_accepted
        decided_there = tl.load(decisions_ptr + at, mask=rejected, other=-1)
        residual = tl.load(residual_ptr + at, mask=rejected, other=-1)
        final = tl.where(rejected & (decided_there >= 0), residual, final)
    tokens = tl.where(lanes < num_accepted, drafts, tl.where(lanes == num_accepted, final, -1))
    row = out_ptr + request * (max_k + 2)
    tl.store(row, (num_accepted + 1).to(tl.int64))
    tl.store(row + 1 + lanes, tokens.to(tl.int64), mask=lanes <= max_k)


def accept_drafts(
    targets: torch.Tensor,
    meta: torch.Tensor,
    drafts: torch.Tensor,
    max_k: int,
    decisions: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """[R, 2 + max_k] int64: per request its number of new tokens (accepted drafts + 1),
    then the tokens, -1 past them.

    ``targets`` [E] int64: the target's sample at every logits row. ``meta`` int64 [3 * R]:
    each request's first logits row, draft count (<= max_k) and row in ``drafts`` [D, >=
    max_k] int64 (read only below the count). ``decisions`` int8 [R, max_k] (-1: the point-mass
    rule, 0: rejected, 1: accepted) and ``residual`` int64 [R, max_k], both or neither.
    On CUDA the kernel runs; elsewhere the reference."""
    if not targets.is_cuda:
        return accept_drafts_reference(targets, meta, drafts, max_k, decisions, residual)
    return accept_drafts_kernel(targets, meta, drafts, max_k, decisions, residual)


def accept_drafts_kernel(
    targets: torch.Tensor,
    meta: torch.Tensor,
    drafts: torch.Tensor,
    max_k: int,
    decisions: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``accept_drafts`` through the Triton kernel, on whatever device the tensors are
    (the CPU under TRITON_INTERPRET=1)."""
    num_requests = meta.shape[0] // 3
    out = torch.empty((num_requests, max_k + 2), dtype=torch.int64, device=targets.device)
    if num_requests == 0:
        return out
    has_decisions = decisions is not None
    _accept_drafts_kernel[(num_requests,)](
        targets,
        meta,
        drafts,
        drafts.stride(0),
        decisions if has_decisions else meta,  # not read without decisions
        residual if has_decisions else meta,
        out,
        num_requests,
        max_k,
        # One variant for every k up to 7 (lanes past max_k are masked).
        BLOCK=max(8, triton.next_power_of_2(max_k + 1)),
        HAS_DECISIONS=has_decisions,
        num_warps=1,
        **launch_options(targets),
    )
    return out


def accept_drafts_reference(
    targets: torch.Tensor,
    meta: torch.Tensor,
    drafts: torch.Tensor,
    max_k: int,
    decisions: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``accept_drafts`` in torch."""
    num_requests = meta.shape[0] // 3
    count = meta[num_requests : 2 * num_requests]
    draft_grid, target_grid = draft_and_target_grids(targets, meta, drafts, max_k)
    lanes = torch.arange(max_k + 1, device=targets.device)
    has_draft = lanes[:max_k] < count.unsqueeze(1)
    passes = has_draft & (draft_grid == target_grid[:, :max_k])
    if decisions is not None:
        passes = torch.where(decisions >= 0, decisions > 0, passes) & has_draft
    num_accepted = passes.long().cumprod(dim=1).sum(dim=1)
    at = num_accepted.unsqueeze(1)
    final = target_grid.gather(1, at).squeeze(1)
    if decisions is not None and residual is not None and max_k:
        clamped = at.clamp(max=max_k - 1)
        rejected = (num_accepted < count) & (decisions.gather(1, clamped).squeeze(1) >= 0)
        final = torch.where(rejected, residual.gather(1, clamped).squeeze(1), final)
    extended = torch.cat([draft_grid, draft_grid.new_full((num_requests, 1), -1)], dim=1)
    tokens = torch.where(lanes < at, extended, torch.where(lanes == at, final.unsqueeze(1), -1))
    return torch.cat([(num_accepted + 1).unsqueeze(1), tokens], dim=1)


def draft_and_target_grids(
    targets: torch.Tensor, meta: torch.Tensor, drafts: torch.Tensor, max_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, max_k] each request's drafts (-1 past them) and [R, max_k + 1] the target's
    sample at each of its rows (lanes past its drafts repeat its last row)."""
    num_requests = meta.shape[0] // 3
    first, count, draft_row = meta[: 3 * num_requests].view(3, num_requests).unbind(0)
    lanes = torch.arange(max_k + 1, device=targets.device)
    beyond = lanes[:max_k] >= count.unsqueeze(1)
    if drafts.shape[0] == 0:  # no request has drafts: nothing is read
        drafts = drafts.new_full((1, max_k), -1)
    draft_grid = drafts[draft_row.clamp(min=0)][:, :max_k].masked_fill(beyond, -1)
    rows = first.unsqueeze(1) + torch.minimum(lanes, count.unsqueeze(1))
    return draft_grid, targets[rows]
