"""Quantized checkpoints written by the field's tools load in lanner and give HF
transformers' logits (the same checkpoint decompressed to dense weights), per method and
family, on the CPU's reference path in float32.

Tolerances: lanner and HF multiply the same dequantized weights (lanner dequantizes the
codes with the checkpoint's own scales, exactly as the library's decompressor does) and,
for W8A8, round the activations by the same per-token rule; what is left is float32
summation order, 1e-4 on these logits as in the unquantized parity tests. (An activation
that lands within float32 noise of an fp8 or int8 rounding boundary could round the other
way; none does at these seeds, and the exact equalities below would show it.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lanner.kernels import ops
from lanner.model.layers.linear import PackedLinear
from lanner.model.loader import load_model
from lanner.model.quant.base import UnquantizedLinearMethod
from lanner.model.quant.int4 import Int4LinearMethod
from lanner.model.quant.w8a8 import W8A8LinearMethod
from tests.model.test_hf_parity import prefill_logits, random_prompt
from tests.quant_checkpoints import QuantCheckpoints, hf_oracle
from tests.tiny_models import FAMILIES

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantization math is compared on the reference kernels, which sum as HF does:
    the CPU path's batched attention sums in another order, and a last-bit difference
    can move a per-token int8 activation across a rounding step (0.06 in the logits).
    tests/engine/test_cpu_engine.py holds the CPU path to the reference."""
    monkeypatch.setattr(ops, "FORCE_REFERENCE", True)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# Each family runs fp8 and int8 W8A8 and one W4A16 variant (together: every group size,
# symmetric and zero points, per-channel).
W4A16_BY_FAMILY = {
    "llama": "ct-w4a16-g32",
    "mistral": "ct-w4a16-g64-asym",
    "qwen2": "ct-w4a16-g128",
    "qwen3": "ct-w4a16-g128-asym",
}


def hf_logits(model_dir: Path, prompt: list[int], fp8_activations: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return hf_oracle(model_dir, fp8_activations)(torch.tensor([prompt])).logits[0]


def lanner_logits(model_dir: Path, prompt: list[int], **options) -> torch.Tensor:
    return prefill_logits(load_model(model_dir, dtype="float32", device="cpu", **options), prompt)


def methods_of(model_dir: Path, **options) -> dict[str, object]:
    loaded = load_model(model_dir, dtype="float32", device="cpu", **options)
    return {
        name: module.method
        for name, module in loaded.model.named_modules()
        if isinstance(module, PackedLinear)
    }


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["ct-fp8", "ct-int8", "w4a16"])
def test_compressed_tensors_checkpoints_match_hf(
    family: str, method: str, quant_checkpoints: QuantCheckpoints
) -> None:
    kind = W4A16_BY_FAMILY[family] if method == "w4a16" else method
    model_dir = quant_checkpoints.get(family, kind)
    prompt = random_prompt(29, seed=7)
    ours = lanner_logits(model_dir, prompt)
    theirs = hf_logits(model_dir, prompt)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    expected_type = Int4LinearMethod if method == "w4a16" else W8A8LinearMethod
    methods = methods_of(model_dir)
    assert isinstance(methods["model.layers.0.self_attn.qkv_proj"], expected_type)
    # llmcompressor was told to leave the head alone: it stays in the model dtype.
    if "lm_head" in methods:
        assert isinstance(methods["lm_head"], UnquantizedLinearMethod)


@pytest.mark.parametrize("kind", ["ct-fp8-tensor", "ct-w4a16-channel"])
def test_per_tensor_fp8_and_per_channel_int4_match_hf(
    kind: str, quant_checkpoints: QuantCheckpoints
) -> None:
    model_dir = quant_checkpoints.get("llama", kind)
    prompt = random_prompt(23, seed=8)
    torch.testing.assert_close(
        lanner_logits(model_dir, prompt), hf_logits(model_dir, prompt), atol=ATOL, rtol=0
    )


def test_quantized_lm_head_loads_quantized(quant_checkpoints: QuantCheckpoints) -> None:
    """A checkpoint that quantizes its (untied) head: the head runs quantized too."""
    model_dir = quant_checkpoints.get("llama", "ct-w4a16-g128-with-head")
    assert isinstance(methods_of(model_dir)["lm_head"], Int4LinearMethod)
    prompt = random_prompt(17, seed=9)
    torch.testing.assert_close(
        lanner_logits(model_dir, prompt), hf_logits(model_dir, prompt), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hub_fp8_layouts_match_hf_and_each_other(
    family: str, quant_checkpoints: QuantCheckpoints
) -> None:
    """transformers' own fp8 quantizer's checkpoint (weight_scale_inv per tensor) against
    transformers' dequantized model with per-token fp8 activations; AutoFP8's spelling
    (a scalar weight_scale) of the same tensors gives the same logits bit for bit."""
    hub = quant_checkpoints.get(family, "hf-fp8")
    prompt = random_prompt(21, seed=10)
    ours = lanner_logits(hub, prompt)
    torch.testing.assert_close(
        ours, hf_logits(hub, prompt, fp8_activations=True), atol=ATOL, rtol=0
    )
    assert torch.equal(ours, lanner_logits(quant_checkpoints.get(family, "autofp8"), prompt))


def test_online_fp8_equals_llmcompressor_fp8(quant_checkpoints: QuantCheckpoints) -> None:
    """quantization="fp8" of the unquantized checkpoint quantizes each weight row as
    llmcompressor's FP8-dynamic scheme does (absmax / 448, round to nearest even)."""
    prompt = random_prompt(19, seed=11)
    online = lanner_logits(quant_checkpoints.get("qwen3", "base"), prompt, quantization="fp8")
    checkpoint = lanner_logits(quant_checkpoints.get("qwen3", "ct-fp8"), prompt)
    assert torch.equal(online, checkpoint)


def test_online_int8_quantizes_rows_by_absmax_over_127(
    quant_checkpoints: QuantCheckpoints,
) -> None:
    base = quant_checkpoints.get("llama", "base")
    loaded = load_model(base, dtype="float32", device="cpu", quantization="int8")
    reference = load_model(base, dtype="float32", device="cpu")
    layer = loaded.model.model.layers[0].mlp.down_proj
    weight = reference.model.model.layers[0].mlp.down_proj.weight
    scale = weight.abs().amax(dim=1) / 127
    assert layer.weight.dtype == torch.int8
    torch.testing.assert_close(layer.weight_scale, scale, rtol=0, atol=0)
    assert torch.equal(layer.weight, (weight / scale[:, None]).round().to(torch.int8))
    # The oracle: HF's unquantized model with each projection's weight replaced by its
    # int8 dequantization and every projection input quantized the same way per token.
    hf = hf_oracle(base)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                row_scale = module.weight.abs().amax(dim=1, keepdim=True) / 127
                module.weight.copy_((module.weight / row_scale).round() * row_scale)
                module.register_forward_pre_hook(_int8_per_token_qdq)
        prompt = random_prompt(19, seed=12)
        theirs = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded, prompt), theirs, atol=ATOL, rtol=0)


def _int8_per_token_qdq(module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
    (x,) = args
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return ((x / scale).round().clamp(-128, 127) * scale,)


def test_gptq_and_awq_layouts_match_the_same_quantization_in_compressed_tensors(
    quant_checkpoints: QuantCheckpoints,
) -> None:
    """auto-round writes one round-to-nearest quantization in the GPTQ, AWQ and
    compressed-tensors layouts: lanner's loads of the first two give HF transformers'
    logits for the third (its own decompressor), and all three agree bit for bit.
    (~8 s: importing auto-round and its quantization pass; one model for both tests.)"""
    family = "llama"
    prompt = random_prompt(25, seed=13)
    outputs = {
        fmt: lanner_logits(quant_checkpoints.get(family, f"autoround-sym-g32/{fmt}"), prompt)
        for fmt in ("auto-gptq", "auto-awq", "llm-compressor")
    }
    assert torch.equal(outputs["auto-gptq"], outputs["llm-compressor"])
    assert torch.equal(outputs["auto-awq"], outputs["llm-compressor"])
    theirs = hf_logits(quant_checkpoints.get(family, "autoround-sym-g32/llm-compressor"), prompt)
    torch.testing.assert_close(outputs["auto-gptq"], theirs, atol=ATOL, rtol=0)


def test_gptq_and_awq_with_zero_points_agree_and_track_auto_rounds_loader(
    quant_checkpoints: QuantCheckpoints,
) -> None:
    """With zero points (auto-round cannot export those to compressed-tensors), the GPTQ
    and AWQ layouts of one quantization give the same logits bit for bit, and every layer
    agrees with HF transformers running the checkpoint through auto-round's own CPU kernels
    (auto-round-lib) to within those kernels' precision. They round the activations
    (about int8's 0.4 %: layer outputs differ by up to 0.7 % of their largest value from
    the exact product), so 2 % of the largest output; a misread layout is far off (a
    zero point off by one moves every weight a whole step, 1/15 of its group's range, a
    wrong nibble order scrambles them)."""
    prompt = random_prompt(25, seed=14)
    gptq = quant_checkpoints.get("mistral", "autoround-asym-g64/auto-gptq")
    awq = quant_checkpoints.get("mistral", "autoround-asym-g64/auto-awq")
    assert torch.equal(lanner_logits(gptq, prompt), lanner_logits(awq, prompt))
    generator = torch.Generator().manual_seed(0)
    for model_dir in (gptq, awq):
        ours = load_model(model_dir, dtype="float32", device="cpu").model.model
        theirs = hf_oracle(model_dir).model
        for index in range(len(ours.layers)):
            pairs = [
                (
                    ours.layers[index].self_attn.qkv_proj,
                    [getattr(theirs.layers[index].self_attn, f"{p}_proj") for p in "qkv"],
                ),
                (ours.layers[index].self_attn.o_proj, [theirs.layers[index].self_attn.o_proj]),
                (
                    ours.layers[index].mlp.gate_up_proj,
                    [theirs.layers[index].mlp.gate_proj, theirs.layers[index].mlp.up_proj],
                ),
                (ours.layers[index].mlp.down_proj, [theirs.layers[index].mlp.down_proj]),
            ]
            for layer, references in pairs:
                x = torch.randn(6, layer.in_features, generator=generator)
                with torch.no_grad():
                    mine = layer(x)
                    expected = torch.cat([reference(x) for reference in references], dim=-1)
                error = (mine - expected).abs().max() / expected.abs().max()
                assert error < 0.02, (model_dir.name, index, layer, error)


def test_gptq_act_order_matches_its_dequantized_twin(quant_checkpoints: QuantCheckpoints) -> None:
    """desc_act: the rows are reordered by group once at load (and x gathered to match);
    the logits equal HF's on the same weights dequantized by the format's definition."""
    packed = quant_checkpoints.get("qwen2", "gptq-act-order")
    dense = quant_checkpoints.get("qwen2", "gptq-act-order-dense")
    layer = load_model(packed, dtype="float32", device="cpu").model.model.layers[0].mlp.down_proj
    assert layer.perm is not None  # the random order did need reordering
    prompt = random_prompt(27, seed=15)
    torch.testing.assert_close(
        lanner_logits(packed, prompt), hf_logits(dense, prompt), atol=ATOL, rtol=0
    )
