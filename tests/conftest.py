"""Shared fixtures: tiny random HF checkpoints of every supported family, saved to disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Triton picks its CPU interpreter at first import, so this must precede every import
# that reaches the kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# lanner's own cache (remembered tokenizers): one fresh folder a test session, not ~/.cache.
os.environ.setdefault("LANNER_CACHE_DIR", tempfile.mkdtemp(prefix="lanner-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.quant_checkpoints import QuantCheckpoints  # noqa: E402
from tests.tiny_models import FAMILIES, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family name -> folder with config.json, safetensors and tokenizer files."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: save_tiny_model(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def sharded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("sharded") / "llama", shard_kb=20)


@pytest.fixture(scope="session")
def quant_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> QuantCheckpoints:
    """Quantized tiny checkpoints written by llmcompressor, auto-round and transformers,
    each built on first use (tests/quant_checkpoints.py)."""
    return QuantCheckpoints(tmp_path_factory.mktemp("quant_checkpoints"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
