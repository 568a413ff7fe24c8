"""A broken checkpoint fails with an error that names the file and what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lanner.model.config import ModelConfig
from lanner.model.loader import load_model, resolve_model_path


@pytest.fixture
def model_copy(tmp_path: Path, sharded_model_dir: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(sharded_model_dir, target)
    return target


def _index(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


def test_missing_shard_names_the_file(model_copy: Path) -> None:
    shard = sorted(set(_index(model_copy).values()))[1]
    (model_copy / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_model(model_copy, device="cpu")


def test_wrong_tensor_shape_names_file_and_tensor(model_copy: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = _index(model_copy)[name]
    tensors = load_file(model_copy / shard)
    tensors[name] = torch.zeros(7, tensors[name].shape[1])
    save_file(tensors, model_copy / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{shard}.*{name}.*expected shape \(24, 64\)"):
        load_model(model_copy, device="cpu")


def test_missing_tensor_is_reported(model_copy: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    shard = _index(model_copy)[name]
    tensors = load_file(model_copy / shard)
    del tensors[name]
    save_file(tensors, model_copy / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"incomplete.*{name}.*{shard}"):
        load_model(model_copy, device="cpu")


def test_truncated_shard_names_the_file(model_copy: Path) -> None:
    shard = sorted(set(_index(model_copy).values()))[0]
    data = (model_copy / shard).read_bytes()
    (model_copy / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cannot read .*{shard}"):
        load_model(model_copy, device="cpu")


def test_unknown_architecture_is_named(model_copy: Path) -> None:
    config_path = model_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(model_copy, device="cpu")


def test_unsupported_rope_type_is_named(model_copy: Path) -> None:
    config_path = model_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="longrope"):
        load_model(model_copy, device="cpu")


def test_folder_without_weights(tmp_path: Path, sharded_model_dir: Path) -> None:
    shutil.copy(sharded_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        load_model(tmp_path, device="cpu")


def test_missing_local_path_and_offline_hub_id(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_model_path(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"'someorg/some-model'.*HF_HUB_OFFLINE"):
        resolve_model_path("someorg/some-model")


def test_hub_id_found_in_local_cache(tmp_path: Path, sharded_model_dir: Path, monkeypatch) -> None:
    """A Hub id resolves offline to a snapshot already in the HF cache."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(sharded_model_dir, snapshot)
    (cache / "models--someorg--tiny" / "refs").mkdir()
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("someorg/tiny") == snapshot
    config = ModelConfig.from_pretrained(resolve_model_path("someorg/tiny"))
    assert config.architecture == "LlamaForCausalLM"


def test_config_reads_legacy_rope_spelling() -> None:
    """Hub checkpoints written before transformers 5 carry rope_theta + rope_scaling."""
    config = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "torch_dtype": "bfloat16",
        }
    )
    assert config.rope.theta == 500000.0 and config.rope.rope_type == "llama3"
    assert config.num_key_value_heads == 2 and config.head_dim == 4
    assert config.checkpoint_dtype == torch.bfloat16


def test_dummy_load_needs_no_weights(tmp_path: Path, sharded_model_dir: Path) -> None:
    shutil.copy(sharded_model_dir / "config.json", tmp_path / "config.json")
    loaded = load_model(tmp_path, dtype="bfloat16", device="cpu", load_format="dummy")
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert all(p.float().std() > 0 for p in params if p.dim() == 2)
    again = load_model(tmp_path, dtype="bfloat16", device="cpu", load_format="dummy")
    for a, b in zip(params, again.model.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: the same random model every time
