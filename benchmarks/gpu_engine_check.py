"""On the GPU: the engine's greedy tokens equal HF transformers' on the demo model, and a
profile of one W1 decode step of the eager reference path shows where its time goes.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/gpu_engine_check.py
Prints a short table; writes the profile table to $OUT/w1_profile.txt when OUT is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from lanner import LLM, SamplingParams
from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.core import EngineCore
from lanner.engine.request import Request

PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:", "x = ["]
SHAPES = Path(__file__).resolve().parent / "shapes"


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)


def check_against_hf(dtype: torch.dtype, new_tokens: int = 128) -> list[int | None]:
    llm = LLM(dtype=str(dtype).removeprefix("torch."), device="cuda", max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype)
    hf = hf.cuda().eval()
    result = []
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids], device="cuda")
        with torch.no_grad():
            theirs = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )[0, ids.shape[1] :].tolist()
        result.append(first_divergence(out.outputs[0].token_ids, theirs))
    return result


def profile_w1_decode() -> str:
    config = EngineConfig.from_kwargs(
        model=str(SHAPES / "llama3-8b"),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        max_model_len=512,
        max_num_seqs=8,
        max_num_batched_tokens=512,
    )
    core = EngineCore(config)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    core.add_request(Request("w1", list(range(1000, 1128)), params))
    for _ in range(30):  # prefill plus warm decode steps
        core.step()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(5):
            core.step()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)


def main() -> None:
    print(f"card: {torch.cuda.get_device_name()}")
    for dtype in (torch.float32, torch.bfloat16):
        print(
            f"{dtype}: first divergence from HF greedy per prompt (None = all 128 equal): "
            f"{check_against_hf(dtype)}"
        )
    table = profile_w1_decode()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "w1_profile.txt").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
