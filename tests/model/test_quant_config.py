"""Choosing the quantization method (config.json or quantization=), the errors that name
the field or tensor at fault, random weights per method (load_format="dummy"), and the
engine generating from quantized checkpoints as HF transformers does."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from lanner.entrypoints.cli import build_parser, engine_kwargs
from lanner.entrypoints.llm import LLM
from lanner.model.loader import load_model
from lanner.model.quant import resolve_quant_config
from lanner.sampling_params import SamplingParams
from tests.model.test_hf_parity import random_prompt
from tests.quant_checkpoints import QuantCheckpoints, hf_oracle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def edited_copy(model_dir: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    target = tmp_path / "edited"
    shutil.copytree(model_dir, target)
    raw = json.loads((target / "config.json").read_text())
    edit(raw["quantization_config"])
    (target / "config.json").write_text(json.dumps(raw))
    return target


def test_quantization_argument_must_name_a_method_and_agree_with_the_checkpoint() -> None:
    with pytest.raises(ValueError, match="quantization='int3' is not supported.*'fp8'"):
        resolve_quant_config({}, "int3")
    with pytest.raises(ValueError, match="needs a checkpoint quantized that way.*'fp8', 'int8'"):
        resolve_quant_config({}, "awq")
    awq = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    with pytest.raises(ValueError, match="quantized with 'awq'.*quant_method"):
        resolve_quant_config(awq, "fp8")
    assert resolve_quant_config(awq, "awq").name == "awq"
    with pytest.raises(ValueError, match="quant_method='bitsandbytes' is not supported"):
        resolve_quant_config({"quantization_config": {"quant_method": "bitsandbytes"}}, None)
    assert resolve_quant_config({}, None) is None
    # Random weights in a checkpoint-only layout take its usual defaults.
    assert (
        resolve_quant_config({}, "gptq", dummy=True).describe().startswith("gptq (4-bit, group 128")
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"quant_method": "gptq", "bits": 8}, r"quantization_config.bits=8 is not supported"),
        ({"quant_method": "gptq", "group_size": 48}, r"group_size=48 is not supported.*16, 32"),
        ({"quant_method": "awq", "version": "gemv"}, r"version='gemv' is not supported"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, r"activation_scheme='static'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, r"weight_block_size"),
        (
            {"quant_method": "gptq", "checkpoint_format": "marlin"},
            r"checkpoint_format='marlin' is not supported",
        ),
    ],
)
def test_unsupported_configs_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_quant_config({"quantization_config": raw}, None)


def test_unsupported_compressed_tensors_schemes_name_the_field(
    quant_checkpoints: QuantCheckpoints, tmp_path: Path
) -> None:
    model_dir = quant_checkpoints.get("llama", "ct-w4a16-g32")

    def three_bits(config: dict) -> None:
        config["config_groups"]["group_0"]["weights"]["num_bits"] = 3

    with pytest.raises(ValueError, match=r"config_groups.group_0.weights=.*num_bits.*3.*W4A16"):
        load_model(edited_copy(model_dir, tmp_path, three_bits), device="cpu")


def test_tensors_that_disagree_with_the_config_name_the_tensor(
    quant_checkpoints: QuantCheckpoints, tmp_path: Path
) -> None:
    """Scales for groups of 32 under a config that says 64."""
    model_dir = quant_checkpoints.get("llama", "ct-w4a16-g32")

    def group_64(config: dict) -> None:
        config["config_groups"]["group_0"]["weights"]["group_size"] = 64

    with pytest.raises(ValueError, match=r"tensor model\.layers\.\d\..*weight_scale does not fit"):
        load_model(edited_copy(model_dir, tmp_path, group_64), device="cpu")


def test_quantized_tensors_without_a_config_say_what_to_pass(
    quant_checkpoints: QuantCheckpoints, tmp_path: Path
) -> None:
    model_dir = quant_checkpoints.get("llama", "ct-w4a16-g32")
    target = tmp_path / "no-config"
    shutil.copytree(model_dir, target)
    raw = json.loads((target / "config.json").read_text())
    del raw["quantization_config"]
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="look like quantized weights.*quantization="):
        load_model(target, device="cpu")


@pytest.mark.parametrize("quantization", ["fp8", "int8", "awq", "gptq"])
def test_dummy_weights_in_every_method_run_the_engine(
    quantization: str, tiny_model_dirs: dict[str, Path]
) -> None:
    llm = LLM(
        str(tiny_model_dirs["qwen2"]),
        load_format="dummy",
        quantization=quantization,
        dtype="float32",
        kv_cache_memory_bytes=1 << 22,
    )
    [output] = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    assert len(output.outputs[0].token_ids) == 4
    qkv = llm.engine.core.loaded.model.model.layers[0].self_attn.qkv_proj
    assert qkv.method.name == {"awq": "int4", "gptq": "int4"}.get(quantization, quantization)
    # Dummy int4 weights keep activations about unit scale, as unquantized dummy ones do.
    hidden = torch.randn(3, qkv.in_features)
    assert 0.1 < qkv(hidden).std() < 10


@pytest.mark.parametrize("kind", ["ct-fp8", "ct-int8", "ct-w4a16-g128-asym"])
def test_engine_greedy_tokens_match_hf_generate(
    kind: str, quant_checkpoints: QuantCheckpoints
) -> None:
    model_dir = quant_checkpoints.get("llama", kind)
    prompt = random_prompt(11, seed=21)
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory_bytes=1 << 22)
    [output] = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    )
    with torch.no_grad():
        generated = hf_oracle(model_dir).generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
        )
    assert list(output.outputs[0].token_ids) == generated[0, len(prompt) :].tolist()


def test_cli_takes_quantization_beside_the_engine_flags() -> None:
    args = build_parser().parse_args(["generate", "hi", "--quantization", "fp8"])
    assert engine_kwargs(args)["quantization"] == "fp8"


def test_matmul_weight_bytes_count_what_the_layers_store(tiny_model_dirs: dict[str, Path]) -> None:
    """The roofline's bytes per decode step: fp8 linears are a byte a weight (plus one
    fp32 scale a row), the tied head (the embedding table) stays at the model dtype's 4."""
    from lanner.bench.roofline import ModelShape

    model_dir = tiny_model_dirs["qwen3"]
    full = load_model(model_dir, dtype="float32", device="cpu")
    fp8 = load_model(model_dir, dtype="float32", device="cpu", quantization="fp8")
    config = full.config
    shape = ModelShape.from_config(config, "float32")
    embedding = config.vocab_size * config.hidden_size
    linears = shape.matmul_params - embedding
    assert full.matmul_weight_bytes == 4 * shape.matmul_params
    rows = sum(
        m.out_features for m in fp8.model.modules() if m.__class__.__name__ == "PackedLinear"
    )
    assert fp8.matmul_weight_bytes == linears + 4 * rows + 4 * embedding
    quantized = dataclasses.replace(shape, matmul_weight_bytes=fp8.matmul_weight_bytes)
    assert quantized.weight_bytes == fp8.matmul_weight_bytes < shape.weight_bytes
