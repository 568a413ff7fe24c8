"""Speculative decoding end to end: greedy outputs (and, with n-gram lookup, seeded samples)
equal the outputs without speculation token for token, whatever the batch holds, through
chunked prefill, preemption, prefix-cache hits, n > 1, stop conditions and aborts; every
KV block comes back."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.engine.outputs import RequestOutput
from tests.engine.test_llm import assert_pool_full, make_llm, mixed_requests, summary
from tests.engine.test_prefix_caching import assert_same_logprobs, shared_prefix_prompts
from tests.spec.eagle_heads import (
    build_one_layer_target,
    write_copy_head,
    write_eagle3_head,
    write_eagle_head,
)
from tests.tiny_models import build_hf_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO_DRAFT = ROOT / "lanner/assets/demo-draft"
FAMILIES = ("llama", "qwen3")


def spec_config(method: str, draft_dir: Path | None, k: int = 3, **extra) -> dict:
    """Every step speculates (the adaptive rule, which times steps, is tested with
    injected step costs below and in test_policy.py)."""
    extra.setdefault("adaptive_draft_length", False)
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, **extra}
    return {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": k, **extra}


def repetitive_prompts(count: int, seed: int = 0) -> list[dict]:
    """Prompts that repeat a few segments, so lookups find matches."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pieces = [[rng.randrange(384) for _ in range(rng.randint(2, 6))] for _ in range(3)]
        tokens = [t for _ in range(rng.randint(1, 4)) for t in rng.choice(pieces)]
        prompts.append({"prompt_token_ids": tokens + [rng.randrange(384)]})
    return prompts


def greedy_params(count: int, seed: int = 0) -> list[SamplingParams]:
    """Mostly long greedy runs; some with a length or stop token that leaves no room to
    speculate, or lands inside a verified run."""
    rng = random.Random(seed)
    params = []
    for i in range(count):
        if i % 5 == 4:
            params.append(
                SamplingParams(temperature=0, max_tokens=rng.randint(1, 2), ignore_eos=True)
            )
        elif i % 5 == 3:
            params.append(
                SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[rng.randrange(384)])
            )
        else:
            params.append(
                SamplingParams(temperature=0, max_tokens=rng.randint(10, 30), ignore_eos=True)
            )
    return params


def assert_speculated(llm: LLM, rejections: bool = True, accepted: bool = True) -> None:
    """The run really proposed tokens, accepted some (unless the drafts are random) and
    (with a different draft) rejected some, so equality with the plain run is not vacuous."""
    stats = llm.engine.core.spec.policy.stats
    assert stats.num_drafts > 0 and (stats.num_accepted_tokens > 0 or not accepted)
    if rejections:
        assert stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.fixture(scope="module")
def draft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family, the tiny target with noise on every weight: a draft that agrees with
    the target often but not always (a random model of its own would never agree)."""
    root = tmp_path_factory.mktemp("drafts")
    dirs = {}
    for family in FAMILIES:
        model = build_hf_model(family)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.35 * param.std())
        model.save_pretrained(root / family)
        build_tokenizer().save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="module")
def eagle_dirs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, Path]
) -> dict[str, tuple[Path, Path]]:
    """(target, EAGLE head) pairs: "llama" a one-layer Llama with a head that nearly
    reproduces it (drafts mostly, not always, accepted); "qwen3" the tiny Qwen3 with a
    random head (drafts almost never accepted: the tokens must still be the same)."""
    root = tmp_path_factory.mktemp("eagle")
    target = build_one_layer_target(root / "one_layer")
    return {
        "llama": (target, write_copy_head(root / "copy_head", target)),
        "qwen3": (
            tiny_model_dirs["qwen3"],
            write_eagle_head(root / "random_head", tiny_model_dirs["qwen3"], seed=1),
        ),
    }


@pytest.fixture(scope="module")
def spec_case(
    tiny_model_dirs: dict[str, Path],
    draft_dirs: dict[str, Path],
    eagle_dirs: dict[str, tuple[Path, Path]],
) -> Callable[..., tuple[Path, dict]]:
    """(target folder, speculative_config) of a method for a family; EAGLE runs on the
    target its head was made for."""

    def make(method: str, family: str = "llama", **extra) -> tuple[Path, dict]:
        if method == "eagle":
            target, head = eagle_dirs[family]
            config = {"method": "eagle", "model": str(head), "num_speculative_tokens": 3}
            return target, {**config, "adaptive_draft_length": False, **extra}
        return tiny_model_dirs[family], spec_config(method, draft_dirs[family], **extra)

    return make


METHODS = ["ngram", "draft_model", "eagle"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_no_speculation(spec_case, family: str, method: str) -> None:
    """A mixed batch: prefill chunks in flight beside verify steps (a 96-token budget),
    requests that cannot speculate (one or two tokens left) beside ones that do."""
    prompts = repetitive_prompts(16, seed=1)
    params = greedy_params(16)
    model, config = spec_case(method, family)
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, speculative_config=config)
    got = llm.generate(prompts, params)
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    random_head = method == "eagle" and family == "qwen3"
    assert_speculated(llm, rejections=method != "ngram", accepted=not random_head)
    assert_pool_full(llm)


def test_eagle3_head_greedy_equals_no_speculation(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """An EAGLE-3 head (random, a draft vocabulary of half the target's, features from
    the tiny target's layers named in its config) through the same mixed batch in a
    small block pool: the tokens are the plain run's and every block comes back."""
    model = tiny_model_dirs["llama"]
    # Layer outputs -1, 0, 1: the embeddings and both layers' outputs of the 2-layer target.
    head = write_eagle3_head(tmp_path / "eagle3", model, 192, seed=3, aux_layer_ids=[-1, 0, 1])
    prompts = repetitive_prompts(16, seed=1)
    params = greedy_params(16)
    expected = make_llm(model).generate(prompts, params)
    config = {"method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    llm = make_llm(
        model,
        num_gpu_blocks_override=40,
        max_model_len=96,
        speculative_config={**config, "adaptive_draft_length": False},
    )
    got = llm.generate(prompts, params)
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    assert_speculated(llm, accepted=False)
    assert_pool_full(llm)


@pytest.mark.parametrize("method", METHODS)
def test_token_constraints_hold_in_verified_runs(spec_case, method: str) -> None:
    """logit_bias, allowed_token_ids and (multi-token) bad words shape every verified
    position as they shape a plain step, so the tokens are the same."""
    prompts = repetitive_prompts(8, seed=3)
    model, config = spec_case(method)
    plain = make_llm(model).generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    # Bar a two-token sequence the plain run produces: its second token must not follow.
    first = plain[0].outputs[0].token_ids
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logit_bias={7: 3.0}),
        SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, allowed_token_ids=list(range(50))
        ),
        SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, bad_words_token_ids=[first[2:4]]
        ),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    ] * 2
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, speculative_config=config)
    got = llm.generate(prompts, params)
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    assert all(t < 50 for t in got[1].outputs[0].token_ids)
    assert_speculated(llm, rejections=False)
    assert_pool_full(llm)


def test_seeded_sampling_penalties_logprobs_and_n_with_ngram(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """n-gram drafts are point masses, accepted when the target's own seeded draw equals
    them: every sampled request gets the tokens it gets without speculation, and the
    logprobs and prompt logprobs are the target's."""
    prompts, params = mixed_requests(24, seed=5)
    model = tiny_model_dirs["llama"]
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, speculative_config=spec_config("ngram", None))
    got = llm.generate(prompts, params)
    for a, b in zip(got, expected, strict=True):
        assert summary(a) == summary(b)
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            assert_same_logprobs(ca.logprobs, cb.logprobs)
        assert_same_logprobs(a.prompt_logprobs, b.prompt_logprobs)
    assert_speculated(llm)
    assert_pool_full(llm)


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
def test_model_drafts_greedy_rows_in_a_mixed_batch(spec_case, method: str) -> None:
    """Beside sampled, penalized and n > 1 requests, every greedy request keeps its
    tokens; the sampled ones are reproducible from their seeds whatever the batch."""
    prompts, params = mixed_requests(24, seed=6)
    model, config = spec_case(method)
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, speculative_config=config)
    got = llm.generate(prompts, params)
    for a, b, p in zip(got, expected, params, strict=True):
        if p.is_greedy:
            assert summary(a) == summary(b)
        assert [len(c.token_ids) for c in a.outputs] == [len(c.token_ids) for c in b.outputs]
    assert_speculated(llm)
    assert_pool_full(llm)
    # A seeded request alone gives what it gave inside the batch.
    index = next(i for i, p in enumerate(params) if not p.is_greedy and p.n == 1)
    alone = make_llm(model, speculative_config=config).generate(prompts[index], params[index])[0]
    assert summary(alone) == summary(got[index])


@pytest.mark.parametrize("method", METHODS)
def test_preemption_and_recompute(spec_case, method: str) -> None:
    prompts = repetitive_prompts(20, seed=2)
    params = greedy_params(20, seed=2)
    model, config = spec_case(method)
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, num_gpu_blocks_override=28, max_model_len=96, speculative_config=config)
    got = llm.generate(prompts, params)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    assert_speculated(llm, rejections=False)
    assert_pool_full(llm)


@pytest.mark.parametrize(
    ("method", "caching"),
    [("ngram", True), ("draft_model", True), ("draft_model", False), ("eagle", True)],
)
def test_prefix_cache_hits(spec_case, method: str, caching: bool) -> None:
    """Requests starting on cached blocks (the prefix cache holds only accepted tokens),
    and n > 1 siblings sharing their prompt, with caching on and off."""
    prompts = shared_prefix_prompts(6, prefix_len=37, seed=3)
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
        SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=10, ignore_eos=True),
    ] * 3
    model, config = spec_case(method)
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, enable_prefix_caching=caching, speculative_config=config)
    first = llm.generate(prompts, params)
    again = llm.generate(prompts, params)  # every prompt block now cached
    for a, b, e, p in zip(first, again, expected, params, strict=True):
        if p.is_greedy or method == "ngram":
            assert summary(a) == summary(e) and summary(b) == summary(e)
        else:
            assert summary(a) == summary(b)  # seeded: reproducible
    if caching:
        assert llm.engine.core.kv_manager.prefix_cache_stats.hit_tokens > 0
    assert_pool_full(llm)


@pytest.mark.parametrize("method", METHODS)
def test_stop_strings_inside_a_verified_run(spec_case, method: str) -> None:
    model, config = spec_case(method, "qwen3")
    prompt = repetitive_prompts(1, seed=9)[0]
    free = make_llm(model).generate(
        prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    )
    text = free[0].outputs[0].text
    cases = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[text[i : i + 2]])
        for i in (len(text) // 4, len(text) // 2, 3 * len(text) // 4)
    ]
    cases.append(
        SamplingParams(
            temperature=0,
            max_tokens=40,
            ignore_eos=True,
            stop=[text[10:12]],
            include_stop_str_in_output=True,
        )
    )
    llm = make_llm(model, speculative_config=config)
    for params in cases:
        want = make_llm(model).generate(prompt, params)[0]
        got = llm.generate(prompt, params)[0]
        assert summary(got) == summary(want)
        assert got.outputs[0].text == want.outputs[0].text
        assert got.outputs[0].stop_reason == want.outputs[0].stop_reason
    assert_pool_full(llm)


@pytest.mark.parametrize("method", METHODS)
def test_abort_between_steps(spec_case, method: str) -> None:
    model, config = spec_case(method)
    llm = make_llm(model, speculative_config=config)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = repetitive_prompts(5, seed=4)
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(f"r{i}", prompt, params)
    outputs: dict[str, RequestOutput] = {}
    for _ in range(4):
        for out in llm.engine.step():
            outputs[out.request_id] = out
    llm.engine.abort_request(["r0", "r3"])
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            outputs[out.request_id] = out
    expected = make_llm(model).generate(prompts, params)
    for i in (1, 2, 4):
        assert summary(outputs[f"r{i}"]) == summary(expected[i])
    assert_pool_full(llm)


@pytest.mark.parametrize("method", METHODS)
def test_overlapped_scheduling_with_speculation_switched_by_batch_size(
    spec_case, method: str
) -> None:
    """While more than 6 requests run, nothing speculates and steps launch ahead (the
    draft model skips them and catches up, its skipped blocks marked stale); as the
    batch drains, the rest speculate."""
    prompts = repetitive_prompts(16, seed=7)
    params = greedy_params(16, seed=7)
    model, config = spec_case(method, disable_by_batch_size=6)
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(model, async_scheduling=True, speculative_config=config)
    got = llm.generate(prompts, params)
    again = llm.generate(prompts, params)  # on cached blocks, some of them written unseen
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    assert [summary(o) for o in again] == [summary(o) for o in expected]
    assert_speculated(llm, rejections=False)
    assert_pool_full(llm)


def test_demo_model_with_demo_draft_and_ngram() -> None:
    prompts = [
        "import os\n\ndef list_files(path):",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, item):",
    ]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    options = dict(dtype="float32", device="cpu", max_model_len=256, block_size=16)
    expected = LLM(**options).generate(prompts, params, use_tqdm=False)
    for config in (
        {"method": "draft_model", "model": str(DEMO_DRAFT), "num_speculative_tokens": 4},
        {"method": "ngram", "num_speculative_tokens": 4},
    ):
        llm = LLM(**options, speculative_config=config)
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [summary(o) for o in got] == [summary(o) for o in expected]
        assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
        assert_speculated(llm, rejections=False)
        assert_pool_full(llm)


def test_adaptive_draft_length_rides_out_bursts_of_rejections() -> None:
    """The demo model on real code (the start of this repository's engine/core.py as it
    was, kept as test data so that editing core.py cannot change the test), one request
    at a time, with steps timed by an injected cost under which speculation pays about
    2x: a request's acceptance comes in bursts (code that repeats, then code that does
    not), and a burst of rejections must not switch speculation off (once off,
    acceptance is no longer measured). Before the policy's hysteresis, a fifth of the
    steps ran plain."""
    source = (Path(__file__).parent / "data" / "bursty_code.txt").read_text()
    prompts = [source[i * 700 : (i + 1) * 700] for i in range(3)]
    llm = LLM(
        dtype="float32",
        device="cpu",
        max_model_len=512,
        max_num_seqs=1,
        async_scheduling=True,
        speculative_config={"method": "ngram", "num_speculative_tokens": 6},
    )
    policy = llm.engine.core.spec.policy
    policy.step_cost = lambda num_running, k: 1.0 + 0.05 * k
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    stats = policy.stats
    # Plain steps: the first bucket's try of plain decoding (a few steps) only.
    assert stats.num_plain_steps <= 0.1 * stats.num_speculative_steps, stats
    assert stats.mean_acceptance_length > 4
    assert_pool_full(llm)


@pytest.mark.parametrize("speculation_pays", [True, False])
def test_adaptive_draft_length_under_injected_step_costs(
    tiny_model_dirs: dict[str, Path], speculation_pays: bool
) -> None:
    """With steps timed by an injected cost, the engine speculates where it pays and
    otherwise runs plain steps ahead of the host (overlapped), probing now and then;
    the tokens are the same either way."""
    prompts = repetitive_prompts(4, seed=8)
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    model = tiny_model_dirs["llama"]
    expected = make_llm(model).generate(prompts, params)
    llm = make_llm(
        model,
        async_scheduling=True,
        speculative_config=spec_config("ngram", None, k=4, adaptive_draft_length=True),
    )
    policy = llm.engine.core.spec.policy
    # (These prompts' drafts are accepted at ~0.3 a position: at 0.01 a draft row k = 1
    # makes ~25 % more tokens a second, past the policy's START_MARGIN.)
    per_draft = 0.01 if speculation_pays else 2.0
    policy.step_cost = lambda num_running, k: 1.0 + per_draft * k * num_running
    got = llm.generate(prompts, params)
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    stats = policy.stats
    if speculation_pays:
        assert stats.num_speculative_steps > 2 * stats.num_plain_steps
        assert stats.num_accepted_tokens > 0
    else:
        assert stats.num_plain_steps > 3 * stats.num_speculative_steps > 0
    assert_pool_full(llm)


DEMO_EAGLE = ROOT / "lanner/assets/demo-eagle"


@pytest.mark.skipif(
    not (DEMO_EAGLE / "config.json").is_file(),
    reason="lanner/assets/demo-eagle is not shipped yet (scripts/train_eagle_head.py makes it)",
)
def test_demo_model_with_its_eagle_head() -> None:
    prompts = [
        "import os\n\ndef list_files(path):",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, item):",
    ]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    options = dict(dtype="float32", device="cpu", max_model_len=256, block_size=16)
    expected = LLM(**options).generate(prompts, params, use_tqdm=False)
    config = {"method": "eagle", "model": str(DEMO_EAGLE), "num_speculative_tokens": 4}
    llm = LLM(**options, speculative_config=config)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    assert_speculated(llm, rejections=False)
    assert_pool_full(llm)


@pytest.mark.skipif(not (DEMO_EAGLE / "config.json").is_file(), reason="no demo-eagle")
def test_eagle_head_catches_up_on_plain_steps_from_the_feature_cache() -> None:
    """The demo model and its head, one request at a time, overlapped scheduling, the
    draft length forced to alternate 4 drafting steps and 12 plain ones (launched ahead,
    the head not run beside them): when drafting starts again the head computes the
    positions it missed from the features the target left in the feature cache, so its
    drafts are accepted as often as when every step drafts (with stale K/V at those
    positions, before the feature cache: 0.55 of the drafts against 0.68). Greedy tokens
    are the plain run's either way."""
    source = (Path(__file__).parent / "data" / "bursty_code.txt").read_text()
    prompts = [source[:600], source[900:1500]]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    options = dict(dtype="float32", device="cpu", max_model_len=512, max_num_seqs=1)
    expected = LLM(**options).generate(prompts, params, use_tqdm=False)
    config = {
        "method": "eagle",
        "model": str(DEMO_EAGLE),
        "num_speculative_tokens": 4,
        "adaptive_draft_length": False,
    }

    def acceptance(alternate: bool) -> float:
        llm = LLM(**options, async_scheduling=True, speculative_config=config)
        policy = llm.engine.core.spec.policy
        begun = [0]
        begin_step = policy.begin_step

        def counted(num_running: int, draft_length: int) -> None:
            begun[0] += 1
            begin_step(num_running, draft_length)

        policy.begin_step = counted
        if alternate:
            policy.plan = lambda num_running: 4 if begun[0] % 16 < 4 else 0
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [summary(o) for o in got] == [summary(o) for o in expected]
        assert_pool_full(llm)
        stats = policy.stats
        assert stats.num_plain_steps > 0.3 * stats.num_speculative_steps or not alternate
        return stats.num_accepted_tokens / stats.num_draft_tokens

    always = acceptance(alternate=False)
    alternating = acceptance(alternate=True)
    assert alternating > 0.9 * always, (always, alternating)
