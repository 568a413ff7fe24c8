"""Quantized test checkpoints, written by the field's own tools from tiny random models:
llmcompressor (compressed-tensors: fp8 W8A8, int8 W8A8, W4A16 packed), auto-round (the
GPTQ and AWQ layouts, and the same quantization in compressed-tensors form), transformers'
own fp8 quantizer (the hub "fp8" layout). Two layouts no tool here writes are built from
their specification: GPTQ with act-order (desc_act) and AutoFP8's scalar ``weight_scale``.

``QuantCheckpoints`` builds each on first use and keeps it for the session; ``hf_oracle``
loads a checkpoint in HF transformers, decompressed to dense weights, as the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.tiny_models import build_hf_model, build_tokenizer

# Every projection's input size is a multiple of 128, so every group size divides it.
QUANT_SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=128, head_dim=32, num_key_value_heads=1, intermediate_size=256),
    "mistral": dict(hidden_size=128, head_dim=32, num_key_value_heads=2, intermediate_size=256),
    "qwen2": dict(hidden_size=128, num_key_value_heads=2, intermediate_size=256),
    "qwen3": dict(hidden_size=128, head_dim=32, num_key_value_heads=1, intermediate_size=256),
}
CALIBRATION_TEXT = ["def fibonacci(n):\n    if n < 2:\n        return n\n" * 4] * 8


def build_base_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random model of ``family`` (its quirks kept) with quantizable shapes."""
    return build_hf_model(family, seed, num_attention_heads=4, **QUANT_SHAPES[family])


@contextlib.contextmanager
def _quiet() -> Any:
    """The tools print progress bars and log lines by the hundred."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _groups(
    bits: int,
    kind: str,
    strategy: str,
    group_size: int | None,
    symmetric: bool,
    activations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    weights: dict[str, Any] = {
        "num_bits": bits,
        "type": kind,
        "symmetric": symmetric,
        "strategy": strategy,
    }
    if group_size:
        weights["group_size"] = group_size
    group: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    if activations:
        group["input_activations"] = activations
    return {"group_0": group}


# name -> (llmcompressor QuantizationModifier arguments)
LLMCOMPRESSOR_RECIPES: dict[str, dict[str, Any]] = {
    "ct-fp8": {"scheme": "FP8_DYNAMIC"},
    "ct-fp8-tensor": {
        "config_groups": _groups(
            8,
            "float",
            "tensor",
            None,
            True,
            {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "dynamic": True,
                "symmetric": True,
            },
        )
    },
    "ct-int8": {"scheme": "W8A8"},
    "ct-w4a16-g32": {"config_groups": _groups(4, "int", "group", 32, True)},
    "ct-w4a16-g64-asym": {"config_groups": _groups(4, "int", "group", 64, False)},
    "ct-w4a16-g128": {"scheme": "W4A16"},
    "ct-w4a16-g128-asym": {"scheme": "W4A16_ASYM"},
    "ct-w4a16-channel": {"config_groups": _groups(4, "int", "channel", None, True)},
}


def write_llmcompressor(
    model: transformers.PreTrainedModel, out: Path, recipe: str, ignore: list[str]
) -> Path:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    with _quiet():
        oneshot(
            model=model, recipe=QuantizationModifier(**LLMCOMPRESSOR_RECIPES[recipe], ignore=ignore)
        )
        model.save_pretrained(out, save_compressed=True)
    return out


def write_autoround(model_dir: Path, out: Path, group_size: int, symmetric: bool) -> Path:
    """auto-round's round-to-nearest 4-bit quantization of one model, exported in the
    GPTQ and AWQ layouts (and compressed-tensors where its exporter takes the scheme):
    out/auto-gptq, out/auto-awq, out/llm-compressor-wint-a16."""
    from auto_round import AutoRound

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    formats = "auto_gptq,auto_awq" + (",llm_compressor" if symmetric else "")
    with _quiet():
        rounder = AutoRound(
            model,
            tokenizer,
            bits=4,
            group_size=group_size,
            sym=symmetric,
            iters=0,
            device_map="cpu",
            dataset=CALIBRATION_TEXT,
            seqlen=32,
            nsamples=8,
            disable_opt_rtn=True,
        )
        rounder.quantize_and_save(str(out), format=formats)
    # auto-round writes into a folder named after the model and scheme.
    [inner] = [p for p in out.iterdir() if p.is_dir()]
    return inner


def write_hf_fp8(model_dir: Path, out: Path) -> Path:
    """transformers' own FP8 quantizer (Fp8Quantize, what FineGrainedFP8Config runs)
    over every projection, one scale per tensor: the hub "fp8" layout."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = transformers.FineGrainedFP8Config(
        weight_block_size=None, modules_to_not_convert=["lm_head"]
    )

    class Quantizer:
        quantization_config = config

    op = Fp8Quantize(Quantizer())
    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    quantized = {}
    for name, tensor in tensors.items():
        if name.endswith("_proj.weight"):
            quantized.update(op.convert({name: tensor}))
        else:
            quantized[name] = tensor
    save_file(quantized, out / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"] = json.loads(json.dumps(config.to_dict(), default=str))
    raw["quantization_config"]["quant_method"] = "fp8"
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def write_autofp8_scalar(hf_fp8_dir: Path, out: Path) -> Path:
    """AutoFP8's spelling of the same checkpoint (from its format, no tool here writes
    it): ``weight_scale`` a 0-dim scalar instead of ``weight_scale_inv`` [1, 1]."""
    shutil.copytree(hf_fp8_dir, out)
    tensors = load_file(out / "model.safetensors")
    renamed = {
        name.replace("weight_scale_inv", "weight_scale"): tensor.reshape(())
        if name.endswith("weight_scale_inv")
        else tensor
        for name, tensor in tensors.items()
    }
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_gptq_act_order(
    model_dir: Path, out: Path, dense_out: Path, group_size: int, seed: int = 0
) -> tuple[Path, Path]:
    """GPTQ with desc_act, written from its format: each projection's input columns are
    quantized in a random order (as GPTQ's act-order does, by Hessian diagonal), group j
    holding columns order[j g : (j + 1) g], so g_idx[k] is the position of k in the order
    // g; codes are stored in natural row order (qweight [K / 8, N], row 8r + i in nibble
    i), zeros minus one (the original format). Also writes ``dense_out``: the same model
    with each weight replaced by its dequantization w[:, k] = (q - zero[g_idx[k]]) *
    scale[g_idx[k]], for HF transformers to run as the oracle."""
    shutil.copytree(model_dir, out)
    shutil.copytree(model_dir, dense_out)
    tensors = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    packed: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    # q/k/v (and gate/up) share one input, so one order per input (as GPTQ's Hessian).
    orders: dict[tuple[str, str], torch.Tensor] = {}
    for name, weight in tensors.items():
        if not name.endswith("_proj.weight"):
            packed[name] = dense[name] = weight
            continue
        module = name.removesuffix(".weight")
        n, k = weight.shape
        parent, leaf = module.rsplit(".", 1)
        shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        key = (parent, shared_input.get(leaf, leaf))
        if key not in orders:
            orders[key] = torch.randperm(k, generator=generator)
        order = orders[key]
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
        groups = k // group_size
        columns = weight.T[order].reshape(groups, group_size, n)  # [G, g, N], in order
        absmax = columns.abs().amax(dim=1).clamp(min=1e-8)  # [G, N]
        scales = (absmax / 7.5).to(torch.float16)
        zeros = torch.full((groups, n), 8, dtype=torch.int64)
        codes_in_order = (columns / scales.float()[:, None, :]).round().clamp(-8, 7) + 8
        codes = torch.empty(k, n, dtype=torch.int64)
        codes[order] = codes_in_order.reshape(k, n).long()
        shifts = 4 * torch.arange(8)
        qweight = (codes.view(k // 8, 8, n) << shifts.view(1, 8, 1)).sum(1)
        stored_zeros = (zeros - 1).view(groups, n // 8, 8)
        qzeros = (stored_zeros << shifts.view(1, 1, 8)).sum(2)
        as_int32 = lambda t: torch.where(t >= 1 << 31, t - (1 << 32), t).to(torch.int32)  # noqa: E731
        packed[f"{module}.qweight"] = as_int32(qweight)
        packed[f"{module}.qzeros"] = as_int32(qzeros)
        packed[f"{module}.scales"] = scales
        packed[f"{module}.g_idx"] = g_idx
        group_of = g_idx.long()
        dense[name] = ((codes.float() - zeros[group_of].float()) * scales[group_of].float()).T
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
    save_file(
        {k: v.contiguous() for k, v in dense.items()},
        dense_out / "model.safetensors",
        metadata={"format": "pt"},
    )
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": True,
        "sym": True,
        "checkpoint_format": "gptq",
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out, dense_out


class QuantCheckpoints:
    """Builds quantized checkpoints on first request, kept for the session.

    ``get(family, kind)``: kind is a LLMCOMPRESSOR_RECIPES name, "base" (the unquantized
    model), "hf-fp8", "autofp8", "gptq-act-order" (with "gptq-act-order-dense" its
    dequantized twin), or "autoround-{sym,asym}-g{N}/{auto-gptq,auto-awq,llm-compressor}"."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str], Path] = {}

    def get(self, family: str, kind: str) -> Path:
        key = (family, kind)
        if key not in self.built:
            self.built[key] = self._build(family, kind)
        return self.built[key]

    def _build(self, family: str, kind: str) -> Path:
        out = self.root / family / kind.replace("/", "_")
        if kind == "base":
            build_base_model(family).save_pretrained(out)
            build_tokenizer().save_pretrained(out)
            return out
        base = self.get(family, "base")
        if kind in LLMCOMPRESSOR_RECIPES or kind.endswith("-with-head"):
            recipe = kind.removesuffix("-with-head")
            ignore = [] if kind.endswith("-with-head") else ["lm_head"]
            model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            write_llmcompressor(model, out, recipe, ignore)
            build_tokenizer().save_pretrained(out)
            return out
        if kind == "hf-fp8":
            return write_hf_fp8(base, out)
        if kind == "autofp8":
            return write_autofp8_scalar(self.get(family, "hf-fp8"), out)
        if kind in ("gptq-act-order", "gptq-act-order-dense"):
            packed, dense = write_gptq_act_order(
                base, self.root / family / "gptq-act-order", self.root / family / "gptq-dense", 32
            )
            self.built[(family, "gptq-act-order")] = packed
            self.built[(family, "gptq-act-order-dense")] = dense
            return packed if kind == "gptq-act-order" else dense
        if kind.startswith("autoround-"):
            run, fmt = kind.split("/")
            _, symmetry, group = run.split("-")
            inner = write_autoround(base, out.parent / run, int(group[1:]), symmetry == "sym")
            for sub in inner.iterdir():
                name = "llm-compressor" if sub.name.startswith("llm-compressor") else sub.name
                self.built[(family, f"{run}/{name}")] = sub
            return self.built[(family, kind)]
        raise ValueError(f"unknown checkpoint kind {kind!r}")


def hf_oracle(model_dir: Path, fp8_activations: bool = False) -> transformers.PreTrainedModel:
    """HF transformers' model of a checkpoint, decompressed to dense float32 weights:
    compressed-tensors through its own decompressor (which also quantizes the activations
    its scheme names), the hub fp8 layout through transformers' dequantizer, GPTQ/AWQ
    through auto-round's loader. ``fp8_activations`` adds per-token fp8 quantize-dequantize
    of every linear input (except the LM head): the W8A8 scheme that a dequantized hub fp8
    model otherwise leaves out."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    method = raw.get("quantization_config", {}).get("quant_method")
    kwargs: dict[str, Any] = {}
    if method == "compressed-tensors":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(run_compressed=False)
    elif method in ("gptq", "awq"):
        kwargs["quantization_config"] = transformers.AutoRoundConfig(backend="auto")
    with _quiet():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", **kwargs
        ).eval()
    if fp8_activations:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.register_forward_pre_hook(_fp8_per_token_qdq)
    return model


def _fp8_per_token_qdq(module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
    (x,) = args
    scale = (x.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=torch.finfo(x.dtype).tiny)
    return ((x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * scale,)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
