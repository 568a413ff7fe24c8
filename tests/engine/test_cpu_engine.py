"""The engine on the CPU: the batched CPU path gives the reference path's tokens, and the
CPU's own settings (threads, the dtype rule, the KV cache's size and memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.engine.config import DEFAULT_MODEL_DIR
from lanner.kernels import ops
from lanner.memory import kv_cache
from lanner.model import loader
from lanner.model.config import ModelConfig
from lanner.runner import cpu_threads
from lanner.runner.model_runner import ModelRunner
from tests.engine.test_llm import assert_pool_full, make_llm, mixed_requests, summary


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_cpu_path_gives_the_reference_paths_tokens(
    tiny_model_dirs: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mixed prefill/decode batches, chunked prefill (a 96-token step budget), the prefix
    cache and every sampling setting: the same outputs through either attention path."""
    prompts, params = mixed_requests(24, seed=11)
    prompts += [prompts[0], prompts[1]]  # served again, from the prefix cache
    params += [params[0], params[1]]
    fast = make_llm(tiny_model_dirs[family]).generate(prompts, params)
    monkeypatch.setattr(ops, "FORCE_REFERENCE", True)
    oracle = make_llm(tiny_model_dirs[family]).generate(prompts, params)
    for ours, theirs in zip(fast, oracle, strict=True):
        assert summary(ours) == summary(theirs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_chunks_run_as_one_token_rows_give_the_same_tokens(
    tiny_model_dirs: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How a decode graph runs a refill beside decodes (ModelRunner._flattens_prefills):
    each prefill chunk as one-token rows over its own causal prefix. On the CPU the same
    rows go through the eager path; greedy and seeded outputs must not change, prompt
    logprobs keep their steps unflattened, and a read budget of zero flattens nothing."""
    prompts, params = mixed_requests(24, seed=5)
    prompts += [prompts[0], prompts[1]]  # from the prefix cache: chunks at a start > 0
    params += [params[0], params[1]]
    options = dict(max_num_batched_tokens=32)  # many chunks, most of them beside decodes
    plain = make_llm(tiny_model_dirs[family], **options).generate(prompts, params)
    flattened = []
    original = ModelRunner._flattens_prefills

    def counted(runner, chunks, layout):  # noqa: ANN001, ANN202
        chosen = original(runner, chunks, layout)
        flattened.append(chosen)
        return chosen

    monkeypatch.setattr(ModelRunner, "_flattens_prefills", counted)
    llm = make_llm(tiny_model_dirs[family], **options)
    runner = llm.engine.core.runner
    runner.flatten_row_limit = 32  # the step budget: every step fits
    ours = llm.generate(prompts, params)
    assert sum(flattened) >= 10 and not all(flattened)  # prompt-logprob steps stay as they are
    for got, want in zip(ours, plain, strict=True):
        assert summary(got) == summary(want)
    assert_pool_full(llm)
    flattened.clear()
    runner.flatten_read_budget = 0
    assert summary(llm.generate(prompts[2], params[2])[0]) == summary(plain[2])
    assert flattened and not any(flattened)


def test_fp8_cache_through_the_cpu_path(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = {"prompt_token_ids": list(range(3, 40))}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fast = make_llm(tiny_model_dirs["llama"], kv_cache_dtype="fp8").generate(prompt, params)
    monkeypatch.setattr(ops, "FORCE_REFERENCE", True)
    oracle = make_llm(tiny_model_dirs["llama"], kv_cache_dtype="fp8").generate(prompt, params)
    assert summary(fast[0]) == summary(oracle[0])


def test_default_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, threads in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(cpu_threads, "available_cores", lambda cores=cores: cores)
        assert cpu_threads.default_num_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads.default_num_threads() == 3


def test_num_threads_option(tiny_model_dirs: dict[str, Path]) -> None:
    before = torch.get_num_threads()
    try:
        llm = make_llm(tiny_model_dirs["llama"], num_threads=1)
        assert torch.get_num_threads() == 1 == llm.engine.core.num_threads
        with pytest.raises(ValueError, match="num_threads"):
            make_llm(tiny_model_dirs["llama"], num_threads=0)
    finally:
        torch.set_num_threads(before)


def test_auto_dtype_on_the_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo checkpoint is bf16: float32 where the CPU emulates bf16, bf16 where it
    multiplies it natively; an explicit dtype always wins."""
    config = ModelConfig.from_pretrained(DEFAULT_MODEL_DIR)
    cpu = torch.device("cpu")
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert loader.resolve_dtype("auto", config, cpu) == torch.float32
    assert loader.resolve_dtype("bfloat16", config, cpu) == torch.bfloat16
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.resolve_dtype("auto", config, cpu) == torch.bfloat16
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    llm = LLM(device="cpu", max_model_len=64, num_gpu_blocks_override=8)
    assert llm.engine.core.loaded.dtype == torch.float32


def _blocks(model_dir: Path, **options) -> int:
    return make_llm(model_dir, **options).engine.core.num_kv_blocks


def test_cpu_kv_cache_size(tiny_model_dirs: dict[str, Path], monkeypatch) -> None:
    model = tiny_model_dirs["llama"]
    config = ModelConfig.from_pretrained(model)
    per_block = kv_cache.kv_cache_bytes_per_block(config, 4, torch.float32)
    monkeypatch.delenv(kv_cache.CPU_KVCACHE_SPACE_ENV, raising=False)
    # Default: what max_num_seqs sequences of max_model_len tokens can use.
    assert _blocks(model, max_num_seqs=3, max_model_len=64) == 3 * 16
    monkeypatch.setenv(kv_cache.CPU_KVCACHE_SPACE_ENV, "0.001")
    assert _blocks(model, max_model_len=64) == int(0.001 * 2**30) // per_block
    # kv_cache_memory_bytes is honoured over both.
    assert _blocks(model, max_model_len=64, kv_cache_memory_bytes=100 * per_block) == 100
    for bad in ("lots", "0", "-1"):
        monkeypatch.setenv(kv_cache.CPU_KVCACHE_SPACE_ENV, bad)
        with pytest.raises(ValueError, match=kv_cache.CPU_KVCACHE_SPACE_ENV):
            _blocks(model, max_model_len=64)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_a_large_cpu_cache_holds_memory_only_for_blocks_in_use() -> None:
    """The demo model's default cache is 2 GiB (256 sequences x 2048 tokens would use
    more); generating one prompt must not make the process resident in all of it."""
    before = _resident_bytes()
    llm = LLM(device="cpu", dtype="float32")
    assert (
        llm.engine.core.num_kv_blocks
        * kv_cache.kv_cache_bytes_per_block(llm.engine.core.model_config, 16, torch.float32)
        > 1.5 * 2**30
    )
    llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=32))
    assert _resident_bytes() - before < 300 * 2**20
