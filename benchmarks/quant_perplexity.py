"""W8 quality: the embedded demo model's perplexity on held-out Python text, unquantized and
quantized (fp8 W8A8, int8 W8A8, int4 W4A16 group 128), each quantized checkpoint written
by llmcompressor from the demo model (cached under --cache-dir).

Held-out text: Python files of this machine's standard library that the demo model's
training script (scripts/train_demo_model.py) holds out by the hash of their key
("stdlib/<path>"). Its split keeps the lowest 5 % of hashes among the ~19k files it kept;
a file below --heldout-below (default 4 %) is held out whatever the machine, since keys
hash the same everywhere. Each file gives at most --file-tokens tokens (so that a few long
or repetitive files do not dominate), cut into windows of --window tokens; each method
scores the same windows through the engine (prompt logprobs of LLM.generate), on the CPU's
reference path or the GPU's kernels.

    PYTHONPATH=. python3 benchmarks/quant_perplexity.py --commit $(git rev-parse --short HEAD)
    [--methods bf16,fp8,int8,int4-g128,int4-g128-gptq] [--max-tokens 32768] [--device cpu]

Prints a table (perplexity, its ratio to bf16) and writes one JSON to benchmarks/results/
(and $OUT when set). Targets (issue 16): fp8 within 1 % of bf16, int4 within 5 %.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

from lanner.bench.report import save_copies
from lanner.engine.config import DEFAULT_MODEL_DIR
from lanner.entrypoints.llm import LLM
from lanner.sampling_params import SamplingParams
from scripts.train_demo_model import seeded_fraction

RESULTS = Path(__file__).resolve().parent / "results"
# method -> (llmcompressor modifier, its arguments); "bf16" is the checkpoint itself.
RECIPES = {
    "fp8": ("QuantizationModifier", {"scheme": "FP8_DYNAMIC"}),
    "int8": ("QuantizationModifier", {"scheme": "W8A8"}),
    "int4-g128": ("QuantizationModifier", {"scheme": "W4A16"}),
    "int4-g128-gptq": ("GPTQModifier", {"scheme": "W4A16"}),
}
TARGETS = {"fp8": 1.01, "int8": 1.01, "int4-g128": 1.05, "int4-g128-gptq": 1.05}


def heldout_files(below: float) -> list[Path]:
    """Standard-library files whose key the training script's seeded hash puts in its
    held-out split on any machine."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = []
    for path in sorted(root.rglob("*.py")):
        key = f"stdlib/{path.relative_to(root).as_posix()}"
        if "site-packages" not in key and seeded_fraction(0, "heldout", key) < below:
            files.append(path)
    return files


def calibration_files(count: int) -> list[Path]:
    """Training files (far from the held-out hash range) for GPTQ's calibration."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    chosen = []
    for path in sorted(root.rglob("*.py")):
        key = f"stdlib/{path.relative_to(root).as_posix()}"
        if seeded_fraction(0, "heldout", key) > 0.5 and "site-packages" not in key:
            chosen.append(path)
        if len(chosen) == count:
            break
    return chosen


def windows(
    tokenizer,
    files: list[Path],
    window: int,
    file_tokens: int,
    max_tokens: int,  # noqa: ANN001
) -> list[list[int]]:
    """Up to file_tokens of each file (its text, then the end-of-text token), in whole
    windows, until max_tokens."""
    chunks: list[list[int]] = []
    eos = tokenizer.eos_token_id
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        tokens = (tokenizer.encode(text, add_special_tokens=False) + [eos])[:file_tokens]
        chunks += [tokens[i : i + window] for i in range(0, len(tokens) - window + 1, window)]
        if len(chunks) * window >= max_tokens:
            break
    return chunks[: max_tokens // window]


def write_checkpoint(method: str, cache_dir: Path, calibration: list[str]) -> Path:
    """The demo model quantized by llmcompressor (kept in cache_dir for the next run)."""
    out = cache_dir / f"demo-{method}"
    if (out / "config.json").is_file():
        return out
    import transformers
    from llmcompressor import modifiers, oneshot

    name, arguments = RECIPES[method]
    modifier = getattr(modifiers.quantization, name)(**arguments, ignore=["lm_head"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL_DIR, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    kwargs = {}
    if name == "GPTQModifier":
        from datasets import Dataset

        ids = [tokenizer.encode(text)[:512] for text in calibration]
        kwargs = {
            "dataset": Dataset.from_dict({"input_ids": ids}),
            "max_seq_length": 512,
            "num_calibration_samples": len(ids),
        }
    with contextlib.redirect_stdout(io.StringIO()):
        oneshot(model=model, recipe=modifier, **kwargs)
        model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    # Run in the demo model's own dtype, as its bf16 row does.
    raw = json.loads((out / "config.json").read_text())
    raw["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def perplexity(
    model_dir: Path, chunks: list[list[int]], device: str, dtype: str, batch: int
) -> dict:
    llm = LLM(
        str(model_dir),
        device=device,
        dtype=dtype,
        max_model_len=len(chunks[0]) + 8,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    nll, scored = 0.0, 0
    started = time.perf_counter()
    for start in range(0, len(chunks), batch):
        outputs = llm.generate(
            [{"prompt_token_ids": c} for c in chunks[start : start + batch]], params, use_tqdm=False
        )
        for output in outputs:
            for token, position in zip(
                output.prompt_token_ids[1:], output.prompt_logprobs[1:], strict=True
            ):
                nll -= position[token].logprob
                scored += 1
    seconds = time.perf_counter() - started
    weight_bytes = llm.engine.core.loaded.matmul_weight_bytes
    return {
        "perplexity": math.exp(nll / scored),
        "tokens_scored": scored,
        "seconds": seconds,
        "matmul_weight_bytes": weight_bytes,
        "quantization": str(
            llm.engine.core.loaded.quant_config.describe()
            if llm.engine.core.loaded.quant_config
            else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="bf16,fp8,int8,int4-g128,int4-g128-gptq")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="windows per generate call")
    parser.add_argument("--heldout-below", type=float, default=0.04)
    parser.add_argument("--file-tokens", type=int, default=1024)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "lanner" / "quant"))
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = heldout_files(args.heldout_below)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    chunks = windows(tokenizer, files, args.window, args.file_tokens, args.max_tokens)
    calibration = [p.read_text(encoding="utf-8", errors="replace") for p in calibration_files(64)]
    print(
        f"{len(files)} held-out files, {len(chunks)} windows of {args.window} tokens, on "
        f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'})",
        flush=True,
    )
    rows = {}
    for method in args.methods.split(","):
        model_dir = (
            DEFAULT_MODEL_DIR
            if method == "bf16"
            else write_checkpoint(method, cache_dir, calibration)
        )
        rows[method] = perplexity(model_dir, chunks, device, args.dtype, args.batch)
        base = rows.get("bf16", {}).get("perplexity")
        ratio = rows[method]["perplexity"] / base if base else float("nan")
        rows[method]["ratio_to_bf16"] = ratio
        target = TARGETS.get(method)
        verdict = "" if target is None or not base else (" ok" if ratio <= target else " MISSED")
        print(
            f"{method:>16}: perplexity {rows[method]['perplexity']:.4f} (x{ratio:.4f} of bf16; "
            f"target <= x{target}){verdict}  {rows[method]['seconds']:.0f} s",
            flush=True,
        )
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    result = {
        "workload": "W8-perplexity",
        "card": card,
        "device": device,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/quant_perplexity.py " + " ".join(sys.argv[1:]),
        "heldout_files": len(files),
        "heldout_below": args.heldout_below,
        "file_tokens": args.file_tokens,
        "windows": len(chunks),
        "window_tokens": args.window,
        "dtype": args.dtype,
        "methods": rows,
        "targets": TARGETS,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-W8-perplexity.json")


if __name__ == "__main__":
    main()
