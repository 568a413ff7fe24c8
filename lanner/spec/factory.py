"""SpeculativeDecoding: the pieces the engine core holds when speculation is on (the
proposer, the draft-length policy, the rejection sampler), built from the config."""

from __future__ import annotations

from dataclasses import dataclass

from lanner.memory.kv_cache import kv_cache_torch_dtype
from lanner.model.loader import LoadedModel
from lanner.spec.config import SpeculativeConfig
from lanner.spec.policy import DraftLengthPolicy
from lanner.spec.proposer import Proposer
from lanner.spec.rejection_sampler import RejectionSampler


@dataclass
class SpeculativeDecoding:
    config: SpeculativeConfig
    proposer: Proposer
    policy: DraftLengthPolicy
    sampler: RejectionSampler

    @property
    def num_speculative_tokens(self) -> int:
        return self.config.num_speculative_tokens

    @classmethod
    def build(
        cls,
        config: SpeculativeConfig,
        target: LoadedModel,
        kv_cache_dtype: str,
        block_size: int,
        max_model_len: int,
        enforce_eager: bool,
        load_format: str,
        seed: int,
    ) -> SpeculativeDecoding:
        proposer: Proposer
        if config.method == "ngram":
            from lanner.spec.ngram import NgramProposer

            proposer = NgramProposer(config)
        elif config.method in ("eagle", "eagle3"):
            from lanner.spec.eagle import EagleProposer, load_head

            head = load_head(config, target, load_format, seed, max_model_len)
            proposer = EagleProposer(
                head,
                target,
                block_size,
                kv_cache_torch_dtype(kv_cache_dtype, target.dtype),
                enforce_eager,
                config.num_speculative_tokens,
            )
        else:
            from lanner.spec.draft_model import DraftModelProposer, load_draft_model

            draft = load_draft_model(config, target, load_format, seed, max_model_len)
            proposer = DraftModelProposer(
                draft,
                block_size,
                kv_cache_torch_dtype(kv_cache_dtype, draft.dtype),
                enforce_eager,
                config.num_speculative_tokens,
            )
        return cls(config, proposer, DraftLengthPolicy(config), RejectionSampler())

    def draft_length(self, num_running: int) -> int:
        """The scheduler's question: drafts each decoding request may get this step."""
        return self.policy.draft_length() if self.policy.enabled(num_running) else 0
