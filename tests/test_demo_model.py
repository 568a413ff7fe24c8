"""The embedded demo model: lanner and HF transformers agree on it, and it writes Python."""

from __future__ import annotations

import ast
import json

import torch
import transformers

from lanner import LLM, SamplingParams
from lanner.engine.config import DEFAULT_MODEL_DIR
from lanner.model.config import ModelConfig

DRAFT_DIR = DEFAULT_MODEL_DIR.parent / "demo-draft"
PROMPT = "def fibonacci(n):"


def test_assets_are_small_sharded_bf16_checkpoints() -> None:
    for folder, cap_mb in ((DEFAULT_MODEL_DIR, 40), (DRAFT_DIR, 40)):
        shards = list(folder.glob("*.safetensors"))
        assert shards and (folder / "model.safetensors.index.json").is_file()
        assert all(s.stat().st_size < 16 * 2**20 for s in shards)
        assert sum(s.stat().st_size for s in shards) <= cap_mb * 2**20
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    # generation_config.json's extra end token (<|end|>, id 5) stops generation too
    assert ModelConfig.from_pretrained(DEFAULT_MODEL_DIR).eos_token_ids == (0, 5)


def test_lanner_greedy_equals_hf_greedy_on_the_demo_model() -> None:
    llm = LLM(dtype="float32", device="cpu", max_model_len=256)
    ours = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    prompt_ids = torch.tensor([ours.prompt_token_ids])
    with torch.no_grad():
        theirs = hf.eval().generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=False,
            max_new_tokens=48,
            min_new_tokens=48,
        )
    assert ours.outputs[0].token_ids == theirs[0, prompt_ids.shape[1] :].tolist()


def test_demo_model_completes_fibonacci_with_code() -> None:
    llm = LLM(dtype="float32", device="cpu", max_model_len=256)
    text = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=128))[0].outputs[0].text
    # The longest run of complete lines must parse as a function with a real body:
    # at least one statement besides a docstring.
    lines = (PROMPT + text).splitlines()
    for end in range(len(lines), 1, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        function = tree.body[0]
        assert isinstance(function, ast.FunctionDef) and function.name == "fibonacci"
        statements = [s for s in function.body if not isinstance(s, ast.Expr)]
        assert statements, text
        return
    raise AssertionError(f"no prefix of the completion parses as Python:\n{text}")
