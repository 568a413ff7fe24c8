"""HF transformers is the oracle: lanner's forward must match it in float32 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.memory.kv_cache import allocate_kv_caches
from lanner.model.loader import LoadedModel, load_model
from lanner.model.tokenizer import load_tokenizer
from tests.tiny_models import FAMILIES

BLOCK_SIZE = 4  # small, so sequences cross many block boundaries
ATOL = 1e-4


class PagedSequences:
    """Runs lanner's model over several sequences that share one paged cache,
    each with its own (deliberately shuffled) blocks."""

    def __init__(self, loaded: LoadedModel, num_blocks: int = 256) -> None:
        self.loaded = loaded
        self.kv_caches = allocate_kv_caches(
            loaded.config, num_blocks, BLOCK_SIZE, loaded.dtype, loaded.device
        )
        generator = torch.Generator().manual_seed(1)
        self.free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
        self.block_tables: list[list[int]] = []
        self.lengths: list[int] = []

    def add_sequence(self) -> int:
        self.block_tables.append([])
        self.lengths.append(0)
        return len(self.lengths) - 1

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its next chunk of tokens in one flat batch;
        return the logits of every fed position, per sequence."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lengths[seq]
            self.lengths[seq] += len(tokens)
            while len(self.block_tables[seq]) * BLOCK_SIZE < self.lengths[seq]:
                self.block_tables[seq].append(self.free_blocks.pop())
            ids += tokens
            positions += range(start, self.lengths[seq])
            query_lens.append(len(tokens))
            seq_lens.append(self.lengths[seq])
            tables.append(self.block_tables[seq])
        device = self.loaded.device
        metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, device)
        model = self.loaded.model
        with torch.no_grad():
            hidden = model(
                torch.tensor(ids, device=device),
                torch.tensor(positions, device=device),
                metadata,
                self.kv_caches,
            )
            logits = model.compute_logits(hidden)
        out, offset = {}, 0
        for seq, tokens in chunks.items():
            out[seq] = logits[offset : offset + len(tokens)]
            offset += len(tokens)
        return out


def prefill_logits(loaded: LoadedModel, prompt: list[int]) -> torch.Tensor:
    runner = PagedSequences(loaded)
    seq = runner.add_sequence()
    return runner.step({seq: prompt})[seq]


def lanner_greedy(loaded: LoadedModel, prompt: list[int], steps: int) -> tuple[list[int], list]:
    runner = PagedSequences(loaded)
    seq = runner.add_sequence()
    logits = runner.step({seq: prompt})[seq][-1]
    tokens, step_logits = [], []
    for _ in range(steps):
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
        logits = runner.step({seq: [tokens[-1]]})[seq][-1]
    return tokens, step_logits


def hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 384, (length,), generator=generator).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_match_hf(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[family]
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompt = random_prompt(37, seed=2)
    ours = prefill_logits(loaded, prompt)
    with torch.no_grad():
        theirs = hf_model(model_dir)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_logits_and_greedy_tokens_match_hf_generate(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_model_dirs[family]
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    prompt = random_prompt(11, seed=3)
    tokens, step_logits = lanner_greedy(loaded, prompt, steps=32)
    with torch.no_grad():
        generated = hf_model(model_dir).generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert tokens == generated.sequences[0, len(prompt) :].tolist()
    for ours, theirs in zip(step_logits, generated.logits, strict=True):
        torch.testing.assert_close(ours, theirs[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_ragged_batch_equals_sequences_run_alone(
    family: str, tiny_model_dirs: dict[str, Path]
) -> None:
    """One flat batch mixing a fresh prefill, a chunk on top of a cached prefix that
    ends mid-block, and decodes gives each sequence the logits it gets alone."""
    loaded = load_model(tiny_model_dirs[family], dtype="float32", device="cpu")
    prompts = [random_prompt(n, seed=10 + n) for n in (5, 13, 30, 1)]

    alone = []
    for prompt in prompts:
        alone.append(prefill_logits(loaded, prompt))

    runner = PagedSequences(loaded)
    seqs = [runner.add_sequence() for _ in prompts]
    batched: dict[int, list[torch.Tensor]] = {s: [] for s in seqs}
    # step 1: prefixes of different lengths (7 ends mid-block with block size 4)
    cuts = {seqs[0]: 4, seqs[1]: 7, seqs[2]: 30, seqs[3]: 1}
    first = runner.step({s: prompts[s][: cuts[s]] for s in seqs})
    # step 2: the rest of two prompts, one token of another, nothing for finished ones
    second = runner.step({seqs[0]: prompts[0][4:], seqs[1]: prompts[1][7:8]})
    third = runner.step({seqs[1]: prompts[1][8:]})
    for logits_by_seq in (first, second, third):
        for s, logits in logits_by_seq.items():
            batched[s].append(logits)
    for s in seqs:
        torch.testing.assert_close(torch.cat(batched[s]), alone[s], atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads_like_hf(sharded_model_dir: Path) -> None:
    shards = list(sharded_model_dir.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded_model_dir / "model.safetensors.index.json").is_file()
    loaded = load_model(sharded_model_dir, dtype="float32", device="cpu")
    prompt = random_prompt(9, seed=4)
    ours = prefill_logits(loaded, prompt)
    with torch.no_grad():
        theirs = hf_model(sharded_model_dir)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_keeps_dtype_and_tracks_float32(
    dtype: torch.dtype, tiny_model_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    reference = load_model(model_dir, dtype="float32", device="cpu")
    loaded = load_model(model_dir, dtype=dtype, device="cpu")
    assert all(p.dtype == dtype for p in loaded.model.parameters())
    prompt = random_prompt(16, seed=5)
    full = prefill_logits(reference, prompt)
    half = prefill_logits(loaded, prompt)
    error = (half.float() - full).norm() / full.norm()
    assert error < 3e-2


def test_tokenizer_and_chat_template_load(tiny_model_dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    text = "def fibonacci(n):"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|user|>hello<|end|><|assistant|>"
