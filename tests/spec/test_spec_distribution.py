"""Sampled outputs with speculation follow the target's distribution: over many fixed
seeds, the first tokens' empirical distribution with speculation equals the one without
(chi-square homogeneity test); with a deliberately wrong acceptance rule the same test
fails, so it can tell. Deterministic: every request is seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lanner import LLM, SamplingParams
from lanner.spec.rejection_sampler import RejectionSampler
from tests.spec.eagle_heads import write_eagle_head
from tests.tiny_models import build_tokenizer

VOCAB = 12
NUM_SEEDS = 600
NUM_TOKENS = 4
PROMPT = {"prompt_token_ids": [3, 7, 1, 3, 7]}
SIGNIFICANCE = 1e-3


def save_tiny_vocab_model(path: Path, seed: int, scale: float, noise: float = 0.0) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, scale * param.shape[1] ** -0.5)
        for param in model.parameters():
            param.add_(noise * param.std() * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)  # only its files are read: ids stay below VOCAB
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny_vocab")
    # A target spread over several tokens, and a draft of the same weights with noise on
    # each: it agrees often, but its distributions differ enough to tell apart. The EAGLE
    # head is random: over 12 tokens its greedy drafts are still accepted now and then.
    target = save_tiny_vocab_model(root / "target", 0, 2.0)
    draft = save_tiny_vocab_model(root / "draft", 0, 2.0, noise=0.6)
    return target, draft, write_eagle_head(root / "eagle", target, seed=2)


def first_tokens(
    model: Path, params: SamplingParams, speculative_config: dict | None, rejects: bool = True
) -> list[list[int]]:
    llm = LLM(
        str(model),
        dtype="float32",
        device="cpu",
        block_size=4,
        max_model_len=64,
        max_num_seqs=512,
        max_num_batched_tokens=4096,
        speculative_config=speculative_config,
    )
    seeded = [params.clone(seed=seed) for seed in range(NUM_SEEDS)]
    outputs = llm.generate([PROMPT] * NUM_SEEDS, seeded, use_tqdm=False)
    if speculative_config is not None and rejects:
        stats = llm.engine.core.spec.policy.stats
        assert stats.num_accepted_tokens < stats.num_draft_tokens  # rejections happen
        # A draft model close to the target is also accepted (n-gram drafts, repeating the
        # prompt, may never be under some settings).
        assert stats.num_accepted_tokens > 0 or speculative_config["method"] == "ngram"
    return [o.outputs[0].token_ids for o in outputs]


def homogeneity_p_value(a: list[int], b: list[int]) -> float:
    """Chi-square test that two samples of categories come from one distribution (cells
    with fewer than 10 observations together pooled into one)."""
    categories = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c), b.count(c)] for c in categories], dtype=torch.float64)
    small = counts.sum(1) < 10
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    if counts.shape[0] < 2:
        return 1.0
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = counts.shape[0] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0))


def min_p_value(plain: list[list[int]], speculative: list[list[int]]) -> float:
    """The smallest p-value over the tokens at positions 2..NUM_TOKENS (the first comes
    from the prefill, before any draft) and over the pair at positions 2-3."""
    values = [
        homogeneity_p_value([t[i] for t in plain], [t[i] for t in speculative])
        for i in range(1, NUM_TOKENS)
    ]
    values.append(
        homogeneity_p_value(
            [t[1] * VOCAB + t[2] for t in plain], [t[1] * VOCAB + t[2] for t in speculative]
        )
    )
    return min(values)


_COMMON = dict(max_tokens=NUM_TOKENS, ignore_eos=True, detokenize=False)
SETTINGS = {
    "temperature": SamplingParams(temperature=1.0, **_COMMON),
    "top_k": SamplingParams(temperature=1.0, top_k=4, **_COMMON),
    "top_p": SamplingParams(temperature=0.9, top_p=0.8, **_COMMON),
}


def spec_config(method: str, models: tuple[Path, Path, Path]) -> dict:
    fixed = {"num_speculative_tokens": 3, "adaptive_draft_length": False}
    if method == "ngram":
        return {"method": "ngram", "prompt_lookup_min": 1, **fixed}
    return {
        "method": method,
        "model": str(models[1] if method == "draft_model" else models[2]),
        **fixed,
    }


@pytest.fixture(scope="module")
def plain_tokens(models: tuple[Path, Path, Path]) -> dict[str, list[list[int]]]:
    """Each setting's first tokens without speculation, for every seed."""
    return {name: first_tokens(models[0], params, None) for name, params in SETTINGS.items()}


@pytest.mark.parametrize("method", ["draft_model", "ngram", "eagle"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampled_tokens_follow_the_target(
    models: tuple[Path, Path, Path],
    plain_tokens: dict[str, list[list[int]]],
    method: str,
    setting: str,
) -> None:
    speculative = first_tokens(models[0], SETTINGS[setting], spec_config(method, models))
    assert min_p_value(plain_tokens[setting], speculative) > SIGNIFICANCE


@pytest.mark.parametrize(
    ("method", "setting"),
    [
        ("draft_model", "temperature"),
        ("draft_model", "top_p"),
        ("ngram", "temperature"),
        ("eagle", "temperature"),
    ],
)
def test_the_test_fails_an_accept_always_rule(
    models: tuple[Path, Path, Path],
    plain_tokens: dict[str, list[list[int]]],
    method: str,
    setting: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every draft accepted: the draft's tokens pass as the target's, and the same test
    must see it."""
    monkeypatch.setattr(RejectionSampler, "accept", staticmethod(torch.ones_like))
    wrong = first_tokens(models[0], SETTINGS[setting], spec_config(method, models), rejects=False)
    assert min_p_value(plain_tokens[setting], wrong) < SIGNIFICANCE
